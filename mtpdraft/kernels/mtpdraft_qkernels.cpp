// Batch-invariant linear layers over quantized weights (GGUF block types).
//
// Weights stay in their file's blocks, rearranged bit for bit into one record
// per 64 (or 256) weights of a row so that a 64-weight chunk decodes to 64
// unsigned bytes u = q + offset (see mtpdraft/kernels/quant.py for the layouts).
// Within a chunk the two 32-weight blocks are interleaved in groups of 4: int32
// lane l of a dot product holds 4 weights of block l % 2, so a chunk's two fp16
// scales become 16 lane scales in one conversion.  Activations are quantized per
// row to int8 in blocks of 32 (scale absmax / 127), as llama.cpp does for batched
// verification, and laid out in the same order.  Per output:
//
//   lanes  = 16 int32 sums of 4 products u * x, minus offset * (sum of the 4 x)  (exact)
//   acc   += float(lanes) * (weight scale * activation scale)      (per chunk)
//   acc   += weight min * (activation scale * block sum / 8)       (types with mins)
//   y      = hsum8(acc[0:8] + acc[8:16])
//
// The float operations of one output depend only on K and the type: not on how
// many rows share the call, how they are grouped, or how threads split the
// outputs.  The AVX-512 (VNNI) and AVX2 builds of this file produce the same
// lanes and the same float sequence, hence the same bits.
//
// Compiled with -ffp-contract=off (scalar glue is never fused differently).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define MTP_AVX512 1
#else
#define MTP_AVX512 0
#endif

namespace {

// ggml type ids
constexpr int T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14;

// bytes of one record and the weights it holds
constexpr int64_t rec_elems(int t) { return (t == T_Q4_K || t == T_Q6_K) ? 256 : 64; }
constexpr int64_t rec_bytes(int t) {
  switch (t) {
    case T_Q8_0: return 68;
    case T_Q4_0: return 36;
    case T_Q4_1: return 40;
    case T_Q5_0: return 44;
    case T_Q4_K: return 148;
    case T_Q6_K: return 210;
  }
  return 0;  // unsupported (check_part refuses it)
}

// the record holding chunk c (64 weights) of a row; K-quant records hold 4 chunks
template <int T>
inline const uint8_t* record(const uint8_t* row, int64_t c) {
  return rec_elems(T) == 256 ? row + (c >> 2) * rec_bytes(T) : row + c * rec_bytes(T);
}

// integer offset folded into the lane accumulator: sum(w * x) = sum(u * x) - off * sum(x)
constexpr int lane_offset(int t) {
  switch (t) {
    case T_Q8_0: return MTP_AVX512 ? 128 : 0;  // stored as w + 128; AVX2 multiplies the signed bytes
    case T_Q4_0: return 8;
    case T_Q5_0: return 16;
    case T_Q6_K: return 32;
  }
  return 0;
}

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// position p of a chunk (0..63) holds weight chunk_elem(p): int32 lane p / 4 alternates the two blocks
constexpr int chunk_elem(int p) { return ((p >> 2) & 1) * 32 + (p >> 3) * 4 + (p & 3); }

// Activations of N rows, quantized, in chunk order: K a multiple of 64.
struct XQ {
  int64_t N = 0, K = 0, nc = 0;
  std::vector<int8_t> q;      // [N][K]  chunk order
  std::vector<uint8_t> qu;    // [N][K]  q + 128 (AVX-512, several rows: the unsigned operand)
  std::vector<int32_t> ls;    // [N][K/4]  sum of each lane's 4 activations
  std::vector<float> dl;      // [N][nc][2]  the chunk's two block scales (lane l: dl[l % 2])
  std::vector<float> cl;      // [N][nc][2]  block scale * block sum / 8
};

void quantize_x(const float* x, int64_t N, int64_t K, XQ& a) {
  a.N = N, a.K = K, a.nc = K / 64;
  a.q.resize(N * K);
  a.qu.resize(MTP_AVX512 && N > 1 ? N * K : 0);
  a.ls.resize(N * K / 4);
  a.dl.resize(N * a.nc * 2);
  a.cl.resize(N * a.nc * 2);
  int8_t qb[64];
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < a.nc; ++c) {
      const float* xc = x + n * K + c * 64;
      float d[2], cs[2];
      for (int h = 0; h < 2; ++h) {  // the chunk's two blocks of 32
        float amax = 0.0f;
        for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xc[h * 32 + i]));
        d[h] = amax / 127.0f;
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int isum = 0;
        for (int i = 0; i < 32; ++i) {
          float v = std::nearbyint(xc[h * 32 + i] * id);
          v = std::min(127.0f, std::max(-127.0f, v));
          qb[h * 32 + i] = static_cast<int8_t>(v);
          isum += static_cast<int>(v);
        }
        cs[h] = (d[h] * static_cast<float>(isum)) * 0.125f;
      }
      int8_t* qo = a.q.data() + n * K + c * 64;
      for (int p = 0; p < 64; ++p) qo[p] = qb[chunk_elem(p)];
      if (!a.qu.empty())
        for (int p = 0; p < 64; ++p) a.qu[n * K + c * 64 + p] = static_cast<uint8_t>(qo[p] + 128);
      int32_t* ls = a.ls.data() + (n * K + c * 64) / 4;
      for (int l = 0; l < 16; ++l) ls[l] = qo[4 * l] + qo[4 * l + 1] + qo[4 * l + 2] + qo[4 * l + 3];
      for (int h = 0; h < 2; ++h) {
        a.dl[(n * a.nc + c) * 2 + h] = d[h];
        a.cl[(n * a.nc + c) * 2 + h] = cs[h];
      }
    }
  }
}

