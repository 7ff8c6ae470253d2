// GMT's two full passes over an fp32 gradient on the CPU, each one pass over memory
// (see gmt_align/kernels.py, which builds this file with torch.utils.cpp_extension).
//
// The score of an entry is the int32 bit pattern of |g| (sign bit cleared), which orders exactly like
// the value, NaN above +inf. Work is split with at::parallel_for (torch's own thread pool).
// Vectors are GCC/Clang vector extensions: AVX-512, AVX2, SSE or NEON, whatever the flags allow.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t LANES = 16;
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
constexpr int MAX_PROBES = 16;
constexpr int64_t ITEM = 4096;  // entries per work item of at::parallel_for
constexpr int32_t ABS = 0x7FFFFFFF;
// Entries whose candidate flags are reduced at once: kernels.BLOCK, the block of mask_and_flag's
// marks (ITEM is a multiple).
constexpr int64_t BLOCK = 64;

inline vint load_bits(const float* p) {
  vint v;
  std::memcpy(&v, p, sizeof(v));
  return v & ABS;
}

inline int32_t bits_of(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b & ABS;
}

// counts[j] = entries whose bits are >= probes[j], over `rows` rows of `cols` entries, `stride` apart.
template <int P>
void count_rows(const float* base, int64_t rows, int64_t cols, int64_t stride, const int32_t* probes,
                int64_t* out) {
  const int64_t per_row = (cols + ITEM - 1) / ITEM;
  const int64_t items = rows * per_row;
  const int threads = at::get_num_threads();
  std::vector<int64_t> partial(static_cast<size_t>(threads) * P, 0);
  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    int64_t* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * P;
    vint pv[P];
    for (int j = 0; j < P; ++j) pv[j] = vint{} + probes[j];
    for (int64_t item = first; item < last; ++item) {
      const float* row = base + (item / per_row) * stride;
      const int64_t start = (item % per_row) * ITEM;
      const int64_t end = std::min(cols, start + ITEM);
      vint acc[P];
      for (int j = 0; j < P; ++j) acc[j] = vint{};
      int64_t i = start;
      for (; i + LANES <= end; i += LANES) {
        const vint b = load_bits(row + i);
        for (int j = 0; j < P; ++j) acc[j] -= (b >= pv[j]);  // a true comparison is -1
      }
      for (int j = 0; j < P; ++j) {
        int64_t c = 0;
        for (int64_t l = 0; l < LANES; ++l) c += acc[j][l];
        for (int64_t k = i; k < end; ++k) c += bits_of(row[k]) >= probes[j];
        mine[j] += c;
      }
    }
  });
  for (int j = 0; j < P; ++j) {
    int64_t c = 0;
    for (int t = 0; t < threads; ++t) c += partial[static_cast<size_t>(t) * P + j];
    out[j] = c;
  }
}

using CountFn = void (*)(const float*, int64_t, int64_t, int64_t, const int32_t*, int64_t*);

template <int P>
constexpr CountFn count_for() { return &count_rows<P>; }

constexpr CountFn COUNTS[MAX_PROBES] = {
    count_for<1>(), count_for<2>(), count_for<3>(), count_for<4>(), count_for<5>(), count_for<6>(),
    count_for<7>(), count_for<8>(), count_for<9>(), count_for<10>(), count_for<11>(), count_for<12>(),
    count_for<13>(), count_for<14>(), count_for<15>(), count_for<16>()};

}  // namespace

// int64 [P]: entries of x (fp32, 1-D contiguous or 2-D with unit column stride) with bits >= probes[j].
torch::Tensor count_at_least(torch::Tensor x, torch::Tensor probes) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "count_at_least: fp32 CPU tensor");
  TORCH_CHECK(probes.scalar_type() == torch::kInt32 && probes.dim() == 1 && probes.is_contiguous(),
              "count_at_least: int32 probes");
  const int P = static_cast<int>(probes.numel());
  TORCH_CHECK(P >= 1 && P <= MAX_PROBES, "count_at_least: 1 to 16 probes");
  int64_t rows = 1, cols = x.numel(), stride = 0;
  if (x.dim() == 2) {
    TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "count_at_least: rows must be contiguous");
    rows = x.size(0), cols = x.size(1), stride = x.stride(0);
  } else {
    TORCH_CHECK(x.dim() == 1 && (x.is_contiguous() || x.numel() <= 1), "count_at_least: 1-D contiguous");
  }
  auto out = torch::zeros({P}, torch::kInt64);
  if (rows > 0 && cols > 0)
    COUNTS[P - 1](x.data_ptr<float>(), rows, cols, stride, probes.data_ptr<int32_t>(), out.data_ptr<int64_t>());
  return out;
}

