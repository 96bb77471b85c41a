// Batch-invariant CPU kernels for mtpdraft (AVX2 + FMA).
//
// Every output element is computed by exactly the same sequence of floating
// point operations whatever the number of rows processed together, so a row's
// result is bit-identical for any N (and any content of the other rows).
// Register blocking over several rows only changes which independent dot
// products run side by side, never the arithmetic of one dot product.
//
// Compiled with -ffp-contract=off so that the compiler never fuses scalar
// operations differently in different code paths.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mtpdraft_layer_fns.h"

namespace {

inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);                 // 4 lanes
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));        // 2 lanes
  s = _mm_add_ss(s, _mm_movehdup_ps(s));         // 1 lane
  return _mm_cvtss_f32(s);
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// 8 consecutive bf16 -> 8 fp32
inline __m256 load8_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Tuning knobs (do not affect results, only speed).
int64_t g_pf_rows = 8;  // software prefetch distance in weight rows (0 = off)
int64_t g_ob = 48;      // output rows per cache block (rounded to a multiple of 24)
int64_t g_pf_bytes = 1024;  // packed GEMV: software prefetch distance in bytes (0 = off)
int64_t g_pf_blocks = 1;  // packed GEMV, 2+ rows: prefetch this many blocks ahead (0 = off)

// ---------------------------------------------------------------------------
// linear, fp32 weights.
// dot(x, w) = hsum8( sum over 8-chunks, sequential FMA into one accumulator )
//             then scalar FMA tail for K % 8.
// ---------------------------------------------------------------------------
template <int MR, int NR>
inline void kern_f32(const float* __restrict w, int64_t ldw, const float* __restrict x,
                     int64_t ldx, int64_t K, float* __restrict y, int64_t ldy, int64_t pf) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    if (pf && (k & 15) == 0)
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + i * ldw + k + pf), _MM_HINT_T0);
    __m256 wv[MR];
    for (int i = 0; i < MR; ++i) wv[i] = _mm256_loadu_ps(w + i * ldw + k);
    for (int j = 0; j < NR; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + j * ldx + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum8(acc[i][j]);
      for (int64_t k = K8; k < K; ++k) s = std::fma(x[j * ldx + k], w[i * ldw + k], s);
      y[j * ldy + i] = s;
    }
}

// ---------------------------------------------------------------------------
// linear, bf16 weights.  A 256-bit load of 16 bf16 holds elements (2l, 2l+1)
// in 32-bit lane l: "<< 16" gives the even elements as fp32, "& 0xffff0000"
// the odd ones.  x is pre-permuted per 16-chunk (8 even, then 8 odd), so
// dot = hsum8( sequential FMA: even half, odd half, next chunk ... ) + scalar
// FMA tail for K % 16.  The order depends only on K.
// ---------------------------------------------------------------------------
template <int MR, int NR>
inline void kern_bf16(const uint16_t* __restrict w, int64_t ldw, const float* __restrict xp,
                      int64_t ldx, int64_t K, float* __restrict y, int64_t ldy, int64_t pf) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t k = 0; k < K16; k += 16) {
    if (pf && (k & 31) == 0)
      for (int i = 0; i < MR; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + i * ldw + k + pf), _MM_HINT_T0);
    __m256 wv[MR];
    for (int i = 0; i < MR; ++i)
      wv[i] = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw + k)), 16));
    for (int j = 0; j < NR; ++j) {
      const __m256 xv = _mm256_loadu_ps(xp + j * ldx + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
    for (int i = 0; i < MR; ++i)
      wv[i] = _mm256_castsi256_ps(
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw + k)), hi_mask));
    for (int j = 0; j < NR; ++j) {
      const __m256 xv = _mm256_loadu_ps(xp + j * ldx + k + 8);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum8(acc[i][j]);
      for (int64_t k = K16; k < K; ++k)
        s = std::fma(xp[j * ldx + k], bf16_to_f32(w[i * ldw + k]), s);
      y[j * ldy + i] = s;
    }
}

template <int NR>
constexpr int mr_for() {
  return NR == 1 ? 8 : NR == 2 ? 6 : NR == 3 ? 4 : 3;
}

template <typename WT, int MR, int NR>
inline void kern(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* y,
                 int64_t ldy, int64_t pf) {
  if constexpr (std::is_same<WT, uint16_t>::value)
    kern_bf16<MR, NR>(w, ldw, x, ldx, K, y, ldy, pf);
  else
    kern_f32<MR, NR>(w, ldw, x, ldx, K, y, ldy, pf);
}

template <typename WT, int NR>
inline void run_rows(const WT* w, int64_t K, const float* x, int64_t ldx, float* y,
                     int64_t ldy, int64_t o0, int64_t o1, int64_t O, int64_t pf_rows) {
  constexpr int MR = mr_for<NR>();
  int64_t o = o0;
  for (; o + MR <= o1; o += MR) {
    // prefetch only while the prefetched rows exist
    const int64_t pf = (pf_rows > 0 && o + MR + pf_rows <= O) ? pf_rows * K : 0;
    kern<WT, MR, NR>(w + o * K, K, x, ldx, K, y + o, ldy, pf);
  }
  for (; o < o1; ++o) kern<WT, 1, NR>(w + o * K, K, x, ldx, K, y + o, ldy, 0);
}

template <typename WT>
void linear_impl(const WT* w, const float* x, float* y, int64_t N, int64_t K, int64_t O) {
  const int64_t ob = std::max<int64_t>(24, (g_ob + 23) / 24 * 24);
  const int64_t nblocks = (O + ob - 1) / ob;
  const int64_t bytes_per_block = ob * K * static_cast<int64_t>(sizeof(WT)) * std::max<int64_t>(N, 1);
  // at least ~128 KB of (weight bytes x rows) per task so tiny calls stay on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(bytes_per_block, 1));
  const int64_t pf_rows = g_pf_rows;
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * ob, o1 = std::min(O, o0 + ob);
      int64_t n = 0;
      // the first pass over a block streams it from memory (prefetch on); later passes hit cache
      for (; n + 4 <= N; n += 4)
        run_rows<WT, 4>(w, K, x + n * K, K, y + n * O, O, o0, o1, O, n == 0 ? pf_rows : 0);
      const int64_t pf = n == 0 ? pf_rows : 0;
      switch (N - n) {
        case 3: run_rows<WT, 3>(w, K, x + n * K, K, y + n * O, O, o0, o1, O, pf); break;
        case 2: run_rows<WT, 2>(w, K, x + n * K, K, y + n * O, O, o0, o1, O, pf); break;
        case 1: run_rows<WT, 1>(w, K, x + n * K, K, y + n * O, O, o0, o1, O, pf); break;
        default: break;
      }
    }
  });
}


// ---------------------------------------------------------------------------
// linear over a packed weight.  Row-major [O, K] weights make a GEMV read 8
// rows side by side, i.e. 8 memory streams 2*K bytes apart, which this CPU's
// prefetchers follow at only ~19 of ~26 GB/s.  Packed, the 4 rows of a block
// are interleaved per 32-byte chunk ([O/4][K/kc][4][kc]) and read as one
// sequential stream.  Each dot product keeps exactly the arithmetic of
// kern_bf16 / kern_f32 above (K is a multiple of the chunk), so packed and
// unpacked results are bit-identical.
// ---------------------------------------------------------------------------
constexpr int kPackRows = 4;

template <typename WT>
constexpr int64_t pack_chunk() { return std::is_same<WT, uint16_t>::value ? 16 : 8; }

