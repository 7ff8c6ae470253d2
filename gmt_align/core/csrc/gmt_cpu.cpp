// GMT's passes over fp32 gradients on the CPU, each one pass over memory and one call for every piece
// of every unit (see gmt_align/batch_kernels.py and kernels.py, which builds this file with
// torch.utils.cpp_extension).
//
// The score of an entry is the int32 bit pattern of |g| (sign bit cleared), which orders exactly like
// the value, NaN above +inf. Work is split with at::parallel_for (torch's own thread pool).
// Vectors are GCC/Clang vector extensions: AVX-512, AVX2, SSE or NEON, whatever the flags allow.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t LANES = 16;
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
constexpr int MAX_PROBES = 16;
constexpr int64_t ITEM = 4096;  // entries per work item of at::parallel_for
constexpr int32_t ABS = 0x7FFFFFFF;
#ifndef PREFETCH
#define PREFETCH 1024
#endif
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

}  // namespace

// --- many pieces in one call ---------------------------------------------------------------------
// The batched kernels take every piece of every unit at once (a piece: a 1-D contiguous fp32 slice of a
// gradient, or a 2-D view of runs with unit column stride), so a model of hundreds of tensors costs
// one call, one thread-pool dispatch, per pass. Their work items span the pieces.
//
// Scores: with `keys` empty, the score of an entry is the bit pattern of |g| (magnitude). With one
// key per piece (random selection), the score of the entry at position q of its tensor (q = offset
// + index inside the piece) is random_bits(key, q), below, and the gradient is only written.
namespace {

typedef uint32_t vuint __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));

struct Piece {
  float* data;
  int64_t rows, cols, stride;  // a 1-D piece: one row
  uint32_t k1, k2;             // random selection: the tensor's key for this step
  int64_t offset;              // random selection: the position of the piece's first entry
};

