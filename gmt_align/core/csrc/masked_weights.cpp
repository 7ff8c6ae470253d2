// `update` mode on the CPU: keep only the masked entries of an fp32 weight across the optimizer step
// (see gmt_align/masked_weights.py). Built into one module with gmt_cpu.cpp (kernels.py), whose module
// definition calls bind_masked_weights.
//
// An entry is masked where its score (magnitude: the int32 bit pattern of |g|, sign bit cleared) is
// below the threshold. Two ways to keep the masked weights:
// - fused: the selection's masking pass (gmt_cpu.cpp, mask_many_aside) writes one bit per entry it
//   zeroes and packs their weights work item by work item; `save_zeroed` keeps the weights of the few
//   candidates zeroed after it (below the exact threshold), with their positions; `restore_items`
//   writes both back after the step, every piece in one call;
// - apart (any weight the fused pass does not cover): `mark_masked` reads the gradient once and
//   writes one bit per entry (16 entries to an int16 word, 1/32 of the fp32 weight) and each chunk's
//   count; `save_masked` packs the masked weights chunk by chunk at the counts' offsets;
//   `restore_masked` unpacks them after the step.
// Neither restore reads the gradient. Work is split with at::parallel_for (torch's thread pool);
// AVX-512 unpacks 16 entries at a time (expand in registers, masked loads and stores), other CPUs
// walk the set bits of each word.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t CHUNK = 1 << 16;  // a multiple of 16: a chunk is whole words
constexpr int32_t ABS = 0x7FFFFFFF;

inline int32_t bits_of(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b & ABS;
}

void check(const torch::Tensor& t, torch::ScalarType type, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == 1 && t.is_contiguous(),
              what, " must be a contiguous 1-D CPU tensor of the right type");
}

int64_t chunks_of(int64_t n) { return (n + CHUNK - 1) / CHUNK; }

// The arguments save_masked and restore_masked share (one is the other's inverse): fp32 weights, their
// bits, each chunk's offset, and room for every masked entry in ``packed``.
void check_packed(const torch::Tensor& weight, const torch::Tensor& words, const torch::Tensor& offsets,
                  const torch::Tensor& packed, const char* what) {
  check(weight, torch::kFloat32, "weight");
  check(words, torch::kInt16, "words");
  check(packed, torch::kFloat32, what);
  const int64_t n = weight.numel(), chunks = chunks_of(n);
  TORCH_CHECK(words.numel() >= (n + 15) / 16 && offsets.numel() == chunks + 1, what, ": sizes differ");
  TORCH_CHECK(packed.numel() >= offsets.data_ptr<int64_t>()[chunks], what, ": holds fewer entries than are masked");
}

}  // namespace

// words[i / 16] bit i % 16 = entry i is masked; returns int64 [chunks + 1]: offsets[c] = masked
// entries in the chunks before c (offsets[chunks] = all of them).
torch::Tensor mark_masked(torch::Tensor grad, int64_t threshold, torch::Tensor words) {
  check(grad, torch::kFloat32, "grad");
  check(words, torch::kInt16, "words");
  const int64_t n = grad.numel(), chunks = chunks_of(n);
  TORCH_CHECK(words.numel() >= (n + 15) / 16, "mark_masked: too few words");
  const int32_t t = static_cast<int32_t>(threshold);
  auto offsets = torch::zeros({chunks + 1}, torch::kInt64);
  const float* g = grad.data_ptr<float>();
  uint16_t* w = reinterpret_cast<uint16_t*>(words.data_ptr<int16_t>());
  int64_t* off = offsets.data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t end = std::min(n, (c + 1) * CHUNK);
      int64_t count = 0, i = c * CHUNK;
#ifdef __AVX512F__
      const __m512i tv = _mm512_set1_epi32(t), absv = _mm512_set1_epi32(ABS);
      for (; i + 16 <= end; i += 16) {
        __mmask16 k = _mm512_cmplt_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(g + i), absv), tv);
        w[i / 16] = k;
        count += __builtin_popcount(k);
      }
#endif
      for (; i < end; i += 16) {
        uint32_t k = 0;
        const int64_t lanes = std::min<int64_t>(16, end - i);
        for (int64_t j = 0; j < lanes; ++j) k |= static_cast<uint32_t>(bits_of(g[i + j]) < t) << j;
        w[i / 16] = static_cast<uint16_t>(k);
        count += __builtin_popcount(k);
      }
      off[c + 1] = count;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) off[c + 1] += off[c];
  return offsets;
}