// the kPackRows rows of one packed block against NR x rows; pf: prefetch this many
// bytes ahead (the pass that streams the weights from memory), 0 = none
template <typename WT, int NR>
inline void kern_packed(const WT* __restrict wb, const float* __restrict x, int64_t ldx, int64_t K,
                        float* __restrict y, int64_t ldy, int64_t pf) {
  constexpr int MR = kPackRows;
  constexpr int64_t kc = pack_chunk<WT>();
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += kc) {
    const WT* wc = wb + (k / kc) * kPackRows * kc;
    if (pf) {  // one chunk group = kPackRows * 32 bytes = 2 cache lines
      _mm_prefetch(reinterpret_cast<const char*>(wc) + pf, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wc) + pf + 64, _MM_HINT_T0);
    }
    if constexpr (std::is_same<WT, uint16_t>::value) {
      __m256 wv[MR];
      for (int i = 0; i < MR; ++i)
        wv[i] = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + i * kc)), 16));
      for (int j = 0; j < NR; ++j) {
        const __m256 xv = _mm256_loadu_ps(x + j * ldx + k);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
      }
      for (int i = 0; i < MR; ++i)
        wv[i] = _mm256_castsi256_ps(
            _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + i * kc)), hi_mask));
      for (int j = 0; j < NR; ++j) {
        const __m256 xv = _mm256_loadu_ps(x + j * ldx + k + 8);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
      }
    } else {
      __m256 wv[MR];
      for (int i = 0; i < MR; ++i) wv[i] = _mm256_loadu_ps(wc + i * kc);
      for (int j = 0; j < NR; ++j) {
        const __m256 xv = _mm256_loadu_ps(x + j * ldx + k);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[j * ldy + i] = hsum8(acc[i][j]);
}

// packed blocks b0..b1 (kPackRows rows each) against NR x rows; outputs beyond O are dropped
template <typename WT, int NR>
inline void run_packed(const WT* wp, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy,
                       int64_t b0, int64_t b1, int64_t O, int64_t pf) {
  const int64_t block = K * kPackRows;
  alignas(32) float tmp[NR * kPackRows];
  for (int64_t b = b0; b < b1; ++b) {
    const bool full = (b + 1) * kPackRows <= O;
    float* yb = full ? y + b * kPackRows : tmp;
    const int64_t ld = full ? ldy : kPackRows;
    kern_packed<WT, NR>(wp + b * block, x, ldx, K, yb, ld, (b + 1) * kPackRows < O ? pf : 0);
    if (!full)
      for (int j = 0; j < NR; ++j)
        for (int64_t o = b * kPackRows; o < O; ++o) y[j * ldy + o] = tmp[j * kPackRows + o - b * kPackRows];
  }
}

// rows i0, i0+1 of one packed block against NR x rows (NR <= 6: 12 accumulators
// + 3 scratch registers).  Per accumulator the arithmetic is that of kern_bf16 /
// kern_f32 (per chunk: even half, then odd half), so the bits are the same.
// With several x rows the work per weight byte is high enough that memory and
// compute must overlap: each call prefetches its share (pf_lines cache lines at
// pf) of a block further ahead, spread over its iterations.
template <typename WT, int NR>
inline void kern_packed_half(const WT* __restrict wb, int i0, const float* __restrict x, int64_t ldx,
                             int64_t K, float* __restrict y, int64_t ldy, const char* pf, int64_t pf_lines) {
  constexpr int MR = 2;
  constexpr int64_t kc = pack_chunk<WT>();
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0, t = 0; k < K; k += kc, ++t) {
    if (t < pf_lines) _mm_prefetch(pf + 64 * t, _MM_HINT_T0);
    const WT* wg = wb + (k / kc) * kPackRows * kc;
    for (int i = 0; i < MR; ++i) {
      const WT* wc = wg + (i0 + i) * kc;
      if constexpr (std::is_same<WT, uint16_t>::value) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc));
        const __m256 ev = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(ev, _mm256_loadu_ps(x + j * ldx + k), acc[i][j]);
        const __m256 od = _mm256_castsi256_ps(_mm256_and_si256(raw, hi_mask));
        for (int j = 0; j < NR; ++j)
          acc[i][j] = _mm256_fmadd_ps(od, _mm256_loadu_ps(x + j * ldx + k + 8), acc[i][j]);
      } else {
        const __m256 wv = _mm256_loadu_ps(wc);
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * ldx + k), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[j * ldy + i0 + i] = hsum8(acc[i][j]);
}

template <typename WT>
inline void packed_half(int nr, const WT* wb, int i0, const float* x, int64_t ldx, int64_t K, float* y,
                        int64_t ldy, const char* pf, int64_t pf_lines) {
  switch (nr) {
    case 1: kern_packed_half<WT, 1>(wb, i0, x, ldx, K, y, ldy, pf, pf_lines); break;
    case 2: kern_packed_half<WT, 2>(wb, i0, x, ldx, K, y, ldy, pf, pf_lines); break;
    case 3: kern_packed_half<WT, 3>(wb, i0, x, ldx, K, y, ldy, pf, pf_lines); break;
    case 4: kern_packed_half<WT, 4>(wb, i0, x, ldx, K, y, ldy, pf, pf_lines); break;
    case 5: kern_packed_half<WT, 5>(wb, i0, x, ldx, K, y, ldy, pf, pf_lines); break;
    default: kern_packed_half<WT, 6>(wb, i0, x, ldx, K, y, ldy, pf, pf_lines); break;
  }
}

// 2+ rows: each packed block (4 weight rows, 5 KB for K = 640 bf16) stays in L1
// while every x group of <= 6 rows passes over it; meanwhile the calls prefetch
// the block g_pf_blocks ahead (within this task's range b0..b1).  Without that
// prefetch 5 rows took 1.9x one row on the 262k-row head; with it ~1.2x.
template <typename WT>
inline void run_packed_multi(const WT* wp, int64_t K, const float* x, float* y, int64_t N, int64_t b0,
                             int64_t b1, int64_t O) {
  const int64_t block = K * kPackRows;
  const int64_t groups = (N + 5) / 6;  // x rows split as evenly as possible into groups of <= 6
  const int64_t calls = 2 * groups;
  const int64_t lines = (block * static_cast<int64_t>(sizeof(WT)) + 63) / 64;
  const int64_t per_call = (lines + calls - 1) / calls;
  std::vector<float> tmp(static_cast<size_t>(N) * kPackRows);
  for (int64_t b = b0; b < b1; ++b) {
    const bool full = (b + 1) * kPackRows <= O;
    float* yb = full ? y + b * kPackRows : tmp.data();
    const int64_t ld = full ? O : kPackRows;
    const int64_t bp = b + g_pf_blocks;
    const char* pfb = reinterpret_cast<const char*>(wp + bp * block);
    int64_t c = 0;
    for (int half = 0; half < 2; ++half) {
      int64_t n0 = 0;
      for (int64_t g = 0; g < groups; ++g, ++c) {
        const int64_t nr = (N - n0) / (groups - g);
        const int64_t first = c * per_call, cnt = bp < b1 ? std::max<int64_t>(0, std::min(per_call, lines - first)) : 0;
        packed_half<WT>(static_cast<int>(nr), wp + b * block, 2 * half, x + n0 * K, K, K, yb + n0 * ld, ld,
                        pfb + 64 * first, cnt);
        n0 += nr;
      }
    }
    if (!full)
      for (int64_t j = 0; j < N; ++j)
        for (int64_t o = b * kPackRows; o < O; ++o) y[j * O + o] = tmp[j * kPackRows + o - b * kPackRows];
  }
}

template <typename WT>
void linear_packed_impl(const WT* wp, const float* x, float* y, int64_t N, int64_t K, int64_t O) {
  const int64_t nb = (O + kPackRows - 1) / kPackRows;
  const int64_t bpb = std::max<int64_t>(1, g_ob / kPackRows);  // packed blocks per cache block
  const int64_t ncb = (nb + bpb - 1) / bpb;
  const int64_t bytes_per_cb = bpb * kPackRows * K * static_cast<int64_t>(sizeof(WT)) * std::max<int64_t>(N, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(bytes_per_cb, 1));
  at::parallel_for(0, ncb, grain, [&](int64_t c0, int64_t c1) {
    if (N > 1) {  // one stream over the task's blocks (each stays in L1 for all x rows)
      run_packed_multi<WT>(wp, K, x, y, N, c0 * bpb, std::min(nb, c1 * bpb), O);
      return;
    }
    for (int64_t cb = c0; cb < c1; ++cb)
      run_packed<WT, 1>(wp, K, x, K, y, O, cb * bpb, std::min(nb, (cb + 1) * bpb), O, g_pf_bytes);
  });
}

// x [N, K] fp32 -> per 16-chunk permuted copy (8 even elements, then 8 odd): the bf16 kernels' x layout
torch::Tensor permute_x_bf16(const torch::Tensor& x, int64_t N, int64_t K) {
  auto xp = torch::empty_like(x);
  const float* xs = x.data_ptr<float>();
  float* xd = xp.data_ptr<float>();
  const int64_t K16 = K & ~int64_t(15);
  for (int64_t n = 0; n < N; ++n) {
    const float* a = xs + n * K;
    float* b = xd + n * K;
    for (int64_t k = 0; k < K16; k += 16)
      for (int l = 0; l < 8; ++l) {
        b[k + l] = a[k + 2 * l];
        b[k + 8 + l] = a[k + 2 * l + 1];
      }
    for (int64_t k = K16; k < K; ++k) b[k] = a[k];
  }
  return xp;
}

}  // namespace