// lowbias32 (C. Wellons): a bijection of 32-bit words with good avalanche.
template <typename T>
inline T mix32(T x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The random score of position q as the bit pattern of a float32 in [0, 1) with 24 random bits:
// h = mix32(lo(q) * (k2 | 1) + (k1 ^ hi(q) * golden)), score = (h >> 8) / 2^24: a Weyl sequence through
// a mixer (as splitmix), the step and tensor choosing both its start and its increment.
inline int32_t random_bits(uint32_t k1, uint32_t k2, int64_t q) {
  const uint32_t lo = static_cast<uint32_t>(q), hi = static_cast<uint32_t>(static_cast<uint64_t>(q) >> 32);
  const uint32_t h = mix32<uint32_t>(lo * (k2 | 1u) + (k1 ^ (hi * 0x9E3779B9u)));
  const float f = static_cast<float>(h >> 8) * 0x1p-24f;
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

inline vint random_bits_vec(uint32_t k1, uint32_t k2, int64_t q) {
  const uint32_t lo0 = static_cast<uint32_t>(q), hi0 = static_cast<uint32_t>(static_cast<uint64_t>(q) >> 32);
  const vuint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vuint lo = lane + lo0;
  vuint start;
  if (__builtin_expect(lo0 <= 0xFFFFFFFFu - (LANES - 1), 1)) {  // no lane carries into the high word
    start = vuint{} + (k1 ^ (hi0 * 0x9E3779B9u));
  } else {
    const vuint hi = (vuint{} + hi0) - (vuint)(lo < lo0);
    start = k1 ^ (hi * 0x9E3779B9u);
  }
  const vuint h = mix32<vuint>(lo * (k2 | 1u) + start);
  const vfloat f = __builtin_convertvector((vint)(h >> 8), vfloat) * 0x1p-24f;
  vint b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

template <bool RANDOM>
inline vint score_vec(const Piece& p, const float* at, int64_t q) {
  if constexpr (RANDOM) return random_bits_vec(p.k1, p.k2, q);
  else return load_bits(at);
}

template <bool RANDOM>
inline int32_t score_one(const Piece& p, const float* at, int64_t q) {
  if constexpr (RANDOM) return random_bits(p.k1, p.k2, q);
  else return bits_of(*at);
}

std::vector<Piece> pieces_of(const std::vector<torch::Tensor>& xs, const torch::Tensor& keys,
                             const torch::Tensor& offsets, bool rows_allowed) {
  const bool random = keys.numel() > 0;
  TORCH_CHECK(!random || (keys.numel() == (int64_t)xs.size() && offsets.numel() == (int64_t)xs.size() &&
                          keys.scalar_type() == torch::kInt64 && offsets.scalar_type() == torch::kInt64 &&
                          keys.is_contiguous() && offsets.is_contiguous()),
              "gmt kernels: one int64 key and offset per piece");
  std::vector<Piece> out;
  out.reserve(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) {
    const auto& x = xs[k];
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "gmt kernels: fp32 CPU tensors");
    Piece p{x.data_ptr<float>(), 1, x.numel(), 0, 0, 0, 0};
    if (x.dim() == 2 && rows_allowed) {
      TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "gmt kernels: rows must be contiguous");
      p.rows = x.size(0), p.cols = x.size(1), p.stride = x.stride(0);
    } else {
      TORCH_CHECK(x.dim() == 1 && (x.is_contiguous() || x.numel() <= 1), "gmt kernels: 1-D contiguous pieces");
    }
    if (p.rows == 0 || p.cols == 0) p.rows = 0, p.cols = 0;
    if (random) {
      const uint64_t key = static_cast<uint64_t>(keys.data_ptr<int64_t>()[k]);
      p.k1 = static_cast<uint32_t>(key), p.k2 = static_cast<uint32_t>(key >> 32);
      p.offset = offsets.data_ptr<int64_t>()[k];
    }
    out.push_back(p);
  }
  return out;
}

// Work items over all pieces: piece k's items are [first[k], first[k + 1]), ITEM entries of a row each.
struct Items {
  std::vector<int64_t> first;
  std::vector<int64_t> per_row;
  explicit Items(const std::vector<Piece>& ps) : first(ps.size() + 1, 0), per_row(ps.size(), 0) {
    for (size_t k = 0; k < ps.size(); ++k) {
      per_row[k] = (ps[k].cols + ITEM - 1) / ITEM;
      first[k + 1] = first[k] + ps[k].rows * per_row[k];
    }
  }
  int64_t total() const { return first.back(); }
  size_t piece_of(int64_t item) const {
    return static_cast<size_t>(std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1);
  }
};

#ifdef __AVX512F__
// Magnitude counts of one work item with AVX-512. Every entry is compared with three values only: the
// lowest probe A, the highest finite probe B, and C, the probe above B (+inf: the non-finite count).
// The entries in [A, B) are packed into a small buffer, and only they are compared with every probe:
// the probes sit close around the threshold, so the pass costs about what reading the gradient costs
// however many probes there are. Returns false (nothing counted) for probes this does not cover.
template <int P, bool RANDOM>
bool count_item_packed(const Piece& piece, const float* row, int64_t q0, int64_t start, int64_t stop,
                       const int32_t* probe, int64_t* mine) {
  int32_t A = INT32_MAX, B = INT32_MIN, C = INT32_MAX;
  for (int j = 0; j < P; ++j) {
    A = std::min(A, probe[j]);
    if (probe[j] < 0x7F800000) B = std::max(B, probe[j]);
  }
  if (B == INT32_MIN) B = A;
  for (int j = 0; j < P; ++j)
    if (probe[j] > B) {
      if (C != INT32_MAX && probe[j] != C) return false;  // two distinct values above B: the plain loop
      C = probe[j];
    }
  alignas(64) int32_t buffer[ITEM + LANES];
  int64_t packed = 0;
  const __m512i abs512 = _mm512_set1_epi32(ABS), minus1 = _mm512_set1_epi32(-1);
  const __m512i a512 = _mm512_set1_epi32(A), b512 = _mm512_set1_epi32(B), c512 = _mm512_set1_epi32(C);
  __m512i at_b = _mm512_setzero_si512(), at_c = _mm512_setzero_si512();
  int64_t i = start;
  if constexpr (!RANDOM) {  // four vectors a turn: their packing offsets do not wait on one another
    __m512i at_b1 = _mm512_setzero_si512(), at_c1 = _mm512_setzero_si512();
    for (; i + 4 * LANES <= stop; i += 4 * LANES) {
      _mm_prefetch(reinterpret_cast<const char*>(row + i + PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + i + PREFETCH + LANES), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + i + PREFETCH + 2 * LANES), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(row + i + PREFETCH + 3 * LANES), _MM_HINT_T0);
      const __m512i b0 = _mm512_and_si512(_mm512_loadu_si512(row + i), abs512);
      const __m512i b1 = _mm512_and_si512(_mm512_loadu_si512(row + i + LANES), abs512);
      const __m512i b2 = _mm512_and_si512(_mm512_loadu_si512(row + i + 2 * LANES), abs512);
      const __m512i b3 = _mm512_and_si512(_mm512_loadu_si512(row + i + 3 * LANES), abs512);
      const __mmask16 kb0 = _mm512_cmpge_epi32_mask(b0, b512), kb1 = _mm512_cmpge_epi32_mask(b1, b512);
      const __mmask16 kb2 = _mm512_cmpge_epi32_mask(b2, b512), kb3 = _mm512_cmpge_epi32_mask(b3, b512);
      at_b = _mm512_mask_sub_epi32(at_b, kb0, at_b, minus1);
      at_b1 = _mm512_mask_sub_epi32(at_b1, kb1, at_b1, minus1);
      at_b = _mm512_mask_sub_epi32(at_b, kb2, at_b, minus1);
      at_b1 = _mm512_mask_sub_epi32(at_b1, kb3, at_b1, minus1);
      at_c = _mm512_mask_sub_epi32(at_c, _mm512_mask_cmpge_epi32_mask(kb0, b0, c512), at_c, minus1);
      at_c1 = _mm512_mask_sub_epi32(at_c1, _mm512_mask_cmpge_epi32_mask(kb1, b1, c512), at_c1, minus1);
      at_c = _mm512_mask_sub_epi32(at_c, _mm512_mask_cmpge_epi32_mask(kb2, b2, c512), at_c, minus1);
      at_c1 = _mm512_mask_sub_epi32(at_c1, _mm512_mask_cmpge_epi32_mask(kb3, b3, c512), at_c1, minus1);
      const __mmask16 in0 = _kandn_mask16(kb0, _mm512_cmpge_epi32_mask(b0, a512));
      const __mmask16 in1 = _kandn_mask16(kb1, _mm512_cmpge_epi32_mask(b1, a512));
      const __mmask16 in2 = _kandn_mask16(kb2, _mm512_cmpge_epi32_mask(b2, a512));
      const __mmask16 in3 = _kandn_mask16(kb3, _mm512_cmpge_epi32_mask(b3, a512));
      const int64_t n0 = __builtin_popcount(static_cast<unsigned>(in0));
      const int64_t n1 = __builtin_popcount(static_cast<unsigned>(in1));
      const int64_t n2 = __builtin_popcount(static_cast<unsigned>(in2));
      const int64_t n3 = __builtin_popcount(static_cast<unsigned>(in3));
      _mm512_storeu_si512(buffer + packed, _mm512_maskz_compress_epi32(in0, b0));
      _mm512_storeu_si512(buffer + packed + n0, _mm512_maskz_compress_epi32(in1, b1));
      _mm512_storeu_si512(buffer + packed + n0 + n1, _mm512_maskz_compress_epi32(in2, b2));
      _mm512_storeu_si512(buffer + packed + n0 + n1 + n2, _mm512_maskz_compress_epi32(in3, b3));
      packed += (n0 + n1) + (n2 + n3);
    }
    at_b = _mm512_add_epi32(at_b, at_b1);
    at_c = _mm512_add_epi32(at_c, at_c1);
  }
  for (; i + LANES <= stop; i += LANES) {
    __m512i b;
    if constexpr (RANDOM) b = (__m512i)score_vec<true>(piece, row + i, q0 + i);
    else b = _mm512_and_si512(_mm512_loadu_si512(row + i), abs512);
    const __mmask16 ka = _mm512_cmpge_epi32_mask(b, a512), kb = _mm512_cmpge_epi32_mask(b, b512);
    at_b = _mm512_mask_sub_epi32(at_b, kb, at_b, minus1);
    at_c = _mm512_mask_sub_epi32(at_c, _mm512_cmpge_epi32_mask(b, c512), at_c, minus1);
    const __mmask16 inside = _kandn_mask16(kb, ka);
    _mm512_storeu_si512(buffer + packed, _mm512_maskz_compress_epi32(inside, b));
    packed += __builtin_popcount(static_cast<unsigned>(inside));
  }
  const int64_t above_b = _mm512_reduce_add_epi32(at_b), above_c = _mm512_reduce_add_epi32(at_c);
  vint pv[P], acc[P];
  for (int j = 0; j < P; ++j) pv[j] = vint{} + probe[j], acc[j] = vint{};
  int64_t k = 0;
  for (; k + LANES <= packed; k += LANES) {
    vint v;
    std::memcpy(&v, buffer + k, sizeof(v));
    for (int j = 0; j < P; ++j) acc[j] -= (v >= pv[j]);
  }
  for (int j = 0; j < P; ++j) {
    int64_t c = probe[j] > B ? above_c : above_b;
    if (probe[j] <= B) {
      for (int64_t l = 0; l < LANES; ++l) c += acc[j][l];
      for (int64_t t = k; t < packed; ++t) c += buffer[t] >= probe[j];
    }
    for (int64_t t = i; t < stop; ++t) c += score_one<RANDOM>(piece, row + t, q0 + t) >= probe[j];
    mine[j] += c;
  }
  return true;
}
#endif

