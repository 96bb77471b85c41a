// Batch-invariant linear layers over quantized weights (GGUF block types).
//
// Weights stay in their file's blocks, rearranged bit for bit into *panels* of 16
// output rows (layouts: mtpdraft/kernels/quant.py).  Within a panel, each 32-weight
// block is stored so that one 64-byte register holds 4 consecutive weights of each
// of the 16 rows (byte 4j + i: row j, weight 4k + i of the block, k = 0..7), as
// unsigned values u = q + offset.  One vpdpbusd with the activation row's 4 bytes
// broadcast then advances 16 outputs by 4 weights; 8 of them finish a block, and no
// output ever needs a horizontal sum.  Decoding a block is shared by every row of x
// in the call, so verifying k+1 positions costs little more than decoding one.
//
// Activations are quantized per row to int8 in blocks of 32 (scale absmax / 127),
// as llama.cpp does for batched verification.  Per row of x and output (one lane),
// over the blocks b in order:
//
//   isum = sum(u * x) - offset * sum(x)                         (exact int32)
//   acc  = fma(float(isum), weight scale * x scale_b, acc)     (Q6_K: per 16 weights)
//   acc  = acc +- weight min * (x scale_b * sum(x))            (Q4_1 +, Q4_K -)
//
// The float operations of one output depend only on K and the type: not on how
// many rows share the call, how they are grouped, or how threads split the panels.
// The AVX-512 (VNNI) and AVX2 builds produce the same integer sums and the same
// float sequence, hence the same bits.
//
// Compiled with -ffp-contract=off (scalar glue is never fused differently).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>

#include "mtpdraft_layer_fns.h"

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
constexpr int64_t kPanel = 16;  // output rows per panel

// weights of one row per unit (a block, or a K-quant super-block) and a panel's bytes per unit
constexpr int64_t unit_elems(int t) { return (t == T_Q4_K || t == T_Q6_K) ? 256 : 32; }
constexpr int64_t unit_bytes(int t) {
  switch (t) {
    case T_Q8_0: return 544;   // 16 fp16 scales, 8 x 64 bytes u = q + 128
    case T_Q4_0: return 288;   // scales, 4 x 64 bytes of nibbles (register L low, L + 4 high)
    case T_Q4_1: return 320;   // scales, mins, nibbles
    case T_Q5_0: return 352;   // scales, nibbles, 8 x 64 fifth bits
    case T_Q4_K: return 2368;  // d, dmin, 8 x 16 scales, 8 x 16 mins, 8 blocks of nibbles
    case T_Q6_K: return 3360;  // d, 16 x 16 int8 scales, 8 blocks of (nibbles, 2 x 64 bytes of 2 high bits)
  }
  return 0;  // unsupported (check_part refuses it)
}

// u = q + value_offset: the unsigned values the layout stores
constexpr int value_offset(int t) {
  return t == T_Q8_0 ? 128 : t == T_Q4_0 ? 8 : t == T_Q5_0 ? 16 : t == T_Q6_K ? 32 : 0;
}
// integer offset folded into the block sum: sum(w x) = sum(u x) - off * sum(x) (Q6_K per 16
// weights); AVX2 multiplies Q8_0's signed bytes instead
constexpr int block_offset(int t) { return t == T_Q8_0 && !MTP_AVX512 ? 0 : value_offset(t); }

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
inline int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Activations of N rows, quantized per 32 (K a multiple of 32), natural order.
struct XQ {
  int64_t N = 0, K = 0, nb = 0;
  std::vector<int8_t> q;     // [N][K]
  std::vector<int32_t> s16;  // [N][K/16]  sums of 16 quantized activations
  std::vector<float> d;      // [N][nb]    block scales
  std::vector<float> cs;     // [N][nb]    block scale * block sum (types with mins)
};

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline int hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// per block of 32: d = absmax / 127, q = clamp(round-to-nearest-even(x * 127 / absmax), -127, 127)
// (AVX2 in both builds: exact IEEE operations, so both give the same bytes)
void quantize_x(const float* x, int64_t N, int64_t K, XQ& a) {
  a.N = N, a.K = K, a.nb = K / 32;
  a.q.resize(N * K);
  a.s16.resize(N * K / 16);
  a.d.resize(N * a.nb);
  a.cs.resize(N * a.nb);
  const __m256 sign = _mm256_set1_ps(-0.0f), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* xb = x + n * K + b * 32;
      __m256 v[4];
      __m256 m = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
      }
      const float amax = hmax8(m);
      const float d = amax / 127.0f;
      const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
      }
      const int s0 = hsum8i(_mm256_add_epi32(q[0], q[1])), s1 = hsum8i(_mm256_add_epi32(q[2], q[3]));
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + n * K + b * 32), _mm256_permutevar8x32_epi32(p, perm));
      a.s16[(n * K) / 16 + 2 * b] = s0;
      a.s16[(n * K) / 16 + 2 * b + 1] = s1;
      a.d[n * a.nb + b] = d;
      a.cs[n * a.nb + b] = d * static_cast<float>(s0 + s1);
    }
  }
}