torch::Tensor linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "linear: x must be [..., K], w [O, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "linear: x must be float32");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "linear: w must be float32 or bfloat16");
  TORCH_CHECK(x.size(-1) == w.size(1), "linear: K mismatch");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t K = x.size(-1), O = w.size(0), N = K ? x.numel() / K : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  auto y = torch::empty(sizes, x.options());
  if (N == 0 || O == 0) return y;
  if (K == 0) return y.zero_();
  if (w.scalar_type() == at::kFloat) {
    linear_impl<float>(w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), N, K, O);
  } else {
    auto xp = permute_x_bf16(x, N, K);
    const float* xd = xp.data_ptr<float>();
    linear_impl<uint16_t>(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xd,
                          y.data_ptr<float>(), N, K, O);
  }
  return y;
}

// ---------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------
namespace {

template <typename KT>
inline __m256 load8(const KT* p);
template <>
inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <>
inline __m256 load8<uint16_t>(const uint16_t* p) { return load8_bf16(p); }
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_f32(v); }

// Vectorized exp (Cephes-style polynomial, ~2 ulp), fixed arithmetic.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_and_ps(y, zero_mask);
}

// lg[j] = exp(lg[j] - m) for j < L; returns their sum (8-lane accumulation in
// chunks of 8, fixed hsum; the last partial chunk is zero-padded).  Depends only on L.
// (j, acc): where to go on from, when the first j were done and added to acc already.
inline float exp_sub_sum(float* lg, int64_t L, float m, int64_t j = 0, __m256 acc = _mm256_setzero_ps()) {
  const __m256 mv = _mm256_set1_ps(m);
  for (; j + 8 <= L; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(lg + j), mv));
    _mm256_storeu_ps(lg + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (j < L) {
    alignas(32) float tmp[8];
    const int64_t r = L - j;
    for (int64_t t = 0; t < 8; ++t) tmp[t] = t < r ? lg[j + t] : m;
    __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(tmp), mv));
    _mm256_store_ps(tmp, e);
    for (int64_t t = r; t < 8; ++t) tmp[t] = 0.f;
    acc = _mm256_add_ps(acc, _mm256_load_ps(tmp));
    for (int64_t t = 0; t < r; ++t) lg[j + t] = tmp[t];
  }
  return hsum8(acc);
}

// HB query heads x JB keys dot products at once (independent FMA chains; each
// dot has exactly the arithmetic of dot_qk<float>). Keys are read in the cache's own
// type (bf16 -> fp32 is exact, so reading it converted or not gives the same bits).
template <int HB, int JB, typename KT>
inline void dots_block(const float* q, int64_t D, const KT* const* kp, float* res /*[HB][JB]*/) {
  __m256 acc[HB][JB];
  for (int h = 0; h < HB; ++h)
    for (int j = 0; j < JB; ++j) acc[h][j] = _mm256_setzero_ps();
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t d = 0; d < D8; d += 8) {
    __m256 kv[JB];
    for (int j = 0; j < JB; ++j) kv[j] = load8<KT>(kp[j] + d);
    for (int h = 0; h < HB; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * D + d);
      for (int j = 0; j < JB; ++j) acc[h][j] = _mm256_fmadd_ps(qv, kv[j], acc[h][j]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int j = 0; j < JB; ++j) {
      float s = hsum8(acc[h][j]);
      for (int64_t d = D8; d < D; ++d) s = std::fma(q[h * D + d], to_f32(kp[j][d]), s);
      res[h * JB + j] = s;
    }
}