template <int P, bool RANDOM>
void count_pieces(const std::vector<Piece>& ps, const int32_t* probes, int64_t* out) {
  const Items items(ps);
  const int threads = at::get_num_threads();
  const size_t width = ps.size() * P;
  std::vector<int64_t> partial(static_cast<size_t>(threads) * width, 0);
  at::parallel_for(0, items.total(), 1, [&](int64_t begin, int64_t end) {
    int64_t* mine = partial.data() + static_cast<size_t>(at::get_thread_num()) * width;
    size_t k = items.piece_of(begin);
    vint pv[P];
    size_t loaded = SIZE_MAX;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= items.first[k + 1]) ++k;
      const Piece& p = ps[k];
      const int32_t* probe = probes + k * P;
      if (loaded != k) {
        for (int j = 0; j < P; ++j) pv[j] = vint{} + probe[j];
        loaded = k;
      }
      const int64_t local = item - items.first[k];
      const int64_t r = local / items.per_row[k];
      const int64_t start = (local % items.per_row[k]) * ITEM, stop = std::min(p.cols, start + ITEM);
      const float* row = p.data + r * p.stride;
      const int64_t q0 = p.offset + r * p.stride;
#ifdef __AVX512F__
      if (count_item_packed<P, RANDOM>(p, row, q0, start, stop, probe, mine + k * P)) continue;
#endif
      vint acc[P];
      for (int j = 0; j < P; ++j) acc[j] = vint{};
      int64_t i = start;
      for (; i + LANES <= stop; i += LANES) {
        const vint b = score_vec<RANDOM>(p, row + i, q0 + i);
        for (int j = 0; j < P; ++j) acc[j] -= (b >= pv[j]);  // a true comparison is -1
      }
      for (int j = 0; j < P; ++j) {
        int64_t c = 0;
        for (int64_t l = 0; l < LANES; ++l) c += acc[j][l];
        for (int64_t t = i; t < stop; ++t) c += score_one<RANDOM>(p, row + t, q0 + t) >= probe[j];
        mine[k * P + j] += c;
      }
    }
  });
  for (size_t w = 0; w < width; ++w) {
    int64_t c = 0;
    for (int t = 0; t < threads; ++t) c += partial[static_cast<size_t>(t) * width + w];
    out[w] = c;
  }
}