// Per-chunk weight scales as 16 lanes in two halves (lo: lanes 0-7, hi: 8-15) and
// the mins of the types that have them.  K-quant super-block values are computed
// once per super-block (c % 4 == 0).  Same IEEE products in both builds.
struct Scales {
  __m256 s_lo, s_hi, m_lo, m_hi;
  __m256 sb0, sb1, mb;  // super-block values (K-quants)
};

template <int T>
inline void chunk_scales(const uint8_t* row, int64_t c, Scales& sc) {
  if constexpr (T == T_Q8_0 || T == T_Q4_0 || T == T_Q5_0 || T == T_Q4_1) {
    constexpr int64_t off = T == T_Q8_0 ? 64 : T == T_Q5_0 ? 40 : 32;
    const uint8_t* r = record<T>(row, c);
    // fp16 (d_a, d_b) -> lanes d_a, d_b, d_a, d_b, ...
    sc.s_lo = sc.s_hi = _mm256_cvtph_ps(_mm_set1_epi32(static_cast<int>(load32(r + off))));
    if constexpr (T == T_Q4_1) sc.m_lo = sc.m_hi = _mm256_cvtph_ps(_mm_set1_epi32(static_cast<int>(load32(r + 36))));
  } else if constexpr (T == T_Q4_K) {
    const uint8_t* r = record<T>(row, c);
    const int j = static_cast<int>(c & 3);
    if (j == 0) {
      const __m256 d = _mm256_set1_ps(h2f(r + 128)), dmin = _mm256_set1_ps(h2f(r + 130));
      const __m256 s8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(load64(r + 132)))));
      const __m256 m8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(load64(r + 140)))));
      sc.sb0 = _mm256_mul_ps(d, s8);
      sc.mb = _mm256_xor_ps(_mm256_mul_ps(dmin, m8), _mm256_set1_ps(-0.0f));  // -(dmin * m)
    }
    // lane l: sub-block 2j + l % 2
    const __m256i idx = _mm256_setr_epi32(2 * j, 2 * j + 1, 2 * j, 2 * j + 1, 2 * j, 2 * j + 1, 2 * j, 2 * j + 1);
    sc.s_lo = sc.s_hi = _mm256_permutevar8x32_ps(sc.sb0, idx);
    sc.m_lo = sc.m_hi = _mm256_permutevar8x32_ps(sc.mb, idx);
  } else if constexpr (T == T_Q6_K) {
    const uint8_t* r = record<T>(row, c);
    const int j = static_cast<int>(c & 3);
    if (j == 0) {
      const __m256 d = _mm256_set1_ps(h2f(r + 208));
      sc.sb0 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(load64(r + 192))))));
      sc.sb1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(load64(r + 200))))));
    }
    // lane l covers weights 32 (l % 2) + 4 (l / 2) ..: 16-weight scale 4j + 2 (l % 2) + (l >= 8)
    const __m256 src = j < 2 ? sc.sb0 : sc.sb1;
    const int b = (j & 1) * 4;
    sc.s_lo = _mm256_permutevar8x32_ps(src, _mm256_setr_epi32(b, b + 2, b, b + 2, b, b + 2, b, b + 2));
    sc.s_hi = _mm256_permutevar8x32_ps(src, _mm256_setr_epi32(b + 1, b + 3, b + 1, b + 3, b + 1, b + 3, b + 1, b + 3));
  }
}