// ---------------------------------------------------------------------------
// Exact values, scalar (embedding rows; the reference the vector code must match).
// ---------------------------------------------------------------------------
template <int T>
void dequant_row(const uint8_t* panel, int j, int64_t K, float* out) {
  for (int64_t b = 0; b < K / 32; ++b, out += 32) {
    // element e = 4k + i of the block: register k, byte t = 4j + i
    if constexpr (T == T_Q8_0) {
      const uint8_t* p = panel + b * 544;
      const float d = h2f(p + 2 * j);
      for (int k = 0; k < 8; ++k)
        for (int i = 0; i < 4; ++i) out[4 * k + i] = d * static_cast<float>(static_cast<int>(p[32 + 64 * k + 4 * j + i]) - 128);
    } else if constexpr (T == T_Q4_0 || T == T_Q4_1 || T == T_Q5_0) {
      const uint8_t* p = panel + b * unit_bytes(T);
      const uint8_t* nib = p + (T == T_Q4_1 ? 64 : 32);
      const float d = h2f(p + 2 * j);
      const float m = T == T_Q4_1 ? h2f(p + 32 + 2 * j) : 0.0f;
      for (int k = 0; k < 8; ++k) {
        const uint32_t hb = T == T_Q5_0 ? static_cast<uint32_t>(load64(p + 288 + 8 * k) >> (4 * j)) : 0u;
        for (int i = 0; i < 4; ++i) {
          int u = (nib[64 * (k % 4) + 4 * j + i] >> (4 * (k / 4))) & 15;
          if constexpr (T == T_Q5_0) u += 16 * static_cast<int>((hb >> i) & 1);
          if constexpr (T == T_Q4_1) out[4 * k + i] = d * static_cast<float>(u) + m;
          else out[4 * k + i] = d * static_cast<float>(u - value_offset(T));
        }
      }
    } else if constexpr (T == T_Q4_K) {
      const uint8_t* sp = panel + (b / 8) * 2368;
      const int s = static_cast<int>(b % 8);
      const float sc = h2f(sp + 2 * j) * static_cast<float>(sp[64 + 16 * s + j]);
      const float mn = h2f(sp + 32 + 2 * j) * static_cast<float>(sp[192 + 16 * s + j]);
      const uint8_t* nib = sp + 320 + 256 * s;
      for (int k = 0; k < 8; ++k)
        for (int i = 0; i < 4; ++i)
          out[4 * k + i] = sc * static_cast<float>((nib[64 * (k % 4) + 4 * j + i] >> (4 * (k / 4))) & 15) - mn;
    } else if constexpr (T == T_Q6_K) {
      const uint8_t* sp = panel + (b / 8) * 3360;
      const int jb = static_cast<int>(b % 8);
      const uint8_t* base = sp + 288 + 384 * jb;
      const float d = h2f(sp + 2 * j);
      for (int k = 0; k < 8; ++k) {
        const float sc = d * static_cast<float>(static_cast<int8_t>(sp[32 + 16 * (2 * jb + k / 4) + j]));
        for (int i = 0; i < 4; ++i) {
          const int t = 4 * j + i;
          const int lo = (base[64 * (k % 4) + t] >> (4 * (k / 4))) & 15;
          const int hi = (base[256 + 64 * (k / 4) + t] >> (2 * (k % 4))) & 3;
          out[4 * k + i] = sc * static_cast<float>((lo | (hi << 4)) - 32);
        }
      }
    }
  }
}

// Software prefetch kPrefetch bytes ahead of the block being decoded (the panels a thread walks are
// one contiguous stream, so this runs into the next panel). Without it the stream stalls
// while several rows compute: measured on the 262144 x 640 Q8_0 head, 2 threads, 7 rows
// 9.7 -> 6.3 ms (1 row 5.3 -> 5.1 ms); 4-12 KB all gave about the same, 32 KB less (Zen 4).
// The AVX2 build's figures (Zen 3) were measured with 64 KB; 2-128 KB were within noise there.
// With several rows the AVX-512 build prefetches into L2 only (T1): whole model, 7 positions,
// 13.7-14.1 -> 11.6-12.5 ms (Zen 4, one process, interleaved); one row keeps T0 (T1 was no
// faster there). Prefetching changes no arithmetic.
constexpr int64_t kPrefetch = MTP_AVX512 ? 8192 : 65536;
template <int T>
[[gnu::always_inline]] inline void prefetch_ahead(const uint8_t* panel, int64_t b, bool to_l2) {
  constexpr int64_t per_block = unit_bytes(T) / (unit_elems(T) / 32);  // bytes per 32 weights
  const char* p = reinterpret_cast<const char*>(panel) + b * per_block + kPrefetch;
  if (MTP_AVX512 && to_l2) {
    for (int64_t l = 0; l < per_block; l += 64) _mm_prefetch(p + l, _MM_HINT_T1);
  } else {
    for (int64_t l = 0; l < per_block; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
  }
}

#if MTP_AVX512
// ---------------------------------------------------------------------------
// AVX-512 + VNNI: a decoded block is 8 zmm (16 rows x 32 weights); one row of x
// costs 8 vpdpbusd (activations as embedded broadcasts), a conversion, a scale
// product and an FMA per block for all 16 outputs.
// ---------------------------------------------------------------------------
struct Block {
  __m512i w[8];
  __m512 s0, s1, m;  // scales (s1: Q6_K's second 16 weights), mins
};

inline __m512 f16x16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 u8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 i8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// 256 bytes of nibbles -> 8 registers (byte t of load L: register L low, L + 4 high)
inline void nibbles(const uint8_t* p, __m512i* w) {
  const __m512i m = _mm512_set1_epi8(0x0F);
  for (int L = 0; L < 4; ++L) {
    const __m512i v = _mm512_loadu_si512(p + 64 * L);
    w[L] = _mm512_and_si512(v, m);
    w[L + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  }
}

// always inlined: GCC kept several types' decode as a call per block, spilling the Block to the
// stack and back (Q4_0/Q4_1/Q5_0/Q4_K ran at half the speed of an inlined Q8_0)
template <int T>
[[gnu::always_inline]] inline void decode(const uint8_t* panel, int64_t b, Block& o) {
  if constexpr (T == T_Q8_0) {
    const uint8_t* p = panel + b * 544;
    o.s0 = f16x16(p);
    for (int k = 0; k < 8; ++k) o.w[k] = _mm512_loadu_si512(p + 32 + 64 * k);
  } else if constexpr (T == T_Q4_0 || T == T_Q4_1) {
    const uint8_t* p = panel + b * unit_bytes(T);
    o.s0 = f16x16(p);
    if constexpr (T == T_Q4_1) o.m = f16x16(p + 32);
    nibbles(p + (T == T_Q4_1 ? 64 : 32), o.w);
  } else if constexpr (T == T_Q5_0) {
    const uint8_t* p = panel + b * 352;
    o.s0 = f16x16(p);
    nibbles(p + 32, o.w);
    const __m512i k16 = _mm512_set1_epi8(16);
    for (int k = 0; k < 8; ++k) o.w[k] = _mm512_mask_add_epi8(o.w[k], load64(p + 288 + 8 * k), o.w[k], k16);
  } else if constexpr (T == T_Q4_K) {
    const uint8_t* sp = panel + (b >> 3) * 2368;
    const int s = static_cast<int>(b & 7);
    o.s0 = _mm512_mul_ps(f16x16(sp), u8x16(sp + 64 + 16 * s));
    o.m = _mm512_mul_ps(f16x16(sp + 32), u8x16(sp + 192 + 16 * s));
    nibbles(sp + 320 + 256 * s, o.w);
  } else if constexpr (T == T_Q6_K) {
    const uint8_t* sp = panel + (b >> 3) * 3360;
    const int jb = static_cast<int>(b & 7);
    const __m512 d = f16x16(sp);
    o.s0 = _mm512_mul_ps(d, i8x16(sp + 32 + 16 * (2 * jb)));
    o.s1 = _mm512_mul_ps(d, i8x16(sp + 32 + 16 * (2 * jb + 1)));
    const uint8_t* base = sp + 288 + 384 * jb;
    nibbles(base, o.w);
    const __m512i m30 = _mm512_set1_epi8(0x30);
    for (int H = 0; H < 2; ++H) {  // bits 2c, 2c + 1 of byte t: high bits of register 4H + c
      const __m512i h = _mm512_loadu_si512(base + 256 + 64 * H);
      const __m512i sh[4] = {_mm512_slli_epi16(h, 4), _mm512_slli_epi16(h, 2), h, _mm512_srli_epi16(h, 2)};
      for (int c = 0; c < 4; ++c) o.w[4 * H + c] = _mm512_ternarylogic_epi32(o.w[4 * H + c], sh[c], m30, 0xF8);
    }
  }
}

// acc += w (u8) . 4 activations of x broadcast to every lane. The broadcast is the
// instruction's own memory operand ({1to16}): GCC materializes _mm512_set1_epi32 of a load
// as a separate vpbroadcastd, which costs ~10-20% with several rows (vector pipes are the
// limit there). Same integer sums either way.
typedef int32_t __attribute__((may_alias, aligned(1))) i32_unaligned;
[[gnu::always_inline]] inline __m512i dpb(__m512i acc, __m512i w, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const i32_unaligned*>(p)));
  return acc;
}