using CountPiecesFn = void (*)(const std::vector<Piece>&, const int32_t*, int64_t*);

template <int... Ps>
struct CountTable {
  static constexpr CountPiecesFn magnitude[sizeof...(Ps)] = {&count_pieces<Ps, false>...};
  static constexpr CountPiecesFn random[sizeof...(Ps)] = {&count_pieces<Ps, true>...};
};
using Counts = CountTable<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>;

// update mode (mask_many_aside): where the masking pass keeps piece k's weights of the entries it
// zeroes (score < lo), for restore_items (masked_weights.cpp) to write back after the optimizer step.
struct Aside {
  const float* weight = nullptr;  // null: nothing kept for this piece
  uint16_t* words = nullptr;      // bit i % 16 of words[i / 16]: entry i was zeroed
  float* values = nullptr;        // the zeroed entries' weights, a work item's after another's
  int32_t* starts = nullptr;      // per work item of the piece: where its values start (-1: no room)
  int64_t capacity = 0;           // values' room
};

// The kept weights of one work item, packed in order in `local`; how many. With AVX-512 the bits come
// straight off the comparison masks, and 16 weights are compressed in a register at a time.
struct Keeper {
  const float* __restrict weight;
  uint16_t* __restrict words;
  float* __restrict local;
  int64_t held = 0;
  inline void lanes(int64_t i, uint32_t zeroed, int64_t count) {  // entries i .. i + count - 1 (<= 16)
    words[i / LANES] = static_cast<uint16_t>(zeroed);
#ifdef __AVX512F__
    if (count == LANES) {
      const __m512 packed = _mm512_maskz_compress_ps(static_cast<__mmask16>(zeroed), _mm512_loadu_ps(weight + i));
      _mm512_storeu_ps(local + held, packed);
      held += __builtin_popcount(zeroed);
      return;
    }
#endif
    for (; zeroed; zeroed &= zeroed - 1) local[held++] = weight[i + __builtin_ctz(zeroed)];
  }
};

// dst[0, count) = src[0, count): whole cache lines with non-temporal stores where the CPU has AVX-512
// (the packed weights are not read again before the optimizer step; ~1 ms less per 33.75M entries).
inline void copy_out(float* dst, const float* src, int64_t count) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j < count && (reinterpret_cast<uintptr_t>(dst + j) & 63); ++j) dst[j] = src[j];
  for (; j + LANES <= count; j += LANES) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#endif
  for (; j < count; ++j) dst[j] = src[j];
}