constexpr bool has_mins(int t) { return t == T_Q4_1 || t == T_Q4_K; }

#if MTP_AVX512
// ---------------------------------------------------------------------------
// AVX-512 + VNNI: one 64-weight chunk is one zmm of bytes; vpdpbusd does
// 64 u8 x s8 products into 16 int32 lanes, starting from -offset * lane sums.
// ---------------------------------------------------------------------------
inline __m512i nibbles(const uint8_t* p) {
  const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i sh = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);  // low half 0, high half 4
  return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(0x0F));
}

template <int T>
inline __m512i chunk_bytes(const uint8_t* row, int64_t c) {
  if constexpr (T == T_Q8_0) return _mm512_loadu_si512(record<T>(row, c));
  if constexpr (T == T_Q4_0) return nibbles(record<T>(row, c));
  if constexpr (T == T_Q4_1) return nibbles(record<T>(row, c));
  if constexpr (T == T_Q5_0) {
    const uint8_t* r = record<T>(row, c);
    const __m512i v = nibbles(r);
    return _mm512_mask_add_epi8(v, static_cast<__mmask64>(load64(r + 32)), v, _mm512_set1_epi8(16));
  }
  if constexpr (T == T_Q4_K) return nibbles(record<T>(row, c) + (c & 3) * 32);
  if constexpr (T == T_Q6_K) {
    const uint8_t* r = record<T>(row, c);
    const __m512i lo = nibbles(r + (c & 3) * 32);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 128 + (c & 3) * 16));
    constexpr int64_t one = 0x0001000100010001LL;
    __m512i hb = _mm512_srlv_epi16(_mm512_broadcast_i32x4(h),
                                   _mm512_set_epi64(6 * one, 6 * one, 4 * one, 4 * one, 2 * one, 2 * one, 0, 0));
    hb = _mm512_slli_epi16(_mm512_and_si512(hb, _mm512_set1_epi8(3)), 4);
    return _mm512_or_si512(lo, hb);
  }
}

// (a, b) -> a, b, a, b, ... (one broadcast load)
inline __m512 pair512(const float* p) {
  double v;
  std::memcpy(&v, p, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(v));
}

inline __m512 join(__m256 lo, __m256 hi) { return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1); }

template <int T, int G>
inline void row_group(const uint8_t* row, const XQ& a, const int32_t* init, int64_t n0, float* y, int64_t ldy) {
  constexpr bool mins = has_mins(T);
  const int64_t nc = a.nc, K = a.K;
  const int8_t* xq = a.q.data() + n0 * K;
  const float* dl = a.dl.data() + n0 * nc * 2;
  const float* cl = a.cl.data() + n0 * nc * 2;
  const int32_t* in = init ? init + n0 * (K / 4) : nullptr;
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  Scales sc;
  // Several rows with an offset: the weights become the signed operand (q - offset)
  // and the activations the unsigned one (x + 128); sum(w x) = dpbusd(x + 128, w) -
  // 128 sum(w), a correction per weight chunk shared by the rows (no per-row loads).
  constexpr bool flip = G > 1 && lane_offset(T) != 0;
  const uint8_t* xu = flip ? a.qu.data() + n0 * K : nullptr;
  const __m512i k80 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < nc; ++c) {
    __m512i u = chunk_bytes<T>(row, c);
    __m512i corr = _mm512_setzero_si512();
    if constexpr (flip) {
      u = _mm512_sub_epi8(u, _mm512_set1_epi8(static_cast<char>(lane_offset(T))));
      corr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), k80, u));
    }
    chunk_scales<T>(row, c, sc);
    const __m512 ws = join(sc.s_lo, sc.s_hi);
    __m512 wm = _mm512_setzero_ps();
    if constexpr (mins) wm = join(sc.m_lo, sc.m_hi);
    for (int g = 0; g < G; ++g) {
      __m512i li;
      if constexpr (flip) {
        li = _mm512_dpbusd_epi32(corr, _mm512_loadu_si512(xu + g * K + c * 64), u);
      } else {
        li = in ? _mm512_loadu_si512(in + g * (K / 4) + c * 16) : _mm512_setzero_si512();
        li = _mm512_dpbusd_epi32(li, u, _mm512_loadu_si512(xq + g * K + c * 64));
      }
      const __m512 s = _mm512_mul_ps(ws, pair512(dl + (g * nc + c) * 2));
      acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(li), s, acc[g]);
      if constexpr (mins) acc[g] = _mm512_fmadd_ps(wm, pair512(cl + (g * nc + c) * 2), acc[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m256 lo = _mm512_castps512_ps256(acc[g]);
    const __m256 hi = _mm512_extractf32x8_ps(acc[g], 1);
    y[g * ldy] = hsum8(_mm256_add_ps(lo, hi));
  }
}