// For HB heads of one query row: o[h][d] = sum_j p[h][j] * v_j[d] with the fixed
// per-element sequence acc = fma(p_j, v_j[d], acc), j = 0..L-1 increasing.
template <int HB, int R, typename KT>
inline void pv_chunk(const float* const* prow, int64_t L, const KT* const* vrows, int64_t d0,
                     float* const* orow) {
  __m256 acc[HB][R];
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    __m256 vv[R];
    for (int r = 0; r < R; ++r) vv[r] = load8<KT>(vrows[j] + d0 + 8 * r);
    for (int h = 0; h < HB; ++h) {
      const __m256 pb = _mm256_set1_ps(prow[h][j]);
      for (int r = 0; r < R; ++r) acc[h][r] = _mm256_fmadd_ps(pb, vv[r], acc[h][r]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(orow[h] + d0 + 8 * r, acc[h][r]);
}

// elements d0 .. D of o (d0 > 0: the AVX-512 passes did the first ones; per element the same chain)
template <int HB, typename KT>
inline void pv_heads(const float* const* prow, int64_t L, const KT* const* vrows, int64_t D,
                     float* const* orow, int64_t d0 = 0) {
  int64_t d = d0;
  if constexpr (HB <= 2)
    for (; d + 32 <= D; d += 32) pv_chunk<HB, 4, KT>(prow, L, vrows, d, orow);
  for (; d + 16 <= D; d += 16) pv_chunk<HB, 2, KT>(prow, L, vrows, d, orow);
  for (; d + 8 <= D; d += 8) pv_chunk<HB, 1, KT>(prow, L, vrows, d, orow);
  for (; d < D; ++d)
    for (int h = 0; h < HB; ++h) {
      float a = 0.f;
      for (int64_t j = 0; j < L; ++j) a = std::fma(prow[h][j], to_f32(vrows[j][d]), a);
      orow[h][d] = a;
    }
}


// ---------------------------------------------------------------------------
// AVX-512 passes of attention_impl (chosen at run time where the CPU has AVX-512F/DQ; the
// module itself is built for AVX2). Same arithmetic per output as the AVX2 passes, so the
// same bits: pass 1 holds two query vectors' 8-lane dot accumulators in one zmm (halves
// against the same key, broadcast) and reduces both halves with hsum8's own tree; pass 3
// runs 16 elements of o per register (each element is its own FMA chain over keys).
// Hsums of 4 keys x 2 vectors share one shuffle network, 4 logits are stored at once, and pass
// 2 takes its exps 16 at a time. `python benchmarks/attention.py` (2 threads, Xeon): SmolLM2
// prefill of 2048 tokens 1.57x as fast, 7 positions over 2000 cached 1.48x (200 cached:
// 1.11x); Gemma 3 270M (head dim 256, sliding windows) 1.18x and 1.12x.
// ---------------------------------------------------------------------------
std::atomic<int> g_attn_avx512{-1};  // -1: where the CPU has it; 0: off (AVX2 passes); 1: on

bool attn_avx512_cpu() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

bool attn_avx512() {
  int v = g_attn_avx512.load(std::memory_order_relaxed);
  if (v < 0) {
    v = attn_avx512_cpu() ? 1 : 0;
    g_attn_avx512.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

#define MTP_AVX512_FN __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")))

template <typename KT>
MTP_AVX512_FN inline __m512 load16(const KT* p);
template <>
MTP_AVX512_FN inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
MTP_AVX512_FN inline __m512 load16<uint16_t>(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 8 consecutive values in both halves
template <typename KT>
MTP_AVX512_FN inline __m512 bcast8(const KT* p);
template <>
MTP_AVX512_FN inline __m512 bcast8<float>(const float* p) { return _mm512_broadcast_f32x8(_mm256_loadu_ps(p)); }
template <>
MTP_AVX512_FN inline __m512 bcast8<uint16_t>(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_broadcast_f32x8(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
}

// 4 accumulators (keys j0..j3) of one pair of query vectors -> lanes 0-3: vector a's dots with
// keys j0..j3, lanes 4-7: vector b's. Every dot is hsum8's tree over its 8 lanes
// ((i + i+4), then (i + i+2), then (i + i+1)); the shuffles only bring the operands together.
MTP_AVX512_FN inline __m512 hsum8_pairs4(const __m512* acc) {
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(acc[0], acc[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(acc[0], acc[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2], acc[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(acc[2], acc[3], _MM_SHUFFLE(3, 1, 3, 1)));
  // 128-bit lanes of x: [a j0, b j0, a j1, b j1] (4 partial sums each); of y: the same for j2, j3
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(r, r, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(r, r, _MM_SHUFFLE(3, 1, 3, 1)));
  // t's 128-bit lanes: [a j0, a j2, ..], [b j0, b j2, ..], [a j1, a j3, ..], [b j1, b j3, ..]
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 8, 1, 9, 4, 12, 5, 13, 0, 0, 0, 0, 0, 0, 0, 0), t);
}

// NP pairs of query vectors x 4 keys: out[pp] lanes 0-3 / 4-7 = the two vectors' dots (as dots_block's)
template <int NP, typename KT>
MTP_AVX512_FN inline void dots_pairs(const float* qpack, int64_t D, const KT* const* kp, __m256* out) {
  const int64_t C = (D & ~int64_t(7)) / 8;
  __m512 acc[NP][4];
  for (int pp = 0; pp < NP; ++pp)
    for (int j = 0; j < 4; ++j) acc[pp][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    __m512 kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = bcast8<KT>(kp[j] + 8 * c);
    for (int pp = 0; pp < NP; ++pp) {
      const __m512 qv = _mm512_loadu_ps(qpack + (pp * C + c) * 16);
      for (int j = 0; j < 4; ++j) acc[pp][j] = _mm512_fmadd_ps(qv, kv[j], acc[pp][j]);
    }
  }
  for (int pp = 0; pp < NP; ++pp) out[pp] = _mm512_castps512_ps256(hsum8_pairs4(acc[pp]));
}

// Pass 1 for one task: logits of its nv = nq * nh query vectors (v = ii * nh + h), each over
// its own key range [los[ii], his[ii]]. Vectors go in pairs (a zmm) and groups of up to 3
// pairs; a group runs over the union of its ranges and keeps each vector's own keys.
template <typename KT>
MTP_AVX512_FN void qk_pass_avx512(const float* qtask, int64_t qrow_stride, int64_t nq, int64_t nh, int64_t D,
                                  const int64_t* los, const int64_t* his, int64_t jmin, const KT* const* krows,
                                  float* logits, int64_t Lmax, float scale, float softcap, std::vector<float>& qpack) {
  const int64_t nv = nq * nh, D8 = D & ~int64_t(7), C = D8 / 8;
  auto qvec = [&](int64_t v) { return qtask + (v / nh) * qrow_stride + (v % nh) * D; };
  qpack.resize(static_cast<size_t>(3 * C * 16));
  for (int64_t v0 = 0; v0 < nv; v0 += 6) {
    const int64_t nvg = std::min<int64_t>(6, nv - v0), np = (nvg + 1) / 2;
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (int64_t v = v0; v < v0 + nvg; ++v) {
      const int64_t ii = v / nh;
      if (his[ii] < los[ii]) continue;
      lo = std::min(lo, los[ii]);
      hi = std::max(hi, his[ii]);
    }
    if (hi < lo) continue;
    for (int64_t pp = 0; pp < np; ++pp) {  // pack: pair pp, chunk c -> [vector 2pp chunk c | vector 2pp+1 chunk c]
      const float* a = qvec(v0 + 2 * pp);
      const float* b = 2 * pp + 1 < nvg ? qvec(v0 + 2 * pp + 1) : a;
      for (int64_t c = 0; c < C; ++c) {
        _mm256_storeu_ps(qpack.data() + (pp * C + c) * 16, _mm256_loadu_ps(a + 8 * c));
        _mm256_storeu_ps(qpack.data() + (pp * C + c) * 16 + 8, _mm256_loadu_ps(b + 8 * c));
      }
    }
    for (int64_t j0 = lo; j0 <= hi; j0 += 4) {
      const KT* kp[4];
      for (int jj = 0; jj < 4; ++jj) kp[jj] = krows[std::min(j0 + jj, hi) - jmin];
      alignas(32) float res[6][4];
      __m256 out[3];
      if (np == 3) dots_pairs<3, KT>(qpack.data(), D, kp, out);
      else if (np == 2) dots_pairs<2, KT>(qpack.data(), D, kp, out);
      else dots_pairs<1, KT>(qpack.data(), D, kp, out);
      for (int64_t pp = 0; pp < np; ++pp) _mm256_store_ps(res[2 * pp], out[pp]);
      for (int64_t t = 0; t < nvg; ++t) {
        const int64_t v = v0 + t, ii = v / nh;
        float* lg = logits + v * Lmax;  // lg[j - los[ii]]: key j's logit
        if (D8 == D && softcap <= 0.f && j0 >= los[ii] && j0 + 3 <= his[ii]) {  // the common case, 4 at once
          _mm_storeu_ps(lg + (j0 - los[ii]), _mm_mul_ps(_mm_load_ps(res[t]), _mm_set1_ps(scale)));
          continue;
        }
        const float* qv = qvec(v);
        for (int64_t jj = 0; jj < 4; ++jj) {
          const int64_t j = j0 + jj;
          if (j < los[ii] || j > his[ii]) continue;
          float sv = res[t][jj];
          for (int64_t d = D8; d < D; ++d) sv = std::fma(qv[d], to_f32(kp[jj][d]), sv);
          sv = sv * scale;
          if (softcap > 0.f) sv = softcap * std::tanh(sv / softcap);
          lg[j - los[ii]] = sv;
        }
      }
    }
  }
}

// exp8, 16 lanes at a time: the same operations per element
MTP_AVX512_FN inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                  _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  return _mm512_maskz_mov_ps(keep, y);
}

// Pass 2 of one (row, head): m = the max of lg[0..L) (as the scalar std::max loop: a NaN in
// lg[0] stays, later NaNs are skipped), then exp_sub_sum's values and sum: the exps 16 at a time,
// added to its 8-lane accumulator low half then high half, in its order.
MTP_AVX512_FN float softmax_num_avx512(float* lg, int64_t L) {
  __m512 mv = _mm512_set1_ps(lg[0]);
  int64_t j = 0;
  for (; j + 16 <= L; j += 16) mv = _mm512_max_ps(_mm512_loadu_ps(lg + j), mv);
  float m = lg[0];
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, mv);
  for (int t = 0; t < 16; ++t) m = std::max(m, lanes[t]);
  for (; j < L; ++j) m = std::max(m, lg[j]);
  const __m512 m16 = _mm512_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  j = 0;
  for (; j + 16 <= L; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(lg + j), m16));
    _mm512_storeu_ps(lg + j, e);
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
    acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
  }
  return exp_sub_sum(lg, L, m, j, acc);  // the rest as exp_sub_sum goes on
}

// o[h][d0 .. d0 + 16R) for HB heads of one query row: as pv_chunk, 16 elements a register
template <int HB, int R, typename KT>
MTP_AVX512_FN inline void pv_chunk16(const float* const* prow, int64_t L, const KT* const* vrows, int64_t d0,
                                     float* const* orow) {
  __m512 acc[HB][R];
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    __m512 vv[R];
    for (int r = 0; r < R; ++r) vv[r] = load16<KT>(vrows[j] + d0 + 16 * r);
    for (int h = 0; h < HB; ++h) {
      const __m512 pb = _mm512_set1_ps(prow[h][j]);
      for (int r = 0; r < R; ++r) acc[h][r] = _mm512_fmadd_ps(pb, vv[r], acc[h][r]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(orow[h] + d0 + 16 * r, acc[h][r]);
}

template <int HB, typename KT>
MTP_AVX512_FN void pv_heads_avx512(const float* const* prow, int64_t L, const KT* const* vrows, int64_t D,
                                   float* const* orow) {
  int64_t d = 0;  // up to 6 x 4 accumulators + 4 value registers: 32 zmm registers hold them
  for (; d + 64 <= D; d += 64) pv_chunk16<HB, 4, KT>(prow, L, vrows, d, orow);
  for (; d + 32 <= D; d += 32) pv_chunk16<HB, 2, KT>(prow, L, vrows, d, orow);
  for (; d + 16 <= D; d += 16) pv_chunk16<HB, 1, KT>(prow, L, vrows, d, orow);
  if (d < D) pv_heads<HB, KT>(prow, L, vrows, D, orow, d);  // the last < 16 elements
}

// pass 3 for HB heads of one query row, through either kind of passes
template <int HB, typename KT>
inline void pv_rows(bool avx512, const float* const* prow, int64_t L, const KT* const* vrows, int64_t D,
                    float* const* orow) {
  if (avx512) pv_heads_avx512<HB, KT>(prow, L, vrows, D, orow);
  else pv_heads<HB, KT>(prow, L, vrows, D, orow);
}

// How attention_impl splits its work: query rows into qsplit blocks and each kv head's G
// query heads into hsplit blocks. at::parallel_for hands each thread one contiguous run of
// tasks, so with fewer (b, kv head) pairs than ~4 per thread it simulates those runs and
// takes the split whose busiest thread has the least work (a task costs its query rows x
// heads, plus half a unit for reading its keys and values). E.g. SmolLM2 (3 kv heads), 2
// threads, 7 rows: 3 tasks ran as 2 + 1; 6 tasks of up to 4 rows run as ~11 + 10 row-heads.
// The split never changes any output's arithmetic.
inline void attention_split(int64_t B, int64_t N, int64_t Hkv, int64_t G, int64_t nth, int64_t& qsplit,
                            int64_t& hsplit) {
  qsplit = hsplit = 1;
  if (nth <= 1 || B * Hkv >= 4 * nth) return;
  double best = -1.0;
  int64_t best_tasks = 0;
  for (int64_t qs = 1; qs <= std::min<int64_t>(N, 4 * nth); ++qs) {
    const int64_t QB = (N + qs - 1) / qs, qn = (N + QB - 1) / QB;
    if (qn != qs) continue;  // the same blocks as a smaller qs
    for (int64_t hs = 1; hs <= G; ++hs) {
      const int64_t HB = (G + hs - 1) / hs, hn = (G + HB - 1) / HB;
      if (hn != hs) continue;
      const int64_t tasks = B * Hkv * qn * hn, used = std::min(nth, tasks), chunk = (tasks + used - 1) / used;
      double worst = 0.0, cur = 0.0;
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t h = t % hn, q = (t / hn) % qn;
        const int64_t nq = std::min(N, (q + 1) * QB) - q * QB, nh = std::min(G, (h + 1) * HB) - h * HB;
        cur += static_cast<double>(nq * nh) + 0.5;
        if ((t + 1) % chunk == 0 || t + 1 == tasks) {
          worst = std::max(worst, cur);
          cur = 0.0;
        }
      }
      if (best < 0.0 || worst < best || (worst == best && tasks < best_tasks)) {
        best = worst;
        best_tasks = tasks;
        qsplit = qn;
        hsplit = hn;
      }
    }
  }
}

// One task = (batch b, kv head g, a sub-range of its query heads, a block of query rows).
// Keys/values are read once per task for all its queries.  For each query the
// arithmetic is fixed: logits in increasing key position (8-lane FMA dot, fixed
// hsum), max, exp + sequential sum, then o[d] = fma(p_j, v_j[d], o[d]) for j
// increasing, o[d] / sum.  Tiling never changes that sequence.
template <typename KT>
void attention_impl(const float* q, const KT* kc, const KT* vc, const int64_t* pos, float* out,
                    int64_t B, int64_t N, int64_t H, int64_t Hkv, int64_t D, int64_t C,
                    int64_t window, float scale, float softcap) {
  const int64_t G = H / Hkv;
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  int64_t qsplit, hsplit;
  attention_split(B, N, Hkv, G, nth, qsplit, hsplit);
  const int64_t QB = (N + qsplit - 1) / qsplit;
  const int64_t HB = (G + hsplit - 1) / hsplit;
  const int64_t ntasks = B * Hkv * qsplit * hsplit;
  const bool avx512 = attn_avx512();
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> logits, sums, qpack;
    std::vector<const KT*> krows, vrows;
    std::vector<int64_t> los, his;
    for (int64_t t = t0; t < t1; ++t) {
      int64_t r = t;
      const int64_t hs = r % hsplit; r /= hsplit;
      const int64_t qs = r % qsplit; r /= qsplit;
      const int64_t g = r % Hkv;
      const int64_t b = r / Hkv;
      const int64_t i0 = qs * QB, i1 = std::min(N, i0 + QB);
      const int64_t h0 = g * G + hs * HB, h1 = std::min(g * G + G, h0 + HB);
      const int64_t nh = h1 - h0, nq = i1 - i0;
      if (nq <= 0 || nh <= 0) continue;
      los.resize(nq);
      his.resize(nq);
      int64_t jmin = INT64_MAX, jmax = INT64_MIN, Lmax = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t p = pos[b * N + i];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        los[i - i0] = lo;
        his[i - i0] = p;
        if (p >= lo) {
          jmin = std::min(jmin, lo);
          jmax = std::max(jmax, p);
          Lmax = std::max(Lmax, p - lo + 1);
        }
      }
      // output rows of this task (zero = also the answer for empty ranges)
      for (int64_t i = i0; i < i1; ++i)
        std::fill(out + ((b * N + i) * H + h0) * D, out + ((b * N + i) * H + h1) * D, 0.f);
      if (Lmax == 0) continue;
      logits.resize(static_cast<size_t>(nq * nh * Lmax));
      sums.resize(static_cast<size_t>(nq * nh));
      const KT* kb = kc + (b * C * Hkv + g) * D;
      const KT* vb = vc + (b * C * Hkv + g) * D;
      const int64_t kstride = Hkv * D;
      // the key / value rows jmin..jmax, in the cache's type
      const int64_t J = jmax - jmin + 1;
      krows.resize(J);
      vrows.resize(J);
      for (int64_t j = jmin; j <= jmax; ++j) {
        krows[j - jmin] = kb + (j % C) * kstride;
        vrows[j - jmin] = vb + (j % C) * kstride;
      }
      // The cache rows come cold in a decode step (the weights of every layer stream in
      // between): ask for up to 256 KB of them into L2 at once rather than row by row. Measured
      // on the bundled Gemma 3, 200 cached positions, 2 threads, right after the head:
      // 38-48 -> 29-36 us a layer for one query row. No arithmetic changes.
      const int64_t row_bytes = D * static_cast<int64_t>(sizeof(KT));
      for (int64_t j = 0; j < std::min<int64_t>(J, (int64_t(128) << 10) / row_bytes); ++j) {
        const char* kk = reinterpret_cast<const char*>(krows[j]);
        const char* vv = reinterpret_cast<const char*>(vrows[j]);
        for (int64_t l = 0; l < row_bytes; l += 64) {
          _mm_prefetch(kk + l, _MM_HINT_T1);
          _mm_prefetch(vv + l, _MM_HINT_T1);
        }
      }
      // pass 1: logits (blocks of 4 keys x up to 3 heads; out-of-range keys of a
      // block are computed on a duplicate row and discarded)
      if (avx512) {
        qk_pass_avx512<KT>(q + ((b * N + i0) * H + h0) * D, H * D, nq, nh, D, los.data(), his.data(), jmin,
                           krows.data(), logits.data(), Lmax, scale, softcap, qpack);
      } else
      for (int64_t ii = 0; ii < nq; ++ii) {
        const int64_t lo = los[ii], hi = his[ii];
        if (hi < lo) continue;
        const float* qi = q + ((b * N + i0 + ii) * H + h0) * D;
        for (int64_t j0 = lo; j0 <= hi; j0 += 4) {
          const KT* kp[4];
          for (int jj = 0; jj < 4; ++jj) kp[jj] = krows[std::min(j0 + jj, hi) - jmin];
          const int64_t nj = std::min<int64_t>(4, hi - j0 + 1);
          for (int64_t h = 0; h < nh;) {
            float res[12];
            const int64_t hb = std::min<int64_t>(3, nh - h);
            if (hb == 3) dots_block<3, 4>(qi + h * D, D, kp, res);
            else if (hb == 2) dots_block<2, 4>(qi + h * D, D, kp, res);
            else dots_block<1, 4>(qi + h * D, D, kp, res);
            for (int64_t hh = 0; hh < hb; ++hh) {
              float* lg = logits.data() + (ii * nh + h + hh) * Lmax + (j0 - lo);
              for (int64_t jj = 0; jj < nj; ++jj) {
                float sv = res[hh * 4 + jj] * scale;
                if (softcap > 0.f) sv = softcap * std::tanh(sv / softcap);
                lg[jj] = sv;
              }
            }
            h += hb;
          }
        }
      }
      // pass 2: softmax numerators and sums
      for (int64_t ii = 0; ii < nq; ++ii) {
        const int64_t L = his[ii] - los[ii] + 1;
        if (L <= 0) continue;
        for (int64_t h = 0; h < nh; ++h) {
          float* lg = logits.data() + (ii * nh + h) * Lmax;
          if (avx512) {
            sums[ii * nh + h] = softmax_num_avx512(lg, L);
            continue;
          }
          float m = lg[0];
          for (int64_t j = 1; j < L; ++j) m = std::max(m, lg[j]);
          sums[ii * nh + h] = exp_sub_sum(lg, L, m);
        }
      }
      // pass 3: weighted sum of values (heads of one query row share the key range)
      for (int64_t ii = 0; ii < nq; ++ii) {
        const int64_t lo = los[ii], hi = his[ii];
        if (hi < lo) continue;
        const int64_t L = hi - lo + 1;
        const KT* const* vr = vrows.data() + (lo - jmin);
        float* o = out + ((b * N + i0 + ii) * H + h0) * D;
        for (int64_t h = 0; h < nh;) {
          const float* pr[6];
          float* orow[6];
          const int64_t hb = std::min<int64_t>(6, nh - h);
          for (int64_t hh = 0; hh < hb; ++hh) {
            pr[hh] = logits.data() + (ii * nh + h + hh) * Lmax;
            orow[hh] = o + (h + hh) * D;
          }
          switch (hb) {
            case 6: pv_rows<6>(avx512, pr, L, vr, D, orow); break;
            case 5: pv_rows<5>(avx512, pr, L, vr, D, orow); break;
            case 4: pv_rows<4>(avx512, pr, L, vr, D, orow); break;
            case 3: pv_rows<3>(avx512, pr, L, vr, D, orow); break;
            case 2: pv_rows<2>(avx512, pr, L, vr, D, orow); break;
            default: pv_rows<1>(avx512, pr, L, vr, D, orow); break;
          }
          h += hb;
        }
      }
      for (int64_t ii = 0; ii < nq; ++ii) {
        if (his[ii] < los[ii]) continue;
        float* o = out + ((b * N + i0 + ii) * H + h0) * D;
        for (int64_t h = 0; h < nh; ++h) {
          const float sm = sums[ii * nh + h];
          for (int64_t d = 0; d < D; ++d) o[h * D + d] = o[h * D + d] / sm;
        }
      }
    }
  });
}

}  // namespace