template <int T, int G>
inline void panel_rows(const uint8_t* panel, const XQ& a, const int32_t* init, int64_t n0, float* y, int64_t ldy) {
  const bool prefetch = n0 == 0;  // later groups of rows find the panel in cache
  const int64_t K = a.K, nb = a.nb;
  const int8_t* xq = a.q.data() + n0 * K;
  const float* dl = a.d.data() + n0 * nb;
  const float* cs = a.cs.data() + n0 * nb;
  constexpr int64_t ipr = T == T_Q6_K ? 2 : 1;  // offset sums per block
  const int32_t* in = init + n0 * nb * ipr;
  __m512 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
  Block wb;
  for (int64_t b = 0; b < nb; ++b) {
    if (prefetch) prefetch_ahead<T>(panel, b, a.N > 1);
    decode<T>(panel, b, wb);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const int8_t* xb = xq + g * K + b * 32;
      const __m512 dg = _mm512_set1_ps(dl[g * nb + b]);
      if constexpr (T == T_Q6_K) {
#pragma GCC unroll 2
        for (int H = 0; H < 2; ++H) {
          __m512i li = _mm512_set1_epi32(in[(g * nb + b) * 2 + H]);
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) li = dpb(li, wb.w[4 * H + c], xb + 16 * H + 4 * c);
          acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(li), _mm512_mul_ps(H ? wb.s1 : wb.s0, dg), acc[g]);
        }
      } else {
        // two dependency chains when few rows hide the dot-product latency (integer sums: same result)
        __m512i li = _mm512_set1_epi32(in[g * nb + b]), l2 = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          if (G <= 2 && (k & 1)) l2 = dpb(l2, wb.w[k], xb + 4 * k);
          else li = dpb(li, wb.w[k], xb + 4 * k);
        }
        if constexpr (G <= 2) li = _mm512_add_epi32(li, l2);
        acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(li), _mm512_mul_ps(wb.s0, dg), acc[g]);
        if constexpr (T == T_Q4_1) acc[g] = _mm512_fmadd_ps(wb.m, _mm512_set1_ps(cs[g * nb + b]), acc[g]);
        if constexpr (T == T_Q4_K) acc[g] = _mm512_fnmadd_ps(wb.m, _mm512_set1_ps(cs[g * nb + b]), acc[g]);
      }
    }
  }
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(y + g * ldy, acc[g]);
}
constexpr int kGroup = 8;
#else
// ---------------------------------------------------------------------------
// AVX2: the panel as two halves of 8 rows; u8 x s8 products via maddubs (no
// saturation: 4-6 bit values are < 64, and Q8_0 uses |w| * sign(x, w)).
// Same integer sums and float sequence per output as the AVX-512 build.
// ---------------------------------------------------------------------------
struct Block {
  __m256i w[8];
  __m256 s0, s1, m;
};

inline __m256 f16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 u8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 i8x8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// half h (bytes 32h..32h+31 of each 64-byte register)
inline void nibbles(const uint8_t* p, int h, __m256i* w) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  for (int L = 0; L < 4; ++L) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * L + 32 * h));
    w[L] = _mm256_and_si256(v, m);
    w[L + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  }
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

