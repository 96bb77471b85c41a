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

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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

}  // namespace

torch::Tensor linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear: x must be [N, K], w [O, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "linear: x must be float32");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16,
              "linear: w must be float32 or bfloat16");
  TORCH_CHECK(x.size(1) == w.size(1), "linear: K mismatch");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t N = x.size(0), K = x.size(1), O = w.size(0);
  auto y = torch::empty({N, O}, x.options());
  if (N == 0 || O == 0) return y;
  if (K == 0) return y.zero_();
  if (w.scalar_type() == at::kFloat) {
    linear_impl<float>(w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), N, K, O);
  } else {
    // permute x per 16-chunk: even elements then odd elements
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
inline float exp_sub_sum(float* lg, int64_t L, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
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
// dot has exactly the arithmetic of dot_qk<float>).
template <int HB, int JB>
inline void dots_block(const float* q, int64_t D, const float* const* kp, float* res /*[HB][JB]*/) {
  __m256 acc[HB][JB];
  for (int h = 0; h < HB; ++h)
    for (int j = 0; j < JB; ++j) acc[h][j] = _mm256_setzero_ps();
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t d = 0; d < D8; d += 8) {
    __m256 kv[JB];
    for (int j = 0; j < JB; ++j) kv[j] = _mm256_loadu_ps(kp[j] + d);
    for (int h = 0; h < HB; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * D + d);
      for (int j = 0; j < JB; ++j) acc[h][j] = _mm256_fmadd_ps(qv, kv[j], acc[h][j]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int j = 0; j < JB; ++j) {
      float s = hsum8(acc[h][j]);
      for (int64_t d = D8; d < D; ++d) s = std::fma(q[h * D + d], kp[j][d], s);
      res[h * JB + j] = s;
    }
}

// For HB heads of one query row: o[h][d] = sum_j p[h][j] * v_j[d] with the fixed
// per-element sequence acc = fma(p_j, v_j[d], acc), j = 0..L-1 increasing.
template <int HB, int R>
inline void pv_chunk(const float* const* prow, int64_t L, const float* const* vrows, int64_t d0,
                     float* const* orow) {
  __m256 acc[HB][R];
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    __m256 vv[R];
    for (int r = 0; r < R; ++r) vv[r] = _mm256_loadu_ps(vrows[j] + d0 + 8 * r);
    for (int h = 0; h < HB; ++h) {
      const __m256 pb = _mm256_set1_ps(prow[h][j]);
      for (int r = 0; r < R; ++r) acc[h][r] = _mm256_fmadd_ps(pb, vv[r], acc[h][r]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(orow[h] + d0 + 8 * r, acc[h][r]);
}

template <int HB>
inline void pv_heads(const float* const* prow, int64_t L, const float* const* vrows, int64_t D,
                     float* const* orow) {
  int64_t d = 0;
  if constexpr (HB <= 2)
    for (; d + 32 <= D; d += 32) pv_chunk<HB, 4>(prow, L, vrows, d, orow);
  for (; d + 16 <= D; d += 16) pv_chunk<HB, 2>(prow, L, vrows, d, orow);
  for (; d + 8 <= D; d += 8) pv_chunk<HB, 1>(prow, L, vrows, d, orow);
  for (; d < D; ++d)
    for (int h = 0; h < HB; ++h) {
      float a = 0.f;
      for (int64_t j = 0; j < L; ++j) a = std::fma(prow[h][j], vrows[j][d], a);
      orow[h][d] = a;
    }
}

inline void to_f32_row(const float* src, float* dst, int64_t D) { std::memcpy(dst, src, D * sizeof(float)); }
inline void to_f32_row(const uint16_t* src, float* dst, int64_t D) {
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t d = 0; d < D8; d += 8) _mm256_storeu_ps(dst + d, load8_bf16(src + d));
  for (int64_t d = D8; d < D; ++d) dst[d] = bf16_to_f32(src[d]);
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
  int64_t qsplit = 1, hsplit = 1;
  while (B * Hkv * qsplit * hsplit < nth) {
    if (qsplit < N) ++qsplit;
    else if (hsplit < G) ++hsplit;
    else break;
  }
  const int64_t QB = (N + qsplit - 1) / qsplit;
  const int64_t HB = (G + hsplit - 1) / hsplit;
  qsplit = (N + QB - 1) / QB;
  hsplit = (G + HB - 1) / HB;
  const int64_t ntasks = B * Hkv * qsplit * hsplit;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> logits, sums, kbuf, vbuf;
    std::vector<const float*> krows, vrows;
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
      // fp32 views of the key / value rows jmin..jmax (converted once if bf16)
      const int64_t J = jmax - jmin + 1;
      krows.resize(J);
      vrows.resize(J);
      if constexpr (std::is_same<KT, float>::value) {
        for (int64_t j = jmin; j <= jmax; ++j) {
          krows[j - jmin] = kb + (j % C) * kstride;
          vrows[j - jmin] = vb + (j % C) * kstride;
        }
      } else {
        kbuf.resize(static_cast<size_t>(J * D));
        vbuf.resize(static_cast<size_t>(J * D));
        for (int64_t j = jmin; j <= jmax; ++j) {
          to_f32_row(kb + (j % C) * kstride, kbuf.data() + (j - jmin) * D, D);
          to_f32_row(vb + (j % C) * kstride, vbuf.data() + (j - jmin) * D, D);
          krows[j - jmin] = kbuf.data() + (j - jmin) * D;
          vrows[j - jmin] = vbuf.data() + (j - jmin) * D;
        }
      }
      // pass 1: logits (blocks of 4 keys x up to 3 heads; out-of-range keys of a
      // block are computed on a duplicate row and discarded)
      for (int64_t ii = 0; ii < nq; ++ii) {
        const int64_t lo = los[ii], hi = his[ii];
        if (hi < lo) continue;
        const float* qi = q + ((b * N + i0 + ii) * H + h0) * D;
        for (int64_t j0 = lo; j0 <= hi; j0 += 4) {
          const float* kp[4];
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
        const float* const* vr = vrows.data() + (lo - jmin);
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
            case 6: pv_heads<6>(pr, L, vr, D, orow); break;
            case 5: pv_heads<5>(pr, L, vr, D, orow); break;
            case 4: pv_heads<4>(pr, L, vr, D, orow); break;
            case 3: pv_heads<3>(pr, L, vr, D, orow); break;
            case 2: pv_heads<2>(pr, L, vr, D, orow); break;
            default: pv_heads<1>(pr, L, vr, D, orow); break;
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

void set_tuning(int64_t pf_rows, int64_t ob) {
  g_pf_rows = pf_rows;
  g_ob = ob;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("_set_tuning", &set_tuning, "speed-only knobs: prefetch distance (rows), output block rows");
  m.def("linear", &linear, "batch-invariant y = x @ w.T");
  m.def("attention", &attention, "batch-invariant attention over a ring-buffer KV cache");
}