torch::Tensor attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                        torch::Tensor positions, int64_t window, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "attention: 4-d tensors expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "attention: q must be float32");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "attention: k/v dtype mismatch");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "attention: cache must be float32 or bfloat16");
  q = q.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  positions = positions.to(at::kLong).contiguous();
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t C = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D, "attention: cache shape mismatch");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "attention: v_cache shape mismatch");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "attention: H must be a multiple of Hkv");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == N,
              "attention: positions must be [B, N]");
  auto out = torch::empty_like(q);
  if (q.numel() == 0) return out;
  if (k_cache.scalar_type() == at::kFloat) {
    attention_impl<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                          positions.data_ptr<int64_t>(), out.data_ptr<float>(), B, N, H, Hkv, D, C,
                          window, static_cast<float>(scale), static_cast<float>(softcap));
  } else {
    attention_impl<uint16_t>(q.data_ptr<float>(),
                             reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>()),
                             reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>()),
                             positions.data_ptr<int64_t>(), out.data_ptr<float>(), B, N, H, Hkv, D, C,
                             window, static_cast<float>(scale), static_cast<float>(softcap));
  }
  return out;
}


// ---------------------------------------------------------------------------
// Fused elementwise / per-row ops of a decoder layer.  In eager PyTorch each is
// 5-15 small ops whose dispatch cost (~40 us per RMSNorm) dominates a 1-token
// step; here each is one call.  All work row by row with a fixed operation
// order, so they are batch-invariant like the kernels above.
// ---------------------------------------------------------------------------
namespace {

template <typename WT>
inline float wval(const WT* w, int64_t i);
template <>
inline float wval<float>(const float* w, int64_t i) { return w[i]; }
template <>
inline float wval<uint16_t>(const uint16_t* w, int64_t i) { return bf16_to_f32(w[i]); }

// fp32 -> bf16, round to nearest even (torch's conversion)
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// y = (x * r) * (w + offset), r = 1 / sqrt(mean(x^2) + eps); fixed order per row.
template <typename WT>
inline void rmsnorm_row(const float* x, const WT* w, float* y, int64_t D, float eps, float offset) {
  __m256 acc = _mm256_setzero_ps();
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t d = 0; d < D8; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float s = hsum8(acc);
  for (int64_t d = D8; d < D; ++d) s = std::fma(x[d], x[d], s);
  const float r = 1.0f / std::sqrt(s / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) y[d] = (x[d] * r) * (wval<WT>(w, d) + offset);
}

template <typename F>
void rows_parallel(int64_t R, int64_t cost_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(cost_per_row, 1));
  if (R <= grain) {
    f(0, R);
  } else {
    at::parallel_for(0, R, grain, f);
  }
}