template <int T>
[[gnu::always_inline]] inline void decode(const uint8_t* panel, int64_t b, int h, Block& o) {  // as above
  if constexpr (T == T_Q8_0) {
    const uint8_t* p = panel + b * 544;
    o.s0 = f16x8(p + 16 * h);
    const __m256i k80 = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int k = 0; k < 8; ++k)  // signed weights
      o.w[k] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + 64 * k + 32 * h)), k80);
  } else if constexpr (T == T_Q4_0 || T == T_Q4_1) {
    const uint8_t* p = panel + b * unit_bytes(T);
    o.s0 = f16x8(p + 16 * h);
    if constexpr (T == T_Q4_1) o.m = f16x8(p + 32 + 16 * h);
    nibbles(p + (T == T_Q4_1 ? 64 : 32), h, o.w);
  } else if constexpr (T == T_Q5_0) {
    const uint8_t* p = panel + b * 352;
    o.s0 = f16x8(p + 16 * h);
    nibbles(p + 32, h, o.w);
    for (int k = 0; k < 8; ++k)
      o.w[k] = _mm256_or_si256(o.w[k], bits_to_16(static_cast<uint32_t>(load64(p + 288 + 8 * k) >> (32 * h))));
  } else if constexpr (T == T_Q4_K) {
    const uint8_t* sp = panel + (b >> 3) * 2368;
    const int s = static_cast<int>(b & 7);
    o.s0 = _mm256_mul_ps(f16x8(sp + 16 * h), u8x8(sp + 64 + 16 * s + 8 * h));
    o.m = _mm256_mul_ps(f16x8(sp + 32 + 16 * h), u8x8(sp + 192 + 16 * s + 8 * h));
    nibbles(sp + 320 + 256 * s, h, o.w);
  } else if constexpr (T == T_Q6_K) {
    const uint8_t* sp = panel + (b >> 3) * 3360;
    const int jb = static_cast<int>(b & 7);
    const __m256 d = f16x8(sp + 16 * h);
    o.s0 = _mm256_mul_ps(d, i8x8(sp + 32 + 16 * (2 * jb) + 8 * h));
    o.s1 = _mm256_mul_ps(d, i8x8(sp + 32 + 16 * (2 * jb + 1) + 8 * h));
    const uint8_t* base = sp + 288 + 384 * jb;
    nibbles(base, h, o.w);
    const __m256i m30 = _mm256_set1_epi8(0x30);
    for (int H = 0; H < 2; ++H) {
      const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + 256 + 64 * H + 32 * h));
      const __m256i sh[4] = {_mm256_slli_epi16(hv, 4), _mm256_slli_epi16(hv, 2), hv, _mm256_srli_epi16(hv, 2)};
      for (int c = 0; c < 4; ++c) o.w[4 * H + c] = _mm256_or_si256(o.w[4 * H + c], _mm256_and_si256(sh[c], m30));
    }
  }
}

// 4 weights of 8 rows (w: u8 values < 64) times 4 activations broadcast: 16-bit pair sums
inline __m256i mul4(__m256i w, const int8_t* x) { return _mm256_maddubs_epi16(w, _mm256_set1_epi32(load32(x))); }
// Q8_0: |w| (hoisted by the caller) times x with w's sign
inline __m256i mul4s(__m256i aw, __m256i w, const int8_t* x) {
  return _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_set1_epi32(load32(x)), w));
}
// acc += the 32-bit sums of 16-bit pair sums p
inline __m256i widen_add(__m256i acc, __m256i p) { return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1))); }

// one block (32 weights) of panel half h against G rows of x, into acc[0..G)
template <int T, int G>
[[gnu::always_inline]] inline void block_rows(const uint8_t* panel, int64_t b, int h, const int8_t* xq,
                                              const float* dl, const float* cs, const int32_t* in, int64_t K,
                                              int64_t nb, __m256* acc) {
  constexpr bool sgn = T == T_Q8_0;
  Block wb;
  decode<T>(panel, b, h, wb);
  __m256i aw[sgn ? 8 : 1];  // Q8_0: |w|, shared by every row
  if constexpr (sgn)
    for (int k = 0; k < 8; ++k) aw[k] = _mm256_sign_epi8(wb.w[k], wb.w[k]);
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    const int8_t* xb = xq + g * K + b * 32;
    const __m256 dg = _mm256_set1_ps(dl[g * nb + b]);
    if constexpr (T == T_Q6_K) {
#pragma GCC unroll 2
      for (int H = 0; H < 2; ++H) {
        __m256i li = _mm256_set1_epi32(in[(g * nb + b) * 2 + H]);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c += 2)  // two 16-bit pair sums add without overflow: |u x| < 64 * 128
          li = widen_add(li, _mm256_add_epi16(mul4(wb.w[4 * H + c], xb + 16 * H + 4 * c),
                                              mul4(wb.w[4 * H + c + 1], xb + 16 * H + 4 * c + 4)));
        acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(li), _mm256_mul_ps(H ? wb.s1 : wb.s0, dg), acc[g]);
      }
    } else {
      __m256i li = _mm256_set1_epi32(in[g * nb + b]);
#pragma GCC unroll 8
      for (int k = 0; k < 8; k += 2) {
        if constexpr (sgn) {  // Q8_0: pair sums reach 2 * 127 * 127, so widen each one
          li = widen_add(li, mul4s(aw[k], wb.w[k], xb + 4 * k));
          li = widen_add(li, mul4s(aw[k + 1], wb.w[k + 1], xb + 4 * k + 4));
        } else {  // values < 64: two pair sums add without overflow
          li = widen_add(li, _mm256_add_epi16(mul4(wb.w[k], xb + 4 * k), mul4(wb.w[k + 1], xb + 4 * k + 4)));
        }
      }
      acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(li), _mm256_mul_ps(wb.s0, dg), acc[g]);
      if constexpr (T == T_Q4_1) acc[g] = _mm256_fmadd_ps(wb.m, _mm256_set1_ps(cs[g * nb + b]), acc[g]);
      if constexpr (T == T_Q4_K) acc[g] = _mm256_fnmadd_ps(wb.m, _mm256_set1_ps(cs[g * nb + b]), acc[g]);
    }
  }
}