// out[offsets[c] + j] = the j-th masked weight of chunk c.
void save_masked(torch::Tensor weight, torch::Tensor words, torch::Tensor offsets, torch::Tensor out) {
  check_packed(weight, words, offsets, out, "save_masked: out");
  const int64_t n = weight.numel(), chunks = chunks_of(n);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const float* w = weight.data_ptr<float>();
  const uint16_t* m = reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t end = std::min(n, (c + 1) * CHUNK);
      float* dst = o + off[c];
      int64_t i = c * CHUNK;
#ifdef __AVX512F__
      for (; i + 16 <= end; i += 16) {
        const __mmask16 k = m[i / 16];
        const int count = __builtin_popcount(k);
        // compress in a register, then a masked store: a compress straight to memory is microcoded
        // on some CPUs (AMD Zen 4: ~7x slower here)
        const __m512 packed = _mm512_maskz_compress_ps(k, _mm512_loadu_ps(w + i));
        _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << count) - 1), packed);
        dst += count;
      }
#endif
      for (; i < end; i += 16) {
        for (uint32_t k = m[i / 16]; k; k &= k - 1) *dst++ = w[i + __builtin_ctz(k)];
      }
    }
  });
}

namespace {

// Entries [i, end) of w (i a multiple of 16): the marked ones take the next values of src. Returns
// where src ends.
const float* unpack_range(float* w, const uint16_t* m, int64_t i, int64_t end, const float* src) {
#ifdef __AVX512F__
  for (; i + 16 <= end; i += 16) {
    const __mmask16 k = m[i / 16];
    if (k) {
      const int count = __builtin_popcount(k);
      const __m512 packed = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), src);
      _mm512_mask_storeu_ps(w + i, k, _mm512_maskz_expand_ps(k, packed));
      src += count;
    }
  }
#endif
  for (; i < end; i += 16) {
    for (uint32_t k = m[i / 16]; k; k &= k - 1) w[i + __builtin_ctz(k)] = *src++;
  }
  return src;
}

}  // namespace

// weight[i] = the saved value, for every masked entry i (the inverse of save_masked).
void restore_masked(torch::Tensor weight, torch::Tensor words, torch::Tensor offsets, torch::Tensor saved) {
  check_packed(weight, words, offsets, saved, "restore_masked: saved");
  const int64_t n = weight.numel(), chunks = chunks_of(n);
  const int64_t* off = offsets.data_ptr<int64_t>();
  float* w = weight.data_ptr<float>();
  const uint16_t* m = reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>());
  const float* s = saved.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) unpack_range(w, m, c * CHUNK, std::min(n, (c + 1) * CHUNK), s + off[c]);
  });
}

// Per piece k (candidates [first[k], first[k] + counts[k]) of mask_many: positions inside the piece and
// scores): the candidates whose score is below thresholds[k] were zeroed after the masking pass. Their
// positions (int32) and weights go to out_positions and out_values, piece after piece; pieces with an
// empty weight are left out. Returns how many each piece saved.
torch::Tensor save_zeroed(std::vector<torch::Tensor> weights, torch::Tensor counts, torch::Tensor positions,
                          torch::Tensor scores, torch::Tensor thresholds, torch::Tensor out_positions,
                          torch::Tensor out_values) {
  const int64_t pieces = static_cast<int64_t>(weights.size());
  check(counts, torch::kInt64, "counts");
  check(positions, torch::kInt64, "positions");
  check(scores, torch::kInt64, "scores");
  check(thresholds, torch::kInt64, "thresholds");
  check(out_positions, torch::kInt32, "out_positions");
  check(out_values, torch::kFloat32, "out_values");
  TORCH_CHECK(counts.numel() == pieces && thresholds.numel() == pieces,
              "save_zeroed: one count and threshold per piece");
  const int64_t* pp = positions.data_ptr<int64_t>();
  const int64_t* vp = scores.data_ptr<int64_t>();
  const int64_t* tp = thresholds.data_ptr<int64_t>();
  std::vector<int64_t> first(static_cast<size_t>(pieces + 1), 0), out(static_cast<size_t>(pieces + 1), 0);
  auto saved = torch::zeros({pieces}, torch::kInt64);
  int64_t* sp = saved.data_ptr<int64_t>();
  for (int64_t k = 0; k < pieces; ++k) {
    first[k + 1] = first[k] + counts.data_ptr<int64_t>()[k];
    TORCH_CHECK(first[k + 1] <= positions.numel() && first[k + 1] <= scores.numel(), "save_zeroed: sizes differ");
    if (weights[k].numel()) {
      check(weights[k], torch::kFloat32, "weight");
      for (int64_t c = first[k]; c < first[k + 1]; ++c) {
        TORCH_CHECK(pp[c] >= 0 && pp[c] < weights[k].numel() && pp[c] <= INT32_MAX,
                    "save_zeroed: a position outside its weight");
        sp[k] += vp[c] < tp[k];
      }
    }
    out[k + 1] = out[k] + sp[k];
  }
  TORCH_CHECK(out_positions.numel() >= out.back() && out_values.numel() >= out.back(), "save_zeroed: too little room");
  int32_t* op = out_positions.data_ptr<int32_t>();
  float* ov = out_values.data_ptr<float>();
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      if (!sp[k]) continue;
      const float* w = weights[k].data_ptr<float>();
      int64_t at = out[k];
      for (int64_t c = first[k]; c < first[k + 1]; ++c) {
        if (vp[c] < tp[k]) {
          op[at] = static_cast<int32_t>(pp[c]);
          ov[at++] = w[pp[c]];
        }
      }
    }
  });
  return saved;
}

