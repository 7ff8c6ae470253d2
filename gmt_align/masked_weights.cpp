// `update` mode on the CPU: keep only the masked entries of an fp32 weight across the optimizer step
// (see gmt_align/masked_weights.py, which builds this file with torch.utils.cpp_extension).
//
// An entry is masked where the int32 bit pattern of |g| (sign bit cleared) is below the threshold.
// `mark_masked` reads the gradient once and writes one bit per entry (16 entries to an int16 word,
// 1/32 of the fp32 weight) and each chunk's count; `save_masked` packs the masked weights chunk by
// chunk at the counts' offsets; `restore_masked` unpacks them after the step. Neither reads the
// gradient again. Work is split into CHUNK-entry chunks with at::parallel_for (torch's thread pool);
// AVX-512 packs and unpacks 16 entries at a time (compress / expand in registers, masked loads and
// stores), other CPUs walk the set bits of each word.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

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
  check(weight, torch::kFloat32, "weight");
  check(words, torch::kInt16, "words");
  check(out, torch::kFloat32, "out");
  const int64_t n = weight.numel(), chunks = chunks_of(n);
  TORCH_CHECK(words.numel() >= (n + 15) / 16 && offsets.numel() == chunks + 1, "save_masked: sizes differ");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(out.numel() >= off[chunks], "save_masked: out holds fewer entries than are masked");
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

// weight[i] = the saved value, for every masked entry i (the inverse of save_masked).
void restore_masked(torch::Tensor weight, torch::Tensor words, torch::Tensor offsets, torch::Tensor saved) {
  check(weight, torch::kFloat32, "weight");
  check(words, torch::kInt16, "words");
  check(saved, torch::kFloat32, "saved");
  const int64_t n = weight.numel(), chunks = chunks_of(n);
  TORCH_CHECK(words.numel() >= (n + 15) / 16 && offsets.numel() == chunks + 1, "restore_masked: sizes differ");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(saved.numel() >= off[chunks], "restore_masked: fewer saved entries than masked ones");
  float* w = weight.data_ptr<float>();
  const uint16_t* m = reinterpret_cast<const uint16_t*>(words.data_ptr<int16_t>());
  const float* s = saved.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t end = std::min(n, (c + 1) * CHUNK);
      const float* src = s + off[c];
      int64_t i = c * CHUNK;
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
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mark_masked", &mark_masked, "one bit per masked entry, and the masked entries before each chunk");
  m.def("save_masked", &save_masked, "pack the masked weights");
  m.def("restore_masked", &restore_masked, "unpack the masked weights");
}