template <bool RANDOM, bool ASIDE>
void mask_pieces(const std::vector<Piece>& ps, const int64_t* lo, const int64_t* hi,
                 std::vector<std::vector<int64_t>>& pos, std::vector<std::vector<int64_t>>& val, const Items& items,
                 const std::vector<Aside>& asides, std::vector<std::atomic<int64_t>>& used) {
  at::parallel_for(0, items.total(), 1, [&](int64_t begin, int64_t end) {
    size_t k = items.piece_of(begin);
    alignas(64) float local[ASIDE ? ITEM + LANES : 1];
    for (int64_t item = begin; item < end; ++item) {
      while (item >= items.first[k + 1]) ++k;
      const Piece& p = ps[k];
      float* data = p.data;
      const bool aside = ASIDE && asides[k].weight != nullptr;
      Keeper keeper{aside ? asides[k].weight : nullptr, aside ? asides[k].words : nullptr, local};
      const int32_t lo32 = static_cast<int32_t>(std::min<int64_t>(lo[k], INT32_MAX));
      const int32_t hi32 = static_cast<int32_t>(std::min<int64_t>(hi[k], INT32_MAX));
      const int64_t start = (item - items.first[k]) * ITEM, stop = std::min(p.cols, start + ITEM);
      auto& mp = pos[item];
      auto& mv = val[item];
      int64_t i = start;
#ifdef __AVX512F__
      {  // the comparisons give bit masks: the candidates' lanes are read off them
        const __m512i lo512 = _mm512_set1_epi32(lo32), hi512 = _mm512_set1_epi32(hi32);
        const __m512i abs512 = _mm512_set1_epi32(ABS);
        alignas(64) int32_t lanes[LANES];
        for (; i + LANES <= stop; i += LANES) {
          _mm_prefetch(reinterpret_cast<const char*>(data + i + PREFETCH), _MM_HINT_T0);
          const __m512i raw = _mm512_loadu_si512(data + i);
          __m512i b;
          if constexpr (RANDOM) b = (__m512i)score_vec<true>(p, data + i, p.offset + i);
          else b = _mm512_and_si512(raw, abs512);
          const __mmask16 keep = _mm512_cmpge_epi32_mask(b, lo512);
          _mm512_storeu_si512(data + i, _mm512_maskz_mov_epi32(keep, raw));
          if (ASIDE && aside) keeper.lanes(i, static_cast<uint16_t>(~keep), LANES);
          unsigned inside = _mm512_mask_cmplt_epi32_mask(keep, b, hi512);
          if (inside) _mm512_store_si512(lanes, b);
          while (inside) {
            const int l = __builtin_ctz(inside);
            inside &= inside - 1;
            mp.push_back(i + l);
            mv.push_back(lanes[l]);
          }
        }
      }
#endif
      const vint lov = vint{} + lo32, hiv = vint{} + hi32;
      for (; i + BLOCK <= stop; i += BLOCK) {
        vint seen = vint{};
        for (int64_t v = i; v < i + BLOCK; v += LANES) {
          vint raw;
          std::memcpy(&raw, data + v, sizeof(raw));
          const vint b = score_vec<RANDOM>(p, data + v, p.offset + v);
          const vint keep = b >= lov;  // -1 where kept
          const vint out = raw & keep;
          std::memcpy(data + v, &out, sizeof(out));
          seen |= keep & (b < hiv);
          if (ASIDE && aside) {
            uint32_t zeroed = 0;
            for (int64_t l = 0; l < LANES; ++l) zeroed |= static_cast<uint32_t>(keep[l] == 0) << l;
            keeper.lanes(v, zeroed, LANES);
          }
        }
        int32_t any = 0;
        for (int64_t l = 0; l < LANES; ++l) any |= seen[l];
        if (any) {  // rescan the block: kept entries are unchanged, so their scores are still there
          for (int64_t t = i; t < i + BLOCK; ++t) {
            const int32_t b = score_one<RANDOM>(p, data + t, p.offset + t);
            if (b >= lo32 && b < hi32) {
              mp.push_back(t);
              mv.push_back(b);
            }
          }
        }
      }
      for (; i < stop; i += LANES) {  // the last entries (i is a multiple of LANES)
        const int64_t count = std::min<int64_t>(LANES, stop - i);
        uint32_t zeroed = 0;
        for (int64_t l = 0; l < count; ++l) {
          const int32_t b = score_one<RANDOM>(p, data + i + l, p.offset + i + l);
          if (b < lo32) {
            data[i + l] = 0.0f;
            zeroed |= 1u << l;
          } else if (b < hi32) {
            mp.push_back(i + l);
            mv.push_back(b);
          }
        }
        if (ASIDE && aside) keeper.lanes(i, zeroed, count);
      }
      if (ASIDE && aside) {  // the item's weights go where the piece's room says: items in any order
        const Aside& a = asides[k];
        const int64_t at = used[k].fetch_add(keeper.held, std::memory_order_relaxed);
        const bool room = at + keeper.held <= a.capacity;
        if (room) copy_out(a.values + at, local, keeper.held);
        a.starts[item - items.first[k]] = room ? static_cast<int32_t>(at) : -1;
      }
    }
#ifdef __AVX512F__
    if (ASIDE) _mm_sfence();  // the non-temporal stores are visible before the pass returns
#endif
  });
}

}  // namespace