// After the optimizer step, every piece in one call: piece k's entries marked in words[k] take back
// their weights from values[k], work item by work item (`item` entries each; item j's from
// values[k][starts[k][j]]; int32); then the entries at positions[k] (int32) take back extras[k]
// (save_zeroed's).
void restore_items(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> words,
                   std::vector<torch::Tensor> starts, std::vector<torch::Tensor> values,
                   std::vector<torch::Tensor> positions, std::vector<torch::Tensor> extras, int64_t item) {
  const size_t pieces = weights.size();
  TORCH_CHECK(words.size() == pieces && starts.size() == pieces && values.size() == pieces &&
                  positions.size() == pieces && extras.size() == pieces && item > 0 && item % 16 == 0,
              "restore_items: one weight, words, starts, values, positions and extras per piece");
  std::vector<int64_t> first(pieces + 1, 0);
  for (size_t k = 0; k < pieces; ++k) {
    const int64_t n = weights[k].numel(), items = (n + item - 1) / item;
    check(weights[k], torch::kFloat32, "weight");
    check(words[k], torch::kInt16, "words");
    check(starts[k], torch::kInt32, "starts");
    check(values[k], torch::kFloat32, "values");
    check(positions[k], torch::kInt32, "positions");
    check(extras[k], torch::kFloat32, "extras");
    TORCH_CHECK(words[k].numel() >= (n + 15) / 16 && starts[k].numel() >= items &&
                    positions[k].numel() == extras[k].numel(), "restore_items: sizes differ");
    const int32_t* s = starts[k].data_ptr<int32_t>();
    const int32_t* p = positions[k].data_ptr<int32_t>();
    for (int64_t j = 0; j < items; ++j)
      TORCH_CHECK(s[j] >= 0 && s[j] <= values[k].numel(), "restore_items: an item without its values");
    for (int64_t c = 0; c < positions[k].numel(); ++c)
      TORCH_CHECK(p[c] >= 0 && p[c] < n, "restore_items: a position outside its weight");
    first[k + 1] = first[k] + items;
  }
  std::vector<float*> w(pieces);
  std::vector<const uint16_t*> m(pieces);
  std::vector<const int32_t*> s(pieces);
  std::vector<const float*> v(pieces);
  for (size_t k = 0; k < pieces; ++k) {
    w[k] = weights[k].data_ptr<float>();
    m[k] = reinterpret_cast<const uint16_t*>(words[k].data_ptr<int16_t>());
    s[k] = starts[k].data_ptr<int32_t>();
    v[k] = values[k].data_ptr<float>();
  }
  // an item's values never run past the next item's start or the end: mask_many_aside sized them
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    size_t k = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1);
    for (int64_t at = begin; at < end; ++at) {
      while (at >= first[k + 1]) ++k;
      const int64_t j = at - first[k];
      unpack_range(w[k], m[k], j * item, std::min(weights[k].numel(), (j + 1) * item), v[k] + s[k][j]);
    }
  });
  at::parallel_for(0, static_cast<int64_t>(pieces), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int32_t* p = positions[k].data_ptr<int32_t>();
      const float* x = extras[k].data_ptr<float>();
      for (int64_t c = 0; c < positions[k].numel(); ++c) w[k][p[c]] = x[c];
    }
  });
}

void bind_masked_weights(pybind11::module_& m) {
  m.def("save_zeroed", &save_zeroed, "keep the weights of the candidates zeroed after the masking pass");
  m.def("restore_items", &restore_items, "unpack what the masking pass and save_zeroed kept, every piece at once");
  m.def("mark_masked", &mark_masked, "one bit per masked entry, and the masked entries before each chunk");
  m.def("save_masked", &save_masked, "pack the masked weights");
  m.def("restore_masked", &restore_masked, "unpack the masked weights");
}