// In place on x (fp32, 1-D contiguous): zero every entry whose bits are < lo. Returns the positions
// (int64) and bit patterns (int64) of the entries in [lo, hi), in ascending position: the candidates.
std::vector<torch::Tensor> mask_candidates(torch::Tensor x, int64_t lo, int64_t hi) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "mask_candidates: fp32 CPU tensor");
  TORCH_CHECK(x.dim() == 1 && (x.is_contiguous() || x.numel() <= 1), "mask_candidates: 1-D contiguous");
  float* data = x.data_ptr<float>();
  const int64_t n = x.numel();
  const int64_t items = (n + ITEM - 1) / ITEM;
  // Candidates found per work item, kept apart and concatenated in order afterwards.
  std::vector<std::vector<int64_t>> pos(static_cast<size_t>(items)), val(static_cast<size_t>(items));
  const int32_t lo32 = static_cast<int32_t>(std::min<int64_t>(lo, INT32_MAX));
  const int32_t hi32 = static_cast<int32_t>(std::min<int64_t>(hi, INT32_MAX));
  at::parallel_for(0, items, 1, [&](int64_t first, int64_t last) {
    [[maybe_unused]] const vint lov = vint{} + lo32, hiv = vint{} + hi32;
    for (int64_t item = first; item < last; ++item) {
      const int64_t start = item * ITEM, end = std::min(n, start + ITEM);
      int64_t i = start;
#ifdef __AVX512F__
      // AVX-512: the comparisons give bit masks, so the candidates' lanes are read straight off them.
      const __m512i lo512 = _mm512_set1_epi32(lo32), hi512 = _mm512_set1_epi32(hi32);
      const __m512i abs512 = _mm512_set1_epi32(ABS);
      for (; i + LANES <= end; i += LANES) {
        const __m512i raw = _mm512_loadu_si512(data + i);
        const __m512i b = _mm512_and_si512(raw, abs512);
        const __mmask16 keep = _mm512_cmpge_epi32_mask(b, lo512);
        _mm512_storeu_si512(data + i, _mm512_maskz_mov_epi32(keep, raw));
        unsigned inside = _mm512_mask_cmplt_epi32_mask(keep, b, hi512);
        while (inside) {
          const int l = __builtin_ctz(inside);
          inside &= inside - 1;
          pos[item].push_back(i + l);
          val[item].push_back(bits_of(data[i + l]));
        }
      }
#else
      for (; i + BLOCK <= end; i += BLOCK) {
        vint seen = vint{};
        for (int64_t v = i; v < i + BLOCK; v += LANES) {
          vint raw;
          std::memcpy(&raw, data + v, sizeof(raw));
          const vint b = raw & ABS;
          const vint keep = b >= lov;  // -1 where kept
          const vint out = raw & keep;
          std::memcpy(data + v, &out, sizeof(out));
          seen |= keep & (b < hiv);
        }
        int32_t any = 0;
        for (int64_t l = 0; l < LANES; ++l) any |= seen[l];
        if (any) {  // rescan the block: kept entries are unchanged, so their bits are still there
          for (int64_t k = i; k < i + BLOCK; ++k) {
            const int32_t b = bits_of(data[k]);
            if (b >= lo32 && b < hi32) {
              pos[item].push_back(k);
              val[item].push_back(b);
            }
          }
        }
      }
#endif
      for (; i < end; ++i) {
        const int32_t b = bits_of(data[i]);
        if (b < lo32) {
          data[i] = 0.0f;
        } else if (b < hi32) {
          pos[item].push_back(i);
          val[item].push_back(b);
        }
      }
    }
  });
  int64_t total = 0;
  for (const auto& p : pos) total += static_cast<int64_t>(p.size());
  auto positions = torch::empty({total}, torch::kInt64);
  auto values = torch::empty({total}, torch::kInt64);
  int64_t* pp = positions.data_ptr<int64_t>();
  int64_t* vp = values.data_ptr<int64_t>();
  for (size_t k = 0; k < pos.size(); ++k) {
    std::copy(pos[k].begin(), pos[k].end(), pp);
    std::copy(val[k].begin(), val[k].end(), vp);
    pp += pos[k].size();
    vp += val[k].size();
  }
  return {positions, values};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("count_at_least", &count_at_least, "entries with |x| bits >= each probe");
  m.def("mask_candidates", &mask_candidates, "zero below lo in place; the entries in [lo, hi)");
}