// the 64 decoded values of a chunk in chunk order (q - offset, for qrows)
template <int T>
inline void chunk_values(const uint8_t* row, int64_t c, int* q) {
  uint8_t u[64];
  _mm512_storeu_si512(u, chunk_bytes<T>(row, c));
  for (int e = 0; e < 64; ++e) q[e] = static_cast<int>(u[e]) - lane_offset(T);
}
constexpr int kGroup = 8;
#else
// ---------------------------------------------------------------------------
// AVX2: the 16 lanes as two ymm halves; u8 x s8 products via maddubs (no
// saturation: 4-6 bit weights are < 64, and Q8_0 uses |w| * sign(x, w)).
// ---------------------------------------------------------------------------
inline void nibbles(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(v, m);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
}

// 32 bits -> 32 bytes of 0x10 where the bit is set
inline __m256i bits_to_16(uint32_t bits) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                        3, 3, 3, 3, 3, 3, 3);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), shuf);
  const __m256i sel = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
  return _mm256_and_si256(v, _mm256_set1_epi8(16));
}

// (lo, hi) halves of a chunk's bytes; for Q8_0 the signed weights
template <int T>
inline void chunk_bytes(const uint8_t* row, int64_t c, __m256i& lo, __m256i& hi) {
  if constexpr (T == T_Q8_0) {
    const uint8_t* r = record<T>(row, c);
    const __m256i k80 = _mm256_set1_epi8(static_cast<char>(0x80));
    lo = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r)), k80);
    hi = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 32)), k80);
  } else if constexpr (T == T_Q4_0) {
    nibbles(record<T>(row, c), lo, hi);
  } else if constexpr (T == T_Q4_1) {
    nibbles(record<T>(row, c), lo, hi);
  } else if constexpr (T == T_Q5_0) {
    const uint8_t* r = record<T>(row, c);
    const uint64_t bits = load64(r + 32);
    nibbles(r, lo, hi);
    lo = _mm256_or_si256(lo, bits_to_16(static_cast<uint32_t>(bits)));
    hi = _mm256_or_si256(hi, bits_to_16(static_cast<uint32_t>(bits >> 32)));
  } else if constexpr (T == T_Q4_K) {
    nibbles(record<T>(row, c) + (c & 3) * 32, lo, hi);
  } else if constexpr (T == T_Q6_K) {
    const uint8_t* r = record<T>(row, c);
    nibbles(r + (c & 3) * 32, lo, hi);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 128 + (c & 3) * 16));
    const __m128i m3 = _mm_set1_epi8(3);
    const __m128i h0 = _mm_and_si128(h, m3), h1 = _mm_and_si128(_mm_srli_epi16(h, 2), m3);
    const __m128i h2 = _mm_and_si128(_mm_srli_epi16(h, 4), m3), h3 = _mm_and_si128(_mm_srli_epi16(h, 6), m3);
    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_set_m128i(h1, h0), 4));
    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_set_m128i(h3, h2), 4));
  }
}

// (a, b) -> a, b, a, b, ... (one broadcast load)
inline __m256 pair256(const float* p) {
  double v;
  std::memcpy(&v, p, 8);
  return _mm256_castpd_ps(_mm256_set1_pd(v));
}