template <int T, int G>
inline void panel_rows(const uint8_t* panel, const XQ& a, const int32_t* init, int64_t n0, float* y, int64_t ldy) {
  const bool prefetch = n0 == 0;  // later groups of rows find the panel in cache
  const int64_t K = a.K, nb = a.nb;
  const int8_t* xq = a.q.data() + n0 * K;
  const float* dl = a.d.data() + n0 * nb;
  const float* cs = a.cs.data() + n0 * nb;
  constexpr int64_t ipr = T == T_Q6_K ? 2 : 1;
  const int32_t* in = init + n0 * nb * ipr;
  if constexpr (G <= 2) {
    // few rows: both halves of each block in one sweep of the panel (the stream is read
    // once, in order); each output still accumulates over b in the same order
    __m256 acc[2][G];
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < G; ++g) acc[h][g] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      if (prefetch) prefetch_ahead<T>(panel, b, a.N > 1);
      for (int h = 0; h < 2; ++h) block_rows<T, G>(panel, b, h, xq, dl, cs, in, K, nb, acc[h]);
    }
    for (int h = 0; h < 2; ++h)
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(y + g * ldy + 8 * h, acc[h][g]);
  } else {
    // more rows: one half at a time, up to 8 rows per decode of it (some registers spill to
    // L1, which costs less than decoding again: head, 2 threads, Zen 3, 7 rows as 4 + 3 rows
    // 21.2 ms, as one group 18.3 ms)
    for (int h = 0; h < 2; ++h) {
      __m256 acc[G];
      for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        if (prefetch && h == 0) prefetch_ahead<T>(panel, b, a.N > 1);
        block_rows<T, G>(panel, b, h, xq, dl, cs, in, K, nb, acc);
      }
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(y + g * ldy + 8 * h, acc[g]);
    }
  }
}
constexpr int kGroup = 8;
#endif

// one panel against all x rows, in groups of rows (grouping changes nothing per output).
template <int T>
void panel_all(const uint8_t* panel, const XQ& a, const int32_t* init, float* y, int64_t ldy) {
  int64_t n = 0;
  for (; n + kGroup <= a.N; n += kGroup) panel_rows<T, kGroup>(panel, a, init, n, y + n * ldy, ldy);
  float* yn = y + n * ldy;
  switch (a.N - n) {
    case 7: panel_rows<T, 7>(panel, a, init, n, yn, ldy); break;
    case 6: panel_rows<T, 6>(panel, a, init, n, yn, ldy); break;
    case 5: panel_rows<T, 5>(panel, a, init, n, yn, ldy); break;
    case 4: panel_rows<T, 4>(panel, a, init, n, yn, ldy); break;
    case 3: panel_rows<T, 3>(panel, a, init, n, yn, ldy); break;
    case 2: panel_rows<T, 2>(panel, a, init, n, yn, ldy); break;
    case 1: panel_rows<T, 1>(panel, a, init, n, yn, ldy); break;
    default: break;
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
  const int ti = static_cast<int>(t);
  TORCH_CHECK(unit_bytes(ti) > 0, "unsupported quantized weight type ", t);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "quantized weight must be a contiguous uint8 [O/16, panel_bytes] tensor");
  TORCH_CHECK(K % unit_elems(ti) == 0, "quantized weight: K=", K, " is not a multiple of ", unit_elems(ti));
  TORCH_CHECK(w.size(1) == K / unit_elems(ti) * unit_bytes(ti), "quantized weight: panel bytes ", w.size(1),
              " do not match K=", K);
}

}  // namespace

// y = x @ W.T for W the row concatenation of quantized parts (one type each).
// x: [..., K] float32 (K a multiple of 32) -> [..., sum O_p] float32.
torch::Tensor qlinear(torch::Tensor x, std::vector<torch::Tensor> parts, std::vector<int64_t> types) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "qlinear: x must be float32 [..., K]");
  TORCH_CHECK(parts.size() == types.size() && !parts.empty(), "qlinear: one type per part");
  x = x.contiguous();
  const int64_t K = x.size(-1), N = K ? x.numel() / K : 0;
  TORCH_CHECK(K % 32 == 0, "qlinear: K must be a multiple of 32, got ", K);
  int64_t O = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    check_part(parts[p], types[p], K);
    O += parts[p].size(0) * kPanel;
  }
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  auto y = torch::empty(sizes, x.options());
  if (N == 0 || O == 0) return y;
  XQ a;
  quantize_x(x.data_ptr<float>(), N, K, a);
  // offsets: a block sum starts at -off * sum(x) (per 16 weights for Q6_K; zeros without
  // offset), one array per type present (fused parts often share one)
  std::vector<std::vector<int32_t>> init_of(T_Q6_K + 1);
  for (size_t p = 0; p < parts.size(); ++p) {
    const int t = static_cast<int>(types[p]), off = block_offset(t);
    auto& v = init_of[t];
    if (!v.empty()) continue;
    if (t == T_Q6_K) {
      v.resize(a.s16.size());
      for (size_t i = 0; i < v.size(); ++i) v[i] = -off * a.s16[i];
    } else {
      v.resize(a.s16.size() / 2);
      for (size_t i = 0; i < v.size(); ++i) v[i] = -off * (a.s16[2 * i] + a.s16[2 * i + 1]);
    }
  }
  // tasks: panels over all parts
  std::vector<int64_t> part_of, panel_of, col0;
  int64_t col = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    for (int64_t q = 0; q < parts[p].size(0); ++q) {
      part_of.push_back(static_cast<int64_t>(p));
      panel_of.push_back(q);
      col0.push_back(col + q * kPanel);
    }
    col += parts[p].size(0) * kPanel;
  }
  const int64_t bytes_per_task = parts[0].size(1) * std::max<int64_t>(N, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(bytes_per_task, 1));
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(part_of.size()), grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p = part_of[b];
      const auto& w = parts[p];
      const uint8_t* panel = w.data_ptr<uint8_t>() + panel_of[b] * w.size(1);
      dispatch(static_cast<int>(types[p]),
               [&](auto T) { panel_all<decltype(T)::value>(panel, a, init_of[types[p]].data(), yd + col0[b], O); });
    }
  });
  return y;
}

// Exact fp32 values of the selected rows: ids [M] int64 -> [M, K].
torch::Tensor qrows(torch::Tensor w, int64_t t, int64_t K, torch::Tensor ids) {
  check_part(w, t, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "qrows: ids must be int64");
  ids = ids.contiguous();
  const int64_t M = ids.numel(), O = w.size(0) * kPanel, pb = w.size(1);
  auto out = torch::empty({M, K}, torch::dtype(torch::kFloat32));
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(idp[i] >= 0 && idp[i] < O, "qrows: row ", idp[i], " out of range [0, ", O, ")");
  const uint8_t* wd = w.data_ptr<uint8_t>();
  float* od = out.data_ptr<float>();
  const int ti = static_cast<int>(t);
  at::parallel_for(0, M, 16, [&](int64_t i0, int64_t i1) {
    dispatch(ti, [&](auto T) {
      for (int64_t i = i0; i < i1; ++i)
        dequant_row<decltype(T)::value>(wd + (idp[i] / kPanel) * pb, static_cast<int>(idp[i] % kPanel), K, od + i * K);
    });
  });
  return out;
}