// int64 [pieces, P]: per piece, the entries whose score is >= each of its probes (int32 [pieces, P]).
torch::Tensor count_many(std::vector<torch::Tensor> xs, torch::Tensor keys, torch::Tensor offsets,
                         torch::Tensor probes) {
  const auto ps = pieces_of(xs, keys, offsets, true);
  TORCH_CHECK(probes.scalar_type() == torch::kInt32 && probes.dim() == 2 && probes.is_contiguous() &&
                  probes.size(0) == (int64_t)ps.size(),
              "count_many: int32 probes [pieces, P]");
  const int P = static_cast<int>(probes.size(1));
  TORCH_CHECK(P >= 1 && P <= MAX_PROBES, "count_many: 1 to 16 probes");
  auto out = torch::zeros({(int64_t)ps.size(), P}, torch::kInt64);
  if (!ps.empty()) {
    const auto fn = keys.numel() ? Counts::random[P - 1] : Counts::magnitude[P - 1];
    fn(ps, probes.data_ptr<int32_t>(), out.data_ptr<int64_t>());
  }
  return out;
}

namespace {

std::vector<torch::Tensor> mask_with(const std::vector<torch::Tensor>& xs, const torch::Tensor& keys,
                                     const torch::Tensor& offsets, const torch::Tensor& lo, const torch::Tensor& hi,
                                     const std::vector<Aside>& asides, torch::Tensor* held) {
  const auto ps = pieces_of(xs, keys, offsets, false);
  TORCH_CHECK(lo.scalar_type() == torch::kInt64 && hi.scalar_type() == torch::kInt64 && lo.is_contiguous() &&
                  hi.is_contiguous() && lo.numel() == (int64_t)ps.size() && hi.numel() == (int64_t)ps.size(),
              "mask_many: int64 lo and hi per piece");
  const Items items(ps);
  std::vector<std::vector<int64_t>> pos(static_cast<size_t>(items.total())), val(static_cast<size_t>(items.total()));
  std::vector<std::atomic<int64_t>> used(asides.size());
  for (auto& u : used) u.store(0);
  const int64_t* lp = lo.data_ptr<int64_t>();
  const int64_t* hp = hi.data_ptr<int64_t>();
  if (asides.empty()) {
    if (keys.numel()) mask_pieces<true, false>(ps, lp, hp, pos, val, items, asides, used);
    else mask_pieces<false, false>(ps, lp, hp, pos, val, items, asides, used);
  } else {
    if (keys.numel()) mask_pieces<true, true>(ps, lp, hp, pos, val, items, asides, used);
    else mask_pieces<false, true>(ps, lp, hp, pos, val, items, asides, used);
    *held = torch::full({(int64_t)ps.size()}, -1, torch::kInt64);
    int64_t* h = held->data_ptr<int64_t>();
    for (size_t k = 0; k < ps.size(); ++k) {
      if (!asides[k].weight) continue;
      const int64_t n_items = items.first[k + 1] - items.first[k];
      bool room = true;
      for (int64_t j = 0; j < n_items; ++j) room = room && asides[k].starts[j] >= 0;
      h[k] = room ? used[k].load() : -1;
    }
  }
  auto counts = torch::zeros({(int64_t)ps.size()}, torch::kInt64);
  int64_t* cp = counts.data_ptr<int64_t>();
  int64_t total = 0;
  for (size_t k = 0; k < ps.size(); ++k)
    for (int64_t item = items.first[k]; item < items.first[k + 1]; ++item) cp[k] += (int64_t)pos[item].size();
  for (size_t k = 0; k < ps.size(); ++k) total += cp[k];
  auto positions = torch::empty({total}, torch::kInt64);
  auto values = torch::empty({total}, torch::kInt64);
  int64_t* pp = positions.data_ptr<int64_t>();
  int64_t* vp = values.data_ptr<int64_t>();
  for (size_t item = 0; item < pos.size(); ++item) {
    std::copy(pos[item].begin(), pos[item].end(), pp);
    std::copy(val[item].begin(), val[item].end(), vp);
    pp += pos[item].size();
    vp += val[item].size();
  }
  return {positions, values, counts};
}

}  // namespace

// In place on every piece (1-D): zero the entries whose score is < lo[k]. Returns the positions inside
// their piece and the scores (both int64) of the entries in [lo[k], hi[k]), piece after piece in
// ascending position, and how many each piece gave.
std::vector<torch::Tensor> mask_many(std::vector<torch::Tensor> xs, torch::Tensor keys, torch::Tensor offsets,
                                     torch::Tensor lo, torch::Tensor hi) {
  return mask_with(xs, keys, offsets, lo, hi, {}, nullptr);
}