template <bool SIGNED>
inline __m256i dot4(__m256i init, __m256i u, __m256i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i p;
  if constexpr (SIGNED) p = _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(x, u));
  else p = _mm256_maddubs_epi16(u, x);
  return _mm256_add_epi32(init, _mm256_madd_epi16(p, ones));
}

template <int T, int G>
inline void row_group(const uint8_t* row, const XQ& a, const int32_t* init, int64_t n0, float* y, int64_t ldy) {
  constexpr bool mins = has_mins(T), sgn = T == T_Q8_0;
  const int64_t nc = a.nc, K = a.K;
  const int8_t* xq = a.q.data() + n0 * K;
  const float* dl = a.dl.data() + n0 * nc * 2;
  const float* cl = a.cl.data() + n0 * nc * 2;
  const int32_t* in = init ? init + n0 * (K / 4) : nullptr;
  __m256 lo_acc[G], hi_acc[G];
  for (int g = 0; g < G; ++g) lo_acc[g] = hi_acc[g] = _mm256_setzero_ps();
  Scales sc;
  const __m256i z = _mm256_setzero_si256();
  for (int64_t c = 0; c < nc; ++c) {
    __m256i ulo, uhi;
    chunk_bytes<T>(row, c, ulo, uhi);
    chunk_scales<T>(row, c, sc);
    for (int g = 0; g < G; ++g) {
      const int8_t* xg = xq + g * K + c * 64;
      const int32_t* ig = in ? in + g * (K / 4) + c * 16 : nullptr;
      const __m256i llo = dot4<sgn>(ig ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ig)) : z, ulo,
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg)));
      const __m256i lhi = dot4<sgn>(ig ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ig + 8)) : z, uhi,
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 32)));
      const __m256 d = pair256(dl + (g * nc + c) * 2);
      lo_acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(llo), _mm256_mul_ps(sc.s_lo, d), lo_acc[g]);
      hi_acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lhi), _mm256_mul_ps(sc.s_hi, d), hi_acc[g]);
      if constexpr (mins) {
        const __m256 cg = pair256(cl + (g * nc + c) * 2);
        lo_acc[g] = _mm256_fmadd_ps(sc.m_lo, cg, lo_acc[g]);
        hi_acc[g] = _mm256_fmadd_ps(sc.m_hi, cg, hi_acc[g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) y[g * ldy] = hsum8(_mm256_add_ps(lo_acc[g], hi_acc[g]));
}

template <int T>
inline void chunk_values(const uint8_t* row, int64_t c, int* q) {
  __m256i lo, hi;
  uint8_t u[64];
  chunk_bytes<T>(row, c, lo, hi);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(u), lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + 32), hi);
  for (int e = 0; e < 64; ++e)
    q[e] = T == T_Q8_0 ? static_cast<int>(static_cast<int8_t>(u[e])) : static_cast<int>(u[e]) - lane_offset(T);
}
constexpr int kGroup = 4;
#endif

// software prefetch distances in bytes, into L1 and into L2 (speed only; prefetches never fault)
int64_t g_pf_bytes = 4096, g_pf2_bytes = 0;

// weight rows o0..o1 of one part against all x rows: each group of x rows stays
// in L1 while it passes over the rows (grouping changes nothing per output)
template <int T, int G>
inline void rows_group(const uint8_t* w, int64_t rb, int64_t o0, int64_t o1, const XQ& a, const int32_t* init,
                       int64_t n0, float* y, int64_t ldy) {
  const int64_t pf = g_pf_bytes, pf2 = g_pf2_bytes;
  for (int64_t o = o0; o < o1; ++o) {
    if (n0 == 0) {  // the first pass streams the rows from memory: fetch ahead
      if (pf > 0)
        for (int64_t l = 0; l < rb; l += 64) _mm_prefetch(reinterpret_cast<const char*>(w + o * rb + pf + l), _MM_HINT_T0);
      if (pf2 > 0)
        for (int64_t l = 0; l < rb; l += 64) _mm_prefetch(reinterpret_cast<const char*>(w + o * rb + pf2 + l), _MM_HINT_T1);
    }
    row_group<T, G>(w + o * rb, a, init, n0, y + n0 * ldy + o, ldy);
  }
}