// An uninitialised uint8 buffer in transparent huge pages (fewer TLB misses when streamed);
// ordinary memory below two huge pages.
torch::Tensor huge_empty(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "huge_empty: negative size");
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t n = static_cast<size_t>(bytes);
  if (n < 2 * kHuge) return torch::empty({bytes}, torch::dtype(torch::kUInt8));
  const size_t len = n + kHuge;
  void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return torch::empty({bytes}, torch::dtype(torch::kUInt8));
  char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(kHuge - 1));
  madvise(aligned, n, MADV_HUGEPAGE);
  return torch::from_blob(aligned, {bytes}, [base, len](void*) { munmap(base, len); }, torch::dtype(torch::kUInt8));
}

// A copy of a tensor in transparent huge pages.
torch::Tensor huge_copy(torch::Tensor w) {
  w = w.contiguous();
  const int64_t bytes = w.numel() * w.element_size();
  auto out = huge_empty(bytes).view(w.scalar_type()).view(w.sizes());
  out.copy_(w);
  return out;
}

// ---------------------------------------------------------------------------
// A decoder stack in one call: Gemma 3 and Llama blocks over quantized weights. Each
// layer makes exactly the kernel calls its Python block makes, in the same order with
// the same arguments, so the results are the same bits; what goes is ~10 Python-level
// calls a layer (a few us each, ~10% of a one-token step). The non-linear kernels live in
// mtpdraft_kernels, which hands their addresses over in a capsule (layer_fns).
// ---------------------------------------------------------------------------
struct QMat {
  std::vector<torch::Tensor> parts;
  std::vector<int64_t> types;
};

// One block: h = norm(x); x += [post_attn-norm of] o(attn(qkv(h))); h = pre_mlp-norm(x);
// x += [post_mlp-norm of] down(act(gate_up(h))). Absent post norms: Llama's plain residuals.
struct StackLayer {
  torch::Tensor in_norm, pre_mlp, inv_freq;
  c10::optional<torch::Tensor> q_norm, k_norm, post_attn, post_mlp;
  QMat qkv, o, gate_up, down;
  double in_eps, in_offset, qk_eps, qk_offset, res_eps, res_offset, mlp_eps, mlp_offset, scale, softcap;
  int64_t heads, kv_heads, window, act;
};

class Stack {
 public:
  explicit Stack(py::capsule fns) {
    TORCH_CHECK(std::string(fns.name()) == "mtpdraft.layer_fns", "Stack: not a mtpdraft.layer_fns capsule");
    fns_ = static_cast<const LayerFns*>(fns.get_pointer());
    TORCH_CHECK(fns_->size == static_cast<int64_t>(sizeof(LayerFns)), "Stack: mtpdraft_kernels build does not match");
  }

  void add(StackLayer l) {
    for (const QMat* q : {&l.qkv, &l.o, &l.gate_up, &l.down}) {
      TORCH_CHECK(!q->parts.empty() && q->parts.size() == q->types.size(), "Stack: one type per part");
    }
    layers_.push_back(std::move(l));
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // x [B, N, D] fp32; positions [B, N]; per layer its cache's k and v -> x after the last layer
  torch::Tensor forward(torch::Tensor x, torch::Tensor positions, const std::vector<torch::Tensor>& k,
                        const std::vector<torch::Tensor>& v) const {
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size(), "Stack: one k and v cache per layer");
    TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "Stack: x must be [B, N, D] float32");
    const int64_t B = x.size(0), N = x.size(1);
    const LayerFns& f = *fns_;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const StackLayer& l = layers_[i];
      torch::Tensor h = f.rmsnorm(x, l.in_norm, l.in_eps, l.in_offset);
      torch::Tensor qkv = qlinear(h, l.qkv.parts, l.qkv.types);
      torch::Tensor q = f.qkv_rope_cache(qkv, positions, l.heads, l.kv_heads, l.q_norm, l.k_norm, l.qk_eps,
                                         l.qk_offset, l.inv_freq, k[i], v[i], 0, false);
      torch::Tensor att = f.attention(q, k[i], v[i], positions, l.window, l.scale, l.softcap);
      torch::Tensor a = qlinear(att.reshape({B, N, -1}), l.o.parts, l.o.types);
      std::vector<torch::Tensor> r = f.add_rmsnorm(x, a, l.post_attn, l.pre_mlp, l.res_eps, l.res_offset);
      torch::Tensor m = qlinear(f.gated_act(qlinear(r[1], l.gate_up.parts, l.gate_up.types), l.act), l.down.parts,
                                l.down.types);
      x = l.post_mlp ? f.add_rmsnorm(r[0], m, l.post_mlp, c10::nullopt, l.mlp_eps, l.mlp_offset)[0] : r[0] + m;
    }
    return x;
  }

 private:
  const LayerFns* fns_;
  std::vector<StackLayer> layers_;
};

// ---------------------------------------------------------------------------
// One MTP drafting step in one call (drafters/mtp.py, MTPDrafter.step with its DraftLayers):
// the same kernels and ATen calls as the Python step, in the same order with the same
// arguments (dense weights may be packed: linear_packed gives linear's bits), so the same
// bits; what goes is ~60 Python-level calls a step (~40% of it).
// ---------------------------------------------------------------------------
// A dense weight as kernels.linear takes it: packed (one-row calls) or row-major.
struct DLin {
  torch::Tensor w;
  int64_t out = 0;
  bool packed = false;
  std::vector<torch::Tensor> parts;  // quantized: panel blocks and their type ids (then w is unused)
  std::vector<int64_t> types;
};

struct DraftStepLayer {
  DLin q, o, gate_up, down;
  torch::Tensor in_norm, q_norm, post_attn, pre_mlp, post_mlp, inv_freq;
  double in_eps, in_offset, q_eps, q_offset, res_eps, res_offset, mlp_eps, mlp_offset, scale;
  int64_t heads, head_dim, window;
};