// mask_many, and (update mode) the weights of the entries it zeroes kept aside in the same pass: for
// piece k with a weight (1-D fp32 of the piece's size; an empty tensor: nothing kept), one bit per
// entry in words[k] (int16, (n + 15) / 16), the weights in values[k] (fp32; its size is the room)
// work item by work item, each item's start in starts[k] (int32, one per ITEM entries; pieces
// hold fewer than 2^31 entries). Returns
// mask_many's three tensors and, per piece, how many weights it kept (-1: none kept, or no room).
std::vector<torch::Tensor> mask_many_aside(std::vector<torch::Tensor> xs, torch::Tensor keys, torch::Tensor offsets,
                                           torch::Tensor lo, torch::Tensor hi, std::vector<torch::Tensor> weights,
                                           std::vector<torch::Tensor> words, std::vector<torch::Tensor> values,
                                           std::vector<torch::Tensor> starts) {
  TORCH_CHECK(weights.size() == xs.size() && words.size() == xs.size() && values.size() == xs.size() &&
                  starts.size() == xs.size(), "mask_many_aside: one weight, words, values and starts per piece");
  std::vector<Aside> asides(xs.size());
  for (size_t k = 0; k < xs.size(); ++k) {
    const int64_t n = xs[k].numel();
    if (weights[k].numel() == 0 || n == 0) continue;
    TORCH_CHECK(weights[k].device().is_cpu() && weights[k].scalar_type() == torch::kFloat32 &&
                    weights[k].is_contiguous() && weights[k].numel() == n,
                "mask_many_aside: weights must be contiguous fp32 CPU tensors of their piece's size");
    TORCH_CHECK(words[k].scalar_type() == torch::kInt16 && words[k].is_contiguous() && words[k].numel() >= (n + 15) / 16,
                "mask_many_aside: int16 words, one per 16 entries");
    TORCH_CHECK(values[k].scalar_type() == torch::kFloat32 && values[k].is_contiguous(), "mask_many_aside: fp32 values");
    TORCH_CHECK(starts[k].scalar_type() == torch::kInt32 && starts[k].is_contiguous() &&
                    starts[k].numel() >= (n + ITEM - 1) / ITEM && n <= INT32_MAX,
                "mask_many_aside: int32 starts, one per ITEM entries, of a piece under 2^31 entries");
    asides[k] = Aside{weights[k].data_ptr<float>(), reinterpret_cast<uint16_t*>(words[k].data_ptr<int16_t>()),
                      values[k].data_ptr<float>(), starts[k].data_ptr<int32_t>(), values[k].numel()};
  }
  torch::Tensor held;
  auto out = mask_with(xs, keys, offsets, lo, hi, asides, &held);
  out.push_back(held);
  return out;
}

// Per row (unit) r: the scores at ascending positions picks[r, :] (descending order, as a sort would place
// them) of its strided sample: piece k (rows[k] = its row, pieces of a row consecutive) gives its
// entries start[k], start[k] + stride[k], ... Rows of size 0 give 0.
torch::Tensor sample_picks(std::vector<torch::Tensor> xs, torch::Tensor keys, torch::Tensor offsets,
                           torch::Tensor start, torch::Tensor stride, torch::Tensor rows, torch::Tensor picks) {
  const auto ps = pieces_of(xs, keys, offsets, false);
  const int64_t n_rows = picks.size(0), P = picks.size(1);
  TORCH_CHECK(picks.scalar_type() == torch::kInt64 && picks.is_contiguous() && rows.scalar_type() == torch::kInt64 &&
                  start.scalar_type() == torch::kInt64 && stride.scalar_type() == torch::kInt64,
              "sample_picks: int64 arguments");
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* tp = stride.data_ptr<int64_t>();
  const int64_t* pk = picks.data_ptr<int64_t>();
  std::vector<int64_t> first(static_cast<size_t>(n_rows + 1), (int64_t)ps.size());
  for (int64_t k = (int64_t)ps.size() - 1; k >= 0; --k) first[rp[k]] = k;
  for (int64_t r = n_rows - 1; r >= 0; --r) first[r] = std::min(first[r], first[r + 1]);
  auto out = torch::zeros({n_rows, P}, torch::kInt64);
  int64_t* op = out.data_ptr<int64_t>();
  const bool random = keys.numel() > 0;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> sample;
    for (int64_t r = begin; r < end; ++r) {
      sample.clear();
      for (int64_t k = first[r]; k < first[r + 1]; ++k) {
        const Piece& p = ps[k];
        if (random) {
          for (int64_t i = sp[k]; i < p.cols; i += tp[k]) sample.push_back(random_bits(p.k1, p.k2, p.offset + i));
        } else {  // one cache line per entry: fetch a few strides ahead
          const int64_t ahead = 16 * tp[k];
          for (int64_t i = sp[k]; i < p.cols; i += tp[k]) {
            if (i + ahead < p.cols) __builtin_prefetch(p.data + i + ahead);
            sample.push_back(bits_of(p.data[i]));
          }
        }
      }
      if (sample.empty()) continue;
      // the picks lie close together: place the first and the last, then sort what lies between
      const int64_t last = (int64_t)sample.size() - 1;
      const int64_t lo = std::min(pk[r * P], last), hi = std::min(pk[r * P + P - 1], last);
      std::nth_element(sample.begin(), sample.begin() + lo, sample.end(), std::greater<int32_t>());
      if (hi > lo) {
        std::nth_element(sample.begin() + lo + 1, sample.begin() + hi, sample.end(), std::greater<int32_t>());
        std::sort(sample.begin() + lo + 1, sample.begin() + hi, std::greater<int32_t>());
      }
      for (int64_t j = 0; j < P; ++j) op[r * P + j] = sample[std::min(pk[r * P + j], last)];
    }
  });
  return out;
}