template <int T>
void rows_all(const uint8_t* w, int64_t rb, int64_t o0, int64_t o1, const XQ& a, const int32_t* init, float* y,
              int64_t ldy) {
  int64_t n = 0;
  for (; n + kGroup <= a.N; n += kGroup) rows_group<T, kGroup>(w, rb, o0, o1, a, init, n, y, ldy);
  switch (a.N - n) {
#if MTP_AVX512
    case 7: rows_group<T, 7>(w, rb, o0, o1, a, init, n, y, ldy); break;
    case 6: rows_group<T, 6>(w, rb, o0, o1, a, init, n, y, ldy); break;
    case 5: rows_group<T, 5>(w, rb, o0, o1, a, init, n, y, ldy); break;
    case 4: rows_group<T, 4>(w, rb, o0, o1, a, init, n, y, ldy); break;
#endif
    case 3: rows_group<T, 3>(w, rb, o0, o1, a, init, n, y, ldy); break;
    case 2: rows_group<T, 2>(w, rb, o0, o1, a, init, n, y, ldy); break;
    case 1: rows_group<T, 1>(w, rb, o0, o1, a, init, n, y, ldy); break;
    default: break;
  }
}

// exact fp32 weights of one row
template <int T>
void dequant_row(const uint8_t* row, int64_t K, float* out) {
  Scales sc;
  alignas(32) float s[16], m[16] = {0};
  int q[64];
  for (int64_t c = 0; c < K / 64; ++c) {
    chunk_scales<T>(row, c, sc);
    _mm256_storeu_ps(s, sc.s_lo);
    _mm256_storeu_ps(s + 8, sc.s_hi);
    if constexpr (has_mins(T)) {
      _mm256_storeu_ps(m, sc.m_lo);
      _mm256_storeu_ps(m + 8, sc.m_hi);
    }
    chunk_values<T>(row, c, q);
    for (int p = 0; p < 64; ++p) {
      const float v = s[p / 4] * static_cast<float>(q[p]);
      out[c * 64 + chunk_elem(p)] = has_mins(T) ? v + m[p / 4] : v;
    }
  }
}

// runtime type -> template instance
template <typename F>
inline void dispatch(int t, const F& f) {
  switch (t) {
    case T_Q8_0: f(std::integral_constant<int, T_Q8_0>{}); break;
    case T_Q4_0: f(std::integral_constant<int, T_Q4_0>{}); break;
    case T_Q4_1: f(std::integral_constant<int, T_Q4_1>{}); break;
    case T_Q5_0: f(std::integral_constant<int, T_Q5_0>{}); break;
    case T_Q4_K: f(std::integral_constant<int, T_Q4_K>{}); break;
    case T_Q6_K: f(std::integral_constant<int, T_Q6_K>{}); break;
    default: TORCH_CHECK(false, "unsupported quantized weight type ", t);
  }
}

void check_part(const torch::Tensor& w, int64_t t, int64_t K) {
  TORCH_CHECK(rec_bytes(static_cast<int>(t)) > 0, "unsupported quantized weight type ", t);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "quantized weight must be a contiguous uint8 [O, row_bytes] tensor");
  TORCH_CHECK(K % rec_elems(static_cast<int>(t)) == 0, "quantized weight: K=", K, " is not a multiple of ",
              rec_elems(static_cast<int>(t)));
  TORCH_CHECK(w.size(1) == K / rec_elems(static_cast<int>(t)) * rec_bytes(static_cast<int>(t)),
              "quantized weight: row bytes ", w.size(1), " do not match K=", K);
}

}  // namespace