inline bool is_bf16(const torch::Tensor& t) { return t.scalar_type() == at::kBFloat16; }
inline const uint16_t* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

void check_norm_weight(const torch::Tensor& w, int64_t D, const char* what) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D, what, ": weight must be [", D, "]");
  TORCH_CHECK(w.scalar_type() == at::kFloat || is_bf16(w), what, ": weight must be float32 or bfloat16");
  TORCH_CHECK(w.is_contiguous(), what, ": weight must be contiguous");
}

// rmsnorm_row with the weight's dtype dispatched
inline void norm_row(const float* x, const torch::Tensor& w, float* y, int64_t D, float eps, float offset) {
  if (is_bf16(w))
    rmsnorm_row<uint16_t>(x, bf16_ptr(w), y, D, eps, offset);
  else
    rmsnorm_row<float>(x, w.data_ptr<float>(), y, D, eps, offset);
}

void norm_rows(const float* x, const torch::Tensor& w, float* y, int64_t R, int64_t D, float eps, float offset) {
  rows_parallel(R, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(x + r * D, w, y + r * D, D, eps, offset);
  });
}

// tanh(u) = sign(u) * (1 - 2 / (exp(2|u|) + 1)), fixed arithmetic
inline __m256 tanh8(__m256 u) {
  const __m256 sign = _mm256_and_ps(u, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u);
  const __m256 e = exp8(_mm256_add_ps(a, a));
  const __m256 t = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                 _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  return _mm256_or_ps(t, sign);
}

// act(gate) * up over 8 lanes; act 0 = gelu (tanh approximation), 1 = silu
inline __m256 gated8(__m256 g, __m256 u, int act) {
  __m256 a;
  if (act == 0) {
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                       _mm256_add_ps(g, _mm256_mul_ps(_mm256_set1_ps(0.044715f), g3)));
    a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g),
                      _mm256_add_ps(_mm256_set1_ps(1.0f), tanh8(inner)));
  } else {
    a = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  }
  return _mm256_mul_ps(a, u);
}

}  // namespace

// RMSNorm over the last dim: y = x / rms(x) * (w + offset).  x fp32 [..., D].
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "rmsnorm: x must be float32");
  x = x.contiguous();
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  check_norm_weight(w, D, "rmsnorm");
  auto y = torch::empty_like(x);
  norm_rows(x.data_ptr<float>(), w, y.data_ptr<float>(), R, D, static_cast<float>(eps), static_cast<float>(offset));
  return y;
}

// Residual step of a block: x' = x + (w_post ? rmsnorm(h, w_post) : h); y = rmsnorm(x', w_next).
// Returns [x', y] ([x'] without w_next).
std::vector<torch::Tensor> add_rmsnorm(torch::Tensor x, torch::Tensor h, c10::optional<torch::Tensor> w_post,
                                       c10::optional<torch::Tensor> w_next, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && h.scalar_type() == at::kFloat, "add_rmsnorm: float32 inputs");
  TORCH_CHECK(x.sizes() == h.sizes(), "add_rmsnorm: x and h shapes differ");
  x = x.contiguous();
  h = h.contiguous();
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  if (w_next) check_norm_weight(*w_next, D, "add_rmsnorm");
  if (w_post) check_norm_weight(*w_post, D, "add_rmsnorm");
  auto xn = torch::empty_like(x);
  auto y = w_next ? torch::empty_like(x) : torch::Tensor();
  const float e = static_cast<float>(eps), off = static_cast<float>(offset);
  const float* xs = x.data_ptr<float>();
  const float* hs = h.data_ptr<float>();
  float* xd = xn.data_ptr<float>();
  float* yd = w_next ? y.data_ptr<float>() : nullptr;
  rows_parallel(R, 3 * D, [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp(D);
    for (int64_t r = r0; r < r1; ++r) {
      const float* hr = hs + r * D;
      if (w_post) {
        norm_row(hr, *w_post, tmp.data(), D, e, off);
        hr = tmp.data();
      }
      for (int64_t d = 0; d < D; ++d) xd[r * D + d] = xs[r * D + d] + hr[d];
      if (w_next) norm_row(xd + r * D, *w_next, yd + r * D, D, e, off);
    }
  });
  if (!w_next) return {xn};
  return {xn, y};
}

// act(gate) * up for gu = [gate | up] along the last dim ([..., 2I] -> [..., I]).
torch::Tensor gated_act(torch::Tensor gu, int64_t act) {
  TORCH_CHECK(gu.scalar_type() == at::kFloat, "gated_act: float32 input");
  TORCH_CHECK(act == 0 || act == 1, "gated_act: act must be 0 (gelu_tanh) or 1 (silu)");
  gu = gu.contiguous();
  const int64_t I2 = gu.size(-1), I = I2 / 2, R = I2 ? gu.numel() / I2 : 0;
  TORCH_CHECK(I2 % 2 == 0, "gated_act: last dim must be even");
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  auto y = torch::empty(sizes, gu.options());
  const float* s = gu.data_ptr<float>();
  float* d = y.data_ptr<float>();
  rows_parallel(R, 8 * I, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = s + r * I2;
      const float* u = g + I;
      float* o = d + r * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8)
        _mm256_storeu_ps(o + i, gated8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i), static_cast<int>(act)));
      if (i < I) {  // zero-padded last chunk: same lane arithmetic
        alignas(32) float gb[8] = {0}, ub[8] = {0}, ob[8];
        for (int64_t t = 0; t < I - i; ++t) gb[t] = g[i + t], ub[t] = u[i + t];
        _mm256_store_ps(ob, gated8(_mm256_load_ps(gb), _mm256_load_ps(ub), static_cast<int>(act)));
        for (int64_t t = 0; t < I - i; ++t) o[i + t] = ob[t];
      }
    }
  });
  return y;
}