class DraftStep {
 public:
  // embed: the target's input table (quantized part of type embed_type >= 0, or dense with
  // embed_type -1), times embed_scale; tie: the head reads h' (else x); clusters [C, V/C]
  // token ids; the head: parts (one quantized panel block a cluster, of head_type) or a dense
  // table (head_type -1, parts = {table}).
  DraftStep(py::capsule fns, torch::Tensor embed, int64_t embed_type, double embed_scale, DLin pre, DLin post,
            DLin centroids, torch::Tensor final_norm, double final_eps, double final_offset, bool tie,
            torch::Tensor clusters, int64_t top_k, std::vector<torch::Tensor> head_parts, int64_t head_type)
      : embed_(embed), embed_type_(embed_type), embed_scale_(embed_scale), pre_(pre), post_(post),
        centroids_(centroids), final_norm_(final_norm), final_eps_(final_eps), final_offset_(final_offset),
        tie_(tie), clusters_(clusters), top_k_(top_k), head_parts_(std::move(head_parts)), head_type_(head_type) {
    TORCH_CHECK(std::string(fns.name()) == "mtpdraft.layer_fns", "DraftStep: not a mtpdraft.layer_fns capsule");
    fns_ = static_cast<const LayerFns*>(fns.get_pointer());
    TORCH_CHECK(fns_->size == static_cast<int64_t>(sizeof(LayerFns)), "DraftStep: mtpdraft_kernels build does not match");
    TORCH_CHECK(clusters_.dim() == 2 && clusters_.scalar_type() == at::kLong, "DraftStep: clusters must be [C, V/C] int64");
    TORCH_CHECK(static_cast<int64_t>(head_parts_.size()) == (head_type_ >= 0 ? clusters_.size(0) : 1),
                "DraftStep: one head part per cluster (quantized) or one dense table");
  }

  void add(DraftStepLayer l) { layers_.push_back(std::move(l)); }

  // tok: the step's input token; h [1, D] fp32; positions [1, 1]; per drafter layer the
  // target cache's k and v it reads -> (candidate ids [1, M], logits [1, M], h' [1, D])
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> step(int64_t tok, torch::Tensor h, torch::Tensor positions,
                                                               const std::vector<torch::Tensor>& k,
                                                               const std::vector<torch::Tensor>& v) const {
    TORCH_CHECK(k.size() == layers_.size() && v.size() == layers_.size(), "DraftStep: one k and v cache per layer");
    TORCH_CHECK(h.dim() == 2 && h.size(0) == 1 && h.scalar_type() == at::kFloat, "DraftStep: h must be [1, D] float32");
    const LayerFns& f = *fns_;
    auto ids1 = torch::full({1}, tok, torch::dtype(torch::kLong));
    torch::Tensor e;  // target.embed: kernels.take_rows, then the family's scale
    if (embed_type_ >= 0) {
      const int64_t O = embed_.size(0) * 16;
      TORCH_CHECK(tok >= 0 && tok < O, "DraftStep: token ", tok, " out of range [0, ", O, ")");
      e = qrows(embed_, embed_type_, h.size(1), ids1).reshape({1, 1, h.size(1)});
    } else {
      e = at::embedding(embed_, ids1.view({1, 1})).to(at::kFloat);
    }
    if (embed_scale_ != 1.0) e = e * embed_scale_;
    torch::Tensor x = lin(at::cat({e, h.unsqueeze(1)}, -1), pre_);
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DraftStepLayer& l = layers_[i];
      torch::Tensor a = f.rmsnorm(x, l.in_norm, l.in_eps, l.in_offset);
      torch::Tensor q = lin(a, l.q).view({1, 1, l.heads, l.head_dim});
      auto stand_in = torch::empty({1, 1, 1, l.head_dim}, torch::dtype(torch::kFloat));  // kv_mode 2 writes nothing
      q = f.qkv_rope_cache(q.reshape({1, 1, l.heads * l.head_dim}), positions, l.heads, 1, l.q_norm, c10::nullopt,
                           l.q_eps, l.q_offset, l.inv_freq, stand_in, stand_in, 2, false);
      torch::Tensor kc = k[i], vc = v[i];
      if (kc.scalar_type() != at::kFloat && kc.scalar_type() != at::kBFloat16) kc = kc.to(at::kFloat);
      if (vc.scalar_type() != kc.scalar_type()) vc = vc.to(kc.scalar_type());
      torch::Tensor att = f.attention(q, kc, vc, positions, l.window, l.scale, 0.0);
      a = lin(att.reshape({1, 1, -1}), l.o);
      std::vector<torch::Tensor> r = f.add_rmsnorm(x, a, l.post_attn, l.pre_mlp, l.res_eps, l.res_offset);
      torch::Tensor m = lin(f.gated_act(lin(r[1], l.gate_up), 0), l.down);
      x = f.add_rmsnorm(r[0], m, l.post_mlp, c10::nullopt, l.mlp_eps, l.mlp_offset)[0];
    }
    x = f.rmsnorm(x, final_norm_, final_eps_, final_offset_);
    torch::Tensor h_next = lin(x, post_).select(1, 0);  // [1, D]
    torch::Tensor y = tie_ ? h_next : x.select(1, 0);
    torch::Tensor top = std::get<1>(at::topk(lin(y, centroids_), top_k_, -1));  // [1, k_c]
    torch::Tensor ids = clusters_.index_select(0, top.reshape({-1})).view({1, -1});
    torch::Tensor logits;
    if (head_type_ >= 0) {
      std::vector<torch::Tensor> parts;
      const int64_t* tp = top.data_ptr<int64_t>();
      for (int64_t j = 0; j < top.numel(); ++j) parts.push_back(head_parts_[tp[j]]);
      logits = qlinear(y, parts, std::vector<int64_t>(parts.size(), head_type_));
    } else {
      logits = at::einsum("bd,bmd->bm", {y, at::embedding(head_parts_[0], ids).to(at::kFloat)});
    }
    return {ids, logits, h_next};
  }

  // n greedy steps: each the argmax of its candidates; after the first, stop at a candidate
  // whose softmax probability is below min_conf (MTPDraftSource.propose, greedy)
  std::vector<int64_t> greedy(int64_t tok, torch::Tensor h, torch::Tensor positions, int64_t n, double min_conf,
                              const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v) const {
    std::vector<int64_t> out;
    for (int64_t i = 0; i < n; ++i) {
      auto [ids, logits, h_next] = step(tok, h, positions, k, v);
      torch::Tensor row = logits.select(0, 0);
      const int64_t j = at::argmax(row).item<int64_t>();
      if (i > 0 && min_conf > 0 && static_cast<double>(at::softmax(row, -1)[j].item<float>()) < min_conf) break;
      tok = ids[0][j].item<int64_t>();
      out.push_back(tok);
      h = h_next;
    }
    return out;
  }

 private:
  torch::Tensor lin(const torch::Tensor& x, const DLin& l) const {
    if (!l.parts.empty()) return qlinear(x, l.parts, l.types);
    return l.packed ? fns_->linear_packed(x, l.w, l.out) : fns_->linear(x, l.w);
  }

  const LayerFns* fns_;
  torch::Tensor embed_;
  int64_t embed_type_;
  double embed_scale_;
  DLin pre_, post_, centroids_;
  torch::Tensor final_norm_;
  double final_eps_, final_offset_;
  bool tie_;
  torch::Tensor clusters_;
  int64_t top_k_;
  std::vector<torch::Tensor> head_parts_;
  int64_t head_type_;
  std::vector<DraftStepLayer> layers_;
};