// y = x @ W.T for W the row concatenation of quantized parts (one type each).
// x: [..., K] float32 (K a multiple of 64) -> [..., sum O_p] float32.
torch::Tensor qlinear(torch::Tensor x, std::vector<torch::Tensor> parts, std::vector<int64_t> types) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "qlinear: x must be float32 [..., K]");
  TORCH_CHECK(parts.size() == types.size() && !parts.empty(), "qlinear: one type per part");
  x = x.contiguous();
  const int64_t K = x.size(-1), N = K ? x.numel() / K : 0;
  TORCH_CHECK(K % 64 == 0, "qlinear: K must be a multiple of 64, got ", K);
  int64_t O = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    check_part(parts[p], types[p], K);
    O += parts[p].size(0);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  auto y = torch::empty(sizes, x.options());
  if (N == 0 || O == 0) return y;
  XQ a;
  quantize_x(x.data_ptr<float>(), N, K, a);
  // lane offsets: init = -off * (sum of the lane's 4 activations)
  std::vector<std::vector<int32_t>> inits(parts.size());
  std::vector<const int32_t*> initp(parts.size(), nullptr);
  for (size_t p = 0; p < parts.size(); ++p) {
    const int off = lane_offset(static_cast<int>(types[p]));
    if (!off) continue;
    inits[p].resize(a.ls.size());
    for (size_t i = 0; i < a.ls.size(); ++i) inits[p][i] = -off * a.ls[i];
    initp[p] = inits[p].data();
  }
  // tasks: blocks of 16 output rows over all parts
  constexpr int64_t kRows = 16;
  std::vector<int64_t> part_of, start;
  int64_t col = 0;
  std::vector<int64_t> col0(parts.size());
  for (size_t p = 0; p < parts.size(); ++p) {
    col0[p] = col;
    for (int64_t o = 0; o < parts[p].size(0); o += kRows) part_of.push_back(static_cast<int64_t>(p)), start.push_back(o);
    col += parts[p].size(0);
  }
  const int64_t bytes_per_task = kRows * parts[0].size(1) * std::max<int64_t>(N, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(bytes_per_task, 1));
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(part_of.size()), grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p = part_of[b];
      const int t = static_cast<int>(types[p]);
      const auto& w = parts[p];
      const int64_t rb = w.size(1), o1 = std::min<int64_t>(w.size(0), start[b] + kRows);
      const uint8_t* wd = w.data_ptr<uint8_t>();
      dispatch(t, [&](auto T) { rows_all<decltype(T)::value>(wd, rb, start[b], o1, a, initp[p], yd + col0[p], O); });
    }
  });
  return y;
}

// Exact fp32 values of the selected rows: ids [M] int64 -> [M, K].
torch::Tensor qrows(torch::Tensor w, int64_t t, int64_t K, torch::Tensor ids) {
  check_part(w, t, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "qrows: ids must be int64");
  ids = ids.contiguous();
  const int64_t M = ids.numel(), O = w.size(0), rb = w.size(1);
  auto out = torch::empty({M, K}, torch::dtype(torch::kFloat32));
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(idp[i] >= 0 && idp[i] < O, "qrows: row ", idp[i], " out of range [0, ", O, ")");
  const uint8_t* wd = w.data_ptr<uint8_t>();
  float* od = out.data_ptr<float>();
  const int ti = static_cast<int>(t);
  at::parallel_for(0, M, 64, [&](int64_t i0, int64_t i1) {
    dispatch(ti, [&](auto T) {
      for (int64_t i = i0; i < i1; ++i) dequant_row<decltype(T)::value>(wd + idp[i] * rb, K, od + i * K);
    });
  });
  return out;
}

// A copy of a large tensor in transparent huge pages (fewer TLB misses when streamed).
torch::Tensor huge_copy(torch::Tensor w) {
  w = w.contiguous();
  const size_t bytes = static_cast<size_t>(w.numel()) * w.element_size();
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < 2 * kHuge) return w.clone();
  const size_t len = bytes + kHuge;
  void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return w.clone();
  char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(kHuge - 1));
  madvise(aligned, bytes, MADV_HUGEPAGE);
  auto out = torch::from_blob(aligned, w.sizes(), [base, len](void*) { munmap(base, len); }, w.options());
  out.copy_(w);
  return out;
}

std::string isa() { return MTP_AVX512 ? "avx512-vnni" : "avx2"; }

void set_prefetch(int64_t l1_bytes, int64_t l2_bytes) {
  g_pf_bytes = l1_bytes;
  g_pf2_bytes = l2_bytes;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "batch-invariant y = x @ W.T over quantized row blocks");
  m.def("qrows", &qrows, "exact fp32 values of selected rows of a quantized weight");
  m.def("huge_copy", &huge_copy, "copy into transparent huge pages");
  m.def("isa", &isa, "instruction set this build uses");
  m.def("_set_prefetch", &set_prefetch, "speed-only knobs: software prefetch distances into L1 and L2, bytes (0 = off)");
}