// In place: x = cap * tanh(x / cap), Gemma's final-logit softcap. Every element takes the
// same 8-lane arithmetic (a zero-padded last chunk too), so an element's bits do not
// depend on where a thread's chunk starts or on how many rows share the call by design
// (torch's tanh splits by element count and threads and promises nothing about it).
void softcap_(torch::Tensor x, double cap) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "softcap_: contiguous float32 input");
  TORCH_CHECK(cap > 0, "softcap_: cap must be positive");
  const int64_t n = x.numel(), chunks = (n + 7) / 8;
  float* d = x.data_ptr<float>();
  const __m256 c = _mm256_set1_ps(static_cast<float>(cap));
  rows_parallel(chunks, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t i = c0; i < c1; ++i) {
      float* p = d + i * 8;
      const int64_t m = std::min<int64_t>(8, n - i * 8);
      if (m == 8) {
        _mm256_storeu_ps(p, _mm256_mul_ps(c, tanh8(_mm256_div_ps(_mm256_loadu_ps(p), c))));
      } else {
        alignas(32) float b[8] = {0};
        for (int64_t t = 0; t < m; ++t) b[t] = p[t];
        _mm256_store_ps(b, _mm256_mul_ps(c, tanh8(_mm256_div_ps(_mm256_load_ps(b), c))));
        for (int64_t t = 0; t < m; ++t) p[t] = b[t];
      }
    }
  });
}

// After the fused q/k/v projection: optional per-head RMSNorm of q and k, rotate-half
// RoPE at each row's position, and the write of k and v into the ring-buffer cache
// (slot = position % C).  qkv: [B, N, W] fp32; returns q [B, N, H, D].
// kv_mode 0: qkv = [q | k | v], W = (H + 2 Hkv) D; 1: qkv = [q | k] and v is the raw k
// (Gemma 4's K-as-V); 2: qkv = q only, nothing written (a layer reading another's cache).
// v_norm: v is RMS-normed without a scale before the write (Gemma 4).
torch::Tensor qkv_rope_cache(torch::Tensor qkv, torch::Tensor positions, int64_t H, int64_t Hkv,
                             c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                             double eps, double offset, torch::Tensor inv_freq, torch::Tensor k_cache,
                             torch::Tensor v_cache, int64_t kv_mode, bool v_norm) {
  TORCH_CHECK(kv_mode >= 0 && kv_mode <= 2, "qkv_rope_cache: kv_mode must be 0, 1 or 2");
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat, "qkv_rope_cache: qkv must be [B, N, F] float32");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1, "qkv_rope_cache: inv_freq fp32 [D/2]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "qkv_rope_cache: k/v caches must be matching contiguous [B, C, Hkv, D]");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || is_bf16(k_cache), "qkv_rope_cache: cache float32 or bfloat16");
  qkv = qkv.contiguous();
  inv_freq = inv_freq.contiguous();
  positions = positions.to(at::kLong).contiguous();
  const int64_t B = qkv.size(0), N = qkv.size(1), D = k_cache.size(3), C = k_cache.size(1);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(2) == Hkv, "qkv_rope_cache: cache shape mismatch");
  const int64_t F = (H + (kv_mode == 0 ? 2 * Hkv : kv_mode == 1 ? Hkv : 0)) * D, half = D / 2;
  TORCH_CHECK(qkv.size(2) == F, "qkv_rope_cache: qkv width ", qkv.size(2), " != ", F, " for kv_mode ", kv_mode);
  TORCH_CHECK(D % 2 == 0 && inv_freq.size(0) == D / 2, "qkv_rope_cache: inv_freq must have D/2 entries");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == N,
              "qkv_rope_cache: positions must be [B, N]");
  if (q_norm) check_norm_weight(*q_norm, D, "qkv_rope_cache q_norm");
  if (k_norm) check_norm_weight(*k_norm, D, "qkv_rope_cache k_norm");
  for (int64_t i = 0; i < B * N; ++i)
    TORCH_CHECK(positions.data_ptr<int64_t>()[i] >= 0, "qkv_rope_cache: negative position");
  auto q = torch::empty({B, N, H, D}, qkv.options());
  const bool cbf = is_bf16(k_cache);
  const float e = static_cast<float>(eps), off = static_cast<float>(offset);
  const float* src = qkv.data_ptr<float>();
  const float* inv = inv_freq.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  float* qd = q.data_ptr<float>();
  const std::vector<float> ones(D, 1.0f);
  rows_parallel(B * N, 4 * F, [&](int64_t r0, int64_t r1) {
    std::vector<float> cs(D), sn(D), tmp(D), kbuf(D), vbuf(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / N, p = pos[r];
      // HF: freqs = float(p) * inv_freq; emb = cat(freqs, freqs); cos/sin in fp32
      for (int64_t i = 0; i < half; ++i) {
        const float f = static_cast<float>(p) * inv[i];
        cs[i] = cs[i + half] = std::cos(f);
        sn[i] = sn[i + half] = std::sin(f);
      }
      const float* row = src + r * F;
      auto rope_head = [&](const float* x, const c10::optional<torch::Tensor>& nw, float* out) {
        if (nw) {
          norm_row(x, *nw, tmp.data(), D, e, off);
          x = tmp.data();
        }
        // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]  (out never aliases x)
        for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cs[i] + (-x[i + half]) * sn[i];
        for (int64_t i = half; i < D; ++i) out[i] = x[i] * cs[i] + x[i - half] * sn[i];
      };
      for (int64_t h = 0; h < H; ++h) rope_head(row + h * D, q_norm, qd + r * H * D + h * D);
      if (kv_mode == 2) continue;
      const int64_t slot = p % C;
      for (int64_t h = 0; h < Hkv; ++h) {
        float* kb = kbuf.data();
        rope_head(row + (H + h) * D, k_norm, kb);
        const float* vr = row + (kv_mode == 1 ? H + h : H + Hkv + h) * D;
        if (v_norm) {
          rmsnorm_row<float>(vr, ones.data(), vbuf.data(), D, e, 0.0f);
          vr = vbuf.data();
        }
        const int64_t off_c = ((b * C + slot) * Hkv + h) * D;
        if (cbf) {
          uint16_t* kc = reinterpret_cast<uint16_t*>(k_cache.data_ptr<at::BFloat16>()) + off_c;
          uint16_t* vc = reinterpret_cast<uint16_t*>(v_cache.data_ptr<at::BFloat16>()) + off_c;
          for (int64_t d = 0; d < D; ++d) kc[d] = f32_to_bf16(kb[d]), vc[d] = f32_to_bf16(vr[d]);
        } else {
          std::memcpy(k_cache.data_ptr<float>() + off_c, kb, D * sizeof(float));
          std::memcpy(v_cache.data_ptr<float>() + off_c, vr, D * sizeof(float));
        }
      }
    }
  });
  return q;
}

// An uninitialised tensor on transparent huge pages where the kernel allows them
// (madvise mode): a GEMV streaming hundreds of MB then walks 2 MB pages instead
// of 4 KB ones (fewer TLB misses, ~3% here). Small tensors use the allocator.
torch::Tensor huge_page_empty(const std::vector<int64_t>& sizes, const torch::TensorOptions& opt) {
  int64_t numel = 1;
  for (auto v : sizes) numel *= v;
  const size_t bytes = static_cast<size_t>(numel) * opt.dtype().itemsize();
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < 2 * kHuge) return torch::empty(sizes, opt);
  const size_t len = bytes + kHuge;
  void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return torch::empty(sizes, opt);
  char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(kHuge - 1));
  madvise(aligned, bytes, MADV_HUGEPAGE);  // a hint: ignored where THP is off
  return torch::from_blob(aligned, sizes, [base, len](void*) { munmap(base, len); }, opt);
}