// Per segment s of `values` (counts[s] values, one after the other): its need[s]-th largest value.
torch::Tensor kth_largest_many(torch::Tensor values, torch::Tensor counts, torch::Tensor need) {
  TORCH_CHECK(values.scalar_type() == torch::kInt64 && counts.scalar_type() == torch::kInt64 &&
                  need.scalar_type() == torch::kInt64 && values.is_contiguous(),
              "kth_largest_many: int64 arguments");
  const int64_t segments = counts.numel();
  std::vector<int64_t> first(static_cast<size_t>(segments + 1), 0);
  for (int64_t s = 0; s < segments; ++s) first[s + 1] = first[s] + counts.data_ptr<int64_t>()[s];
  TORCH_CHECK(first.back() == values.numel(), "kth_largest_many: counts do not add up");
  auto out = torch::zeros({segments}, torch::kInt64);
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t* vp = values.data_ptr<int64_t>();
  const int64_t* np = need.data_ptr<int64_t>();
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> work;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t n = first[s + 1] - first[s];
      TORCH_CHECK(np[s] >= 1 && np[s] <= n, "kth_largest_many: need outside 1..count");
      work.assign(vp + first[s], vp + first[s + 1]);
      std::nth_element(work.begin(), work.begin() + (np[s] - 1), work.end(), std::greater<int64_t>());
      op[s] = work[np[s] - 1];
    }
  });
  return out;
}

// Piece after piece (counts[k] candidates each, as mask_many returns them): zero the candidates whose
// score is below threshold[k]. Returns, per piece, how many candidates it keeps.
torch::Tensor zero_below_many(std::vector<torch::Tensor> xs, torch::Tensor counts, torch::Tensor positions,
                              torch::Tensor values, torch::Tensor threshold) {
  const int64_t n = (int64_t)xs.size();
  TORCH_CHECK(counts.numel() == n && threshold.numel() == n && positions.is_contiguous() && values.is_contiguous(),
              "zero_below_many: one count and threshold per piece");
  std::vector<int64_t> first(static_cast<size_t>(n + 1), 0);
  for (int64_t k = 0; k < n; ++k) first[k + 1] = first[k] + counts.data_ptr<int64_t>()[k];
  auto kept = torch::zeros({n}, torch::kInt64);
  int64_t* kp = kept.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const int64_t* vp = values.data_ptr<int64_t>();
  const int64_t* tp = threshold.data_ptr<int64_t>();
  std::vector<float*> data(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) data[k] = first[k + 1] > first[k] ? xs[k].data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      for (int64_t c = first[k]; c < first[k + 1]; ++c) {
        if (vp[c] < tp[k]) data[k][pp[c]] = 0.0f;
        else ++kp[k];
      }
    }
  });
  return kept;
}

// out (int32, contiguous): the random scores' bit patterns of positions offset, offset + 1, ...
void random_fill(torch::Tensor out, int64_t key, int64_t offset) {
  TORCH_CHECK(out.scalar_type() == torch::kInt32 && out.is_contiguous() && out.device().is_cpu(),
              "random_fill: int32 CPU tensor");
  const uint32_t k1 = static_cast<uint32_t>(key), k2 = static_cast<uint32_t>(static_cast<uint64_t>(key) >> 32);
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, out.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + LANES <= end; i += LANES) {
      const vint b = random_bits_vec(k1, k2, offset + i);
      std::memcpy(o + i, &b, sizeof(b));
    }
    for (; i < end; ++i) o[i] = random_bits(k1, k2, offset + i);
  });
}

void bind_masked_weights(pybind11::module_& m);  // masked_weights.cpp: update mode's other kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("count_many", &count_many, "per piece, entries with scores >= each of its probes");
  m.def("mask_many", &mask_many, "per piece, zero below lo in place; the entries in [lo, hi)");
  m.def("mask_many_aside", &mask_many_aside, "mask_many, keeping the zeroed entries' weights aside");
  m.attr("ITEM") = ITEM;
  bind_masked_weights(m);
  m.def("sample_picks", &sample_picks, "per row, order statistics of a strided sample");
  m.def("kth_largest_many", &kth_largest_many, "per segment, its k-th largest value");
  m.def("random_fill", &random_fill, "random scores of consecutive positions");
  m.def("zero_below_many", &zero_below_many, "per piece, zero the candidates below its threshold");
}