std::string isa() { return MTP_AVX512 ? "avx512-vnni" : "avx2"; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "batch-invariant y = x @ W.T over quantized weight panels");
  m.def("qrows", &qrows, "exact fp32 values of selected rows of a quantized weight");
  m.def("huge_copy", &huge_copy, "copy into transparent huge pages");
  m.def("huge_empty", &huge_empty, "uninitialised uint8 buffer in transparent huge pages");
  py::class_<StackLayer>(m, "StackLayer", py::module_local())  // both ISA builds may load
      .def(py::init([](py::kwargs kw) {
        StackLayer l;
        auto t = [&](const char* k) { return kw[k].cast<torch::Tensor>(); };
        auto ot = [&](const char* k) { return kw[k].cast<c10::optional<torch::Tensor>>(); };
        auto q = [&](const char* k) {
          auto pt = kw[k].cast<std::pair<std::vector<torch::Tensor>, std::vector<int64_t>>>();
          return QMat{pt.first, pt.second};
        };
        auto d = [&](const char* k) { return kw[k].cast<double>(); };
        auto i = [&](const char* k) { return kw[k].cast<int64_t>(); };
        l.in_norm = t("in_norm"), l.pre_mlp = t("pre_mlp"), l.inv_freq = t("inv_freq");
        l.q_norm = ot("q_norm"), l.k_norm = ot("k_norm"), l.post_attn = ot("post_attn"), l.post_mlp = ot("post_mlp");
        l.qkv = q("qkv"), l.o = q("o"), l.gate_up = q("gate_up"), l.down = q("down");
        l.in_eps = d("in_eps"), l.in_offset = d("in_offset"), l.qk_eps = d("qk_eps"), l.qk_offset = d("qk_offset");
        l.res_eps = d("res_eps"), l.res_offset = d("res_offset"), l.mlp_eps = d("mlp_eps");
        l.mlp_offset = d("mlp_offset"), l.scale = d("scale"), l.softcap = d("softcap");
        l.heads = i("heads"), l.kv_heads = i("kv_heads"), l.window = i("window"), l.act = i("act");
        return l;
      }));
  py::class_<Stack>(m, "Stack", py::module_local())
      .def(py::init<py::capsule>())
      .def("add", &Stack::add)
      .def("__len__", &Stack::size)
      .def("forward", &Stack::forward, "x after every layer (the blocks' own kernel calls, in order)");
  py::class_<DLin>(m, "DLin", py::module_local())
      .def(py::init([](torch::Tensor w, int64_t out, bool packed) { return DLin{w, out, packed, {}, {}}; }))
      .def(py::init([](std::vector<torch::Tensor> parts, std::vector<int64_t> types, int64_t out) {
        TORCH_CHECK(!parts.empty() && parts.size() == types.size(), "DLin: one type per quantized part");
        return DLin{torch::Tensor(), out, false, std::move(parts), std::move(types)};
      }));
  py::class_<DraftStepLayer>(m, "DraftStepLayer", py::module_local())
      .def(py::init([](py::kwargs kw) {
        DraftStepLayer l;
        auto t = [&](const char* k) { return kw[k].cast<torch::Tensor>(); };
        auto w = [&](const char* k) { return kw[k].cast<DLin>(); };
        auto d = [&](const char* k) { return kw[k].cast<double>(); };
        auto i = [&](const char* k) { return kw[k].cast<int64_t>(); };
        l.q = w("q"), l.o = w("o"), l.gate_up = w("gate_up"), l.down = w("down");
        l.in_norm = t("in_norm"), l.q_norm = t("q_norm"), l.post_attn = t("post_attn"), l.pre_mlp = t("pre_mlp");
        l.post_mlp = t("post_mlp"), l.inv_freq = t("inv_freq");
        l.in_eps = d("in_eps"), l.in_offset = d("in_offset"), l.q_eps = d("q_eps"), l.q_offset = d("q_offset");
        l.res_eps = d("res_eps"), l.res_offset = d("res_offset"), l.mlp_eps = d("mlp_eps");
        l.mlp_offset = d("mlp_offset"), l.scale = d("scale");
        l.heads = i("heads"), l.head_dim = i("head_dim"), l.window = i("window");
        return l;
      }));
  py::class_<DraftStep>(m, "DraftStep", py::module_local())
      .def(py::init<py::capsule, torch::Tensor, int64_t, double, DLin, DLin, DLin, torch::Tensor, double, double, bool,
                    torch::Tensor, int64_t, std::vector<torch::Tensor>, int64_t>())
      .def("add", &DraftStep::add)
      .def("step", &DraftStep::step, "one drafting step: (candidate ids, logits, h')")
      .def("greedy", &DraftStep::greedy, "up to n greedy drafting steps: the drafted tokens");
  m.def("isa", &isa, "instruction set this build uses");
}