// Pack w [O, K] (K a multiple of 16 for bf16, 8 for fp32) for linear_packed:
// [ceil(O/4), K/kc, 4, kc], zero rows padding O up to a multiple of 4.
torch::Tensor pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_weight: w must be [O, K]");
  TORCH_CHECK(w.scalar_type() == at::kFloat || is_bf16(w), "pack_weight: w must be float32 or bfloat16");
  const int64_t O = w.size(0), K = w.size(1), kc = is_bf16(w) ? 16 : 8;
  TORCH_CHECK(K % kc == 0, "pack_weight: K must be a multiple of ", kc);
  const int64_t Op = (O + kPackRows - 1) / kPackRows * kPackRows;
  auto wpad = w;
  if (Op != O) wpad = torch::cat({w, torch::zeros({Op - O, K}, w.options())});
  auto packed = wpad.view({Op / kPackRows, kPackRows, K / kc, kc}).permute({0, 2, 1, 3});
  auto out = huge_page_empty(packed.sizes().vec(), w.options());
  out.copy_(packed);
  return out;
}

// y = x @ w.T with w packed by pack_weight; O = w's row count before padding.
torch::Tensor linear_packed(torch::Tensor x, torch::Tensor wp, int64_t O) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat, "linear_packed: x must be float32 [..., K]");
  TORCH_CHECK(wp.dim() == 4 && wp.size(1) * wp.size(3) == x.size(-1) && wp.size(2) == kPackRows &&
                  wp.is_contiguous() && (O + kPackRows - 1) / kPackRows == wp.size(0),
              "linear_packed: weight is not a packed [", O, ", ", x.size(-1), "] matrix");
  x = x.contiguous();
  const int64_t K = x.size(-1), N = K ? x.numel() / K : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  auto y = torch::empty(sizes, x.options());
  if (N == 0 || O == 0) return y;
  if (is_bf16(wp)) {
    auto xp = permute_x_bf16(x, N, K);
    linear_packed_impl<uint16_t>(bf16_ptr(wp), xp.data_ptr<float>(), y.data_ptr<float>(), N, K, O);
  } else {
    linear_packed_impl<float>(wp.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), N, K, O);
  }
  return y;
}

void set_tuning(int64_t pf_rows, int64_t ob, int64_t pf_bytes, int64_t pf_blocks) {
  g_pf_blocks = pf_blocks;
  g_pf_rows = pf_rows;
  g_ob = ob;
  g_pf_bytes = pf_bytes;
}

// the layer kernels' addresses, for mtpdraft_qkernels.Stack and DraftStep (mtpdraft_layer_fns.h)
const LayerFns kLayerFns = {sizeof(LayerFns), &rmsnorm,   &add_rmsnorm, &gated_act, &qkv_rope_cache,
                            &attention,       &linear,    &linear_packed};

namespace {

// ---------------------------------------------------------------------------
// Datastore lookup (drafters/datastore.py builds the index): the continuation of the
// longest suffix of ctx (up to 6 tokens, at least min_match) found in the store, walked
// token by token over at most max_matches of its places: the most frequent next token (the
// smallest id on ties), then only the places that agree with it. keys: every place's packed
// tokens 0-2, sorted; keys2: the same places' tokens 3-5 (a longer suffix is a contiguous
// scan of its prefix's range, not a read of the store per place); order: those places;
// tokens: the store, padded with separators (-1). After the first token, the walk ends where
// fewer than min_share of the remaining places agree. Returns (draft, suffix length; 0: none).
// ---------------------------------------------------------------------------
std::tuple<std::vector<int64_t>, int64_t> ds_lookup(const torch::Tensor& keys, const torch::Tensor& keys2,
                                                    const torch::Tensor& order, const torch::Tensor& tokens,
                                                    const std::vector<int64_t>& ctx, int64_t k, int64_t min_match,
                                                    int64_t max_matches, int64_t bits, double min_share) {
  for (const torch::Tensor* t : {&keys, &keys2, &order, &tokens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1, "ds_lookup: contiguous int64 vectors");
  TORCH_CHECK(keys.numel() == order.numel() && keys2.numel() == order.numel(), "ds_lookup: one key pair per place");
  TORCH_CHECK(min_match >= 1 && max_matches >= 1 && bits > 0 && bits <= 21, "ds_lookup: bad settings");
  const int64_t* kp = keys.data_ptr<int64_t>();
  const int64_t* k2 = keys2.data_ptr<int64_t>();
  const int64_t* op = order.data_ptr<int64_t>();
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t nk = keys.numel(), nt = tokens.numel();
  const int64_t top = (int64_t(1) << bits) - 1;  // a packed field above every token's
  std::vector<int64_t> rows, pos, nxt, sorted;
  for (int64_t n = std::min<int64_t>(static_cast<int64_t>(ctx.size()), 6); n >= min_match; --n) {
    const int64_t* g = ctx.data() + ctx.size() - n;
    int64_t lo_key = 0, hi_key = 0, want = 0;
    for (int64_t i = 0; i < 3; ++i) {  // a token packs as id + 1 (the separator as 0)
      lo_key = (lo_key << bits) | (i < n ? g[i] + 1 : 0);
      hi_key = (hi_key << bits) | (i < n ? g[i] + 1 : top);
    }
    for (int64_t i = 3; i < n; ++i) want = (want << bits) | (g[i] + 1);
    const int shift = static_cast<int>((6 - std::max<int64_t>(n, 3)) * bits);  // keys2's fields past the suffix
    const int64_t lo = std::lower_bound(kp, kp + nk, lo_key) - kp;
    const int64_t hi = std::upper_bound(kp, kp + nk, hi_key) - kp;
    rows.clear();
    if (n > 3) {
      for (int64_t r = lo; r < hi; ++r)
        if ((k2[r] >> shift) == want) rows.push_back(r);
    }
    const int64_t m = n > 3 ? static_cast<int64_t>(rows.size()) : hi - lo, take = std::min(m, max_matches);
    if (m == 0) continue;
    pos.clear();
    for (int64_t i = 0; i < take; ++i)  // an even spread over the places, in index order
      pos.push_back(op[n > 3 ? rows[i * m / take] : lo + i * m / take] + n);
    std::vector<int64_t> out;
    for (int64_t j = 0; j < k; ++j) {
      nxt.clear();
      for (int64_t p : pos) nxt.push_back(p + j < nt ? tp[p + j] : -1);
      sorted = nxt;
      std::sort(sorted.begin(), sorted.end());
      int64_t best = -1, best_n = 0;
      for (size_t a = 0; a < sorted.size();) {
        size_t b = a;
        while (b < sorted.size() && sorted[b] == sorted[a]) ++b;
        if (static_cast<int64_t>(b - a) > best_n) {
          best = sorted[a];
          best_n = static_cast<int64_t>(b - a);
        }
        a = b;
      }
      if (best < 0) break;  // ending the sequence is the most frequent (a tie included: -1 is the smallest)
      if (j > 0 && static_cast<double>(best_n) < min_share * static_cast<double>(pos.size())) break;  // places disagree
      out.push_back(best);
      size_t w = 0;
      for (size_t i = 0; i < pos.size(); ++i) {
        if (nxt[i] == best) pos[w++] = pos[i];
      }
      pos.resize(w);
    }
    return {out, n};
  }
  return {std::vector<int64_t>(), 0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_fns", [] { return py::capsule(static_cast<const void*>(&kLayerFns), "mtpdraft.layer_fns"); },
        "the layer kernels' addresses, for mtpdraft_qkernels.Stack");
  m.def("_set_tuning", &set_tuning, "speed-only knobs: prefetch distance (rows), output block rows, packed prefetch (bytes; blocks for 2+ rows)");
  m.def("pack_weight", &pack_weight, "pack [O, K] weights for linear_packed");
  m.def("linear_packed", &linear_packed, "batch-invariant y = x @ w.T over a packed weight");
  m.def("linear", &linear, "batch-invariant y = x @ w.T");
  m.def("attention", &attention, "batch-invariant attention over a ring-buffer KV cache");
  m.def("_set_attention_avx512", [](int64_t on) { g_attn_avx512 = on < 0 ? -1 : (on ? (attn_avx512_cpu() ? 1 : 0) : 0); },
        "attention's passes: -1 where the CPU has AVX-512, 0 AVX2 (the same bits), 1 AVX-512 if the CPU has it");
  m.def("_attention_avx512", [] { return attn_avx512(); }, "whether attention runs its AVX-512 passes");
  m.def("rmsnorm", &rmsnorm, "row-wise RMSNorm");
  m.def("add_rmsnorm", &add_rmsnorm, "x' = x + (post-norm of) h; y = rmsnorm(x')");
  m.def("gated_act", &gated_act, "act(gate) * up");
  m.def("softcap_", &softcap_, "in place: x = cap * tanh(x / cap)");
  m.def("ds_lookup", &ds_lookup, "datastore lookup: (draft, matched suffix length)");
  m.def("qkv_rope_cache", &qkv_rope_cache, "q/k norm, RoPE and cache write after the fused qkv projection");
}
