// The AVX-512 path (compiled with AVX-512 F/BW/VL/DQ and VNNI): Intel Ice Lake and later,
// AMD Zen 4 and later. vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds
// each group of four products into a 32-bit lane: with kvformer's int4 layout one
// instruction covers 4 columns of 16 weight rows, and the lanes are the rows.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../kernels.h"

namespace kvf {
namespace {

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __m512 load_bf16x16(const uint16_t* p) {
  const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
}

template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return load_bf16x16(p);
  } else {
    return _mm512_loadu_ps(p);
  }
}

void quantize(const float* x, Acts& a, int8_t* q1, int8_t* q2, float* scale, float* sum) {
  const int64_t nb = a.k / a.block, blk = a.block;
  for (int64_t i = 0; i < a.m; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t o = i * a.k + b * blk;
      const float* xb = x + o;
      __m512 vmax = _mm512_setzero_ps(), vsum = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 16 <= blk; j += 16) {
        const __m512 v = _mm512_loadu_ps(xb + j);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        vsum = _mm512_add_ps(vsum, v);
      }
      float amax = _mm512_reduce_max_ps(vmax), s = _mm512_reduce_add_ps(vsum);
      for (int64_t t = j; t < blk; ++t) {
        amax = std::max(amax, std::fabs(xb[t]));
        s += xb[t];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv), k128 = _mm512_set1_ps(128.f);
      for (j = 0; j + 16 <= blk; j += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xb + j), vinv);
        const __m512 r = _mm512_roundscale_ps(v, kRound);
        const __m512 r2 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, r), k128), kRound);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + o + j),
                         _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + o + j),
                         _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r2)));
      }
      for (; j < blk; ++j) quantize_one(xb[j] * inv, q1 + o + j, q2 + o + j);
      scale[i * nb + b] = amax / 127.f / 128.f;
      sum[i * nb + b] = s;
    }
  a.point_at(q1, q2, scale, sum);
}

// NT tiles of 16 rows (one zmm of 32-bit lanes each) for MR rows of x. Each tile, row and
// level has C accumulators, so that enough vpdpbusd chains run side by side (one chain per
// tile and level ran at the instruction's latency, a third of its rate): C = 2 for a
// single row, 1 when MR * NT rows and tiles already make 4 or more chains per level.
// L = 1: x's second level is zero (Acts::levels) and its products are skipped.
template <int MR, int NT, int L>
void q4_tiles(const Acts& a, int64_t i0, const uint8_t* q, const uint16_t* dm, int64_t t0,
              float* y, int64_t ldy) {
  constexpr int C = MR * NT >= 4 ? 1 : 2;
  const int64_t kb = a.k / kBlock;
  const __m512i low = _mm512_set1_epi8(0x0f);
  __m512 acc[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NT; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    __m512i s1[MR][NT][C], s2[MR][NT][C];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < NT; ++u)
        for (int c = 0; c < C; ++c) s1[r][u][c] = s2[r][u][c] = _mm512_setzero_si512();
    // unrolled, so that c below is a constant and the accumulators stay in registers
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      __m512i lo[NT], hi[NT];
      for (int u = 0; u < NT; ++u) {
        const __m512i v = _mm512_loadu_si512(q + ((t0 + u) * kb + b) * kTileBytes + s * 64);
        lo[u] = _mm512_and_si512(v, low);
        hi[u] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int r = 0; r < MR; ++r) {
        const int64_t o = (i0 + r) * a.k + b * kBlock + 8 * s;
        const __m512i xl1 = _mm512_set1_epi32(load4(a.q1 + o));
        const __m512i xh1 = _mm512_set1_epi32(load4(a.q1 + o + 4));
        const int c = s % C;  // alternate the accumulators of a level
        for (int u = 0; u < NT; ++u) {
          s1[r][u][c] = _mm512_dpbusd_epi32(s1[r][u][c], lo[u], xl1);
          s1[r][u][c] = _mm512_dpbusd_epi32(s1[r][u][c], hi[u], xh1);
        }
        if constexpr (L == 2) {
          const __m512i xl2 = _mm512_set1_epi32(load4(a.q2 + o));
          const __m512i xh2 = _mm512_set1_epi32(load4(a.q2 + o + 4));
          for (int u = 0; u < NT; ++u) {
            s2[r][u][c] = _mm512_dpbusd_epi32(s2[r][u][c], lo[u], xl2);
            s2[r][u][c] = _mm512_dpbusd_epi32(s2[r][u][c], hi[u], xh2);
          }
        }
      }
    }
    for (int u = 0; u < NT; ++u) {
      const uint16_t* d = dm + ((t0 + u) * kb + b) * 2 * kTile;
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d)));
      const __m512 mv =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + kTile)));
      for (int r = 0; r < MR; ++r) {
        __m512i n1 = s1[r][u][0], n2 = s2[r][u][0];
        if constexpr (C == 2) {
          n1 = _mm512_add_epi32(n1, s1[r][u][1]);
          n2 = _mm512_add_epi32(n2, s2[r][u][1]);
        }
        const __m512i n =
            L == 2 ? _mm512_add_epi32(_mm512_slli_epi32(n1, 7), n2) : _mm512_slli_epi32(n1, 7);
        const __m512 sx = _mm512_set1_ps(a.scale[(i0 + r) * kb + b]);
        acc[r][u] = _mm512_fmadd_ps(_mm512_mul_ps(dv, sx), _mm512_cvtepi32_ps(n), acc[r][u]);
        acc[r][u] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.sum[(i0 + r) * kb + b]), acc[r][u]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NT; ++u)
      _mm512_storeu_ps(y + (i0 + r) * ldy + (t0 + u) * kTile, acc[r][u]);
}

template <int NT, int L>
void q4_rows(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t t, float* y,
             int64_t ldy) {
  for (int64_t i = 0; i < a.m; i += 4) {
    switch (std::min<int64_t>(4, a.m - i)) {
      case 1: q4_tiles<1, NT, L>(a, i, q, dm, t, y, ldy); break;
      case 2: q4_tiles<2, NT, L>(a, i, q, dm, t, y, ldy); break;
      case 3: q4_tiles<3, NT, L>(a, i, q, dm, t, y, ldy); break;
      default: q4_tiles<4, NT, L>(a, i, q, dm, t, y, ldy); break;
    }
  }
}

template <int L>
void q4_range(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  // two tiles at a time: for one row of x, more independent work; for several, each
  // broadcast of x serves two tiles (measured 13 % faster at 16 rows than one tile)
  int64_t t = n0 / kTile;
  const int64_t t1 = n1 / kTile;
  for (; t + 2 <= t1; t += 2) q4_rows<2, L>(a, q, dm, t, y, ldy);
  for (; t < t1; ++t) q4_rows<1, L>(a, q, dm, t, y, ldy);
}

void gemm_q4(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t n0, int64_t n1,
             float* y, int64_t ldy) {
  if (a.levels == 1) return q4_range<1>(a, q, dm, n0, n1, y, ldy);
  q4_range<2>(a, q, dm, n0, n1, y, ldy);
}

// ---------------------------------------------------------------- kb weights
// The kb layout (kernels.h) on q4_tiles's plan: its records hold the int4 layout's lanes
// (4 columns of one row per 32-bit lane), so one vpdpbusd of u (unsigned, 0..255) with 4
// bytes of x (signed) again covers 4 columns of 16 rows. What differs is how u is made
// (kb_sub) and where D and M come from (kb_dm): both known at compile time (BITS, LUT, SC).

// u of sub-block s (0..3) of a record: lo = columns 8s .. 8s+3 of the 16 rows, hi = 8s+4 ..
// 8s+7. Bits 4 .. 7 come from the planes: a plane's word is a mask of 64 bytes, the lanes'
// own order, so each is one masked add of that bit (the bit is clear: add is or).
template <int BITS, bool LUT>
inline void kb_sub(const uint8_t* rec, int s, __m512i lut, __m512i& lo, __m512i& hi) {
  if constexpr (BITS == 8) {
    lo = _mm512_loadu_si512(rec + 128 * s);
    hi = _mm512_loadu_si512(rec + 128 * s + 64);
  } else {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i v = _mm512_loadu_si512(rec + 64 * s);
    lo = _mm512_and_si512(v, low);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    if constexpr (LUT) {  // u = lut[i]: vpshufb looks up 16 bytes in each 128-bit lane
      lo = _mm512_shuffle_epi8(lut, lo);
      hi = _mm512_shuffle_epi8(lut, hi);
    }
    for (int p = 0; p < BITS - 4; ++p) {
      uint64_t word[2];
      std::memcpy(word, rec + kTileBytes + 64 * p + 16 * s, 16);
      const __m512i bit = _mm512_set1_epi8(char(16 << p));
      lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(word[0]), lo, bit);
      hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(word[1]), hi, bit);
    }
  }
}

// D and M of the 16 rows of tile t, block b (kb_scales's numbers: the fp32 products are
// exact). kSuper's d and dmin (kSuper16's d) are decoded into sup when a super-block starts
// (b % 8 == 0, which every caller visits first) and kept for its 8 blocks. kSuper16 gives D
// of each half, D[0] and D[1], and no M (it is -32 D: kb_add folds it in); the others D[0]
// and M[0] (H = 1: only [0] is read).
template <int SC>
inline void kb_dm(const KbWeights& w, int64_t kb, int64_t t, int64_t b, __m512* sup, __m512* D,
                  __m512* M) {
  auto f16 = [](const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  auto i8 = [](const uint8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  if constexpr (SC == kPair) {
    const uint8_t* p = w.s + (t * kb + b) * 64;
    D[0] = f16(p);
    M[0] = f16(p + 32);
  } else if constexpr (SC == kScale) {  // M = -zero D: exact in fp32
    D[0] = f16(w.s + (t * kb + b) * 32);
    M[0] = _mm512_mul_ps(D[0], _mm512_set1_ps(-float(w.zero)));
  } else if constexpr (SC == kSuperZ) {
    const uint8_t* rec = w.s + (t * (kb / 8) + b / 8) * 160;
    if (b % 8 == 0) sup[0] = f16(rec);
    D[0] = _mm512_mul_ps(sup[0], i8(rec + 32 + 16 * (b % 8)));
    M[0] = _mm512_mul_ps(D[0], _mm512_set1_ps(-float(w.zero)));
  } else if constexpr (SC == kSuper) {
    const uint8_t* rec = w.s + (t * (kb / 8) + b / 8) * 320;
    if (b % 8 == 0) {
      sup[0] = f16(rec);
      sup[1] = _mm512_sub_ps(_mm512_setzero_ps(), f16(rec + 32));  // -dmin: exact
    }
    const uint8_t* sc = rec + 64 + 32 * (b % 8);
    D[0] = _mm512_mul_ps(sup[0], i8(sc));
    M[0] = _mm512_mul_ps(sup[1], i8(sc + 16));
  } else {
    const uint8_t* rec = w.s + (t * (kb / 8) + b / 8) * 288;
    if (b % 8 == 0) sup[0] = f16(rec);
    const uint8_t* sc = rec + 32 + 32 * (b % 8);
    D[0] = _mm512_mul_ps(sup[0], i8(sc));
    D[1] = _mm512_mul_ps(sup[0], i8(sc + 16));
  }
}

inline __m512i kb_lut(const KbWeights& w) {  // the 16 entries in each 128-bit lane
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.lut)));
}

// What M multiplies for row i of x, block b (half h): the block's sum; for kSuper16 -32 times
// the half's (M = -32 D, folded into kb_add's D term)
template <int SC>
inline float kb_msum(const Acts& a, int64_t i, int64_t b, int h) {
  if constexpr (SC == kSuper16) {
    return -32.f * a.hsum[i * (a.k / 16) + 2 * b + h];
  } else {
    return a.sum[i * (a.k / kBlock) + b];
  }
}

// acc plus one block's (kSuper16: one half's) part of a tile for a row of x: n1, n2 the
// integer dots with x's levels (n2 unused for L = 1), sx and ms the row's scale and kb_msum.
// kSuper16 takes D (sx n + ms), one multiply fewer than D sx n + M sum.
template <int L, int SC>
inline __m512 kb_add(__m512 acc, __m512i n1, __m512i n2, __m512 D, __m512 M, __m512 sx,
                     __m512 ms) {
  const __m512 n = _mm512_cvtepi32_ps(L == 2 ? _mm512_add_epi32(_mm512_slli_epi32(n1, 7), n2)
                                             : _mm512_slli_epi32(n1, 7));
  if constexpr (SC == kSuper16) {
    return _mm512_fmadd_ps(D, _mm512_fmadd_ps(sx, n, ms), acc);
  } else {
    return _mm512_fmadd_ps(M, ms, _mm512_fmadd_ps(_mm512_mul_ps(D, sx), n, acc));
  }
}

// q4_tiles for kb weights: NT tiles for MR rows of x, C accumulators per chain as there.
// kSuper16 (H = 2) changes D every 16 columns, so each block is summed and scaled in two
// halves of two sub-blocks (one accumulator per chain: the halves' chains already overlap).
template <int MR, int NT, int L, int BITS, bool LUT, int SC>
void kb_tiles(const Acts& a, const KbWeights& w, int64_t i0, int64_t t0, float* y,
              int64_t ldy) {
  constexpr int H = SC == kSuper16 ? 2 : 1, SH = 4 / H;  // halves, sub-blocks per half
  constexpr int C = MR * NT >= 4 || H == 2 ? 1 : 2;
  constexpr int64_t R = kb_record(BITS);
  const int64_t kb = a.k / kBlock;
  const __m512i lut = LUT ? kb_lut(w) : _mm512_setzero_si512();
  __m512 acc[MR][NT], sup[NT][2];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NT; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    __m512 D[NT][2], M[NT][2];
    for (int u = 0; u < NT; ++u) kb_dm<SC>(w, kb, t0 + u, b, sup[u], D[u], M[u]);
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      __m512i s1[MR][NT][C], s2[MR][NT][C];
      for (int r = 0; r < MR; ++r)
        for (int u = 0; u < NT; ++u)
          for (int c = 0; c < C; ++c) s1[r][u][c] = s2[r][u][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int j = 0; j < SH; ++j) {
        const int s = h * SH + j;
        __m512i lo[NT], hi[NT];
        for (int u = 0; u < NT; ++u)
          kb_sub<BITS, LUT>(w.q + ((t0 + u) * kb + b) * R, s, lut, lo[u], hi[u]);
        for (int r = 0; r < MR; ++r) {
          const int64_t o = (i0 + r) * a.k + b * kBlock + 8 * s;
          const __m512i xl1 = _mm512_set1_epi32(load4(a.q1 + o));
          const __m512i xh1 = _mm512_set1_epi32(load4(a.q1 + o + 4));
          const int c = j % C;
          for (int u = 0; u < NT; ++u) {
            s1[r][u][c] = _mm512_dpbusd_epi32(s1[r][u][c], lo[u], xl1);
            s1[r][u][c] = _mm512_dpbusd_epi32(s1[r][u][c], hi[u], xh1);
          }
          if constexpr (L == 2) {
            const __m512i xl2 = _mm512_set1_epi32(load4(a.q2 + o));
            const __m512i xh2 = _mm512_set1_epi32(load4(a.q2 + o + 4));
            for (int u = 0; u < NT; ++u) {
              s2[r][u][c] = _mm512_dpbusd_epi32(s2[r][u][c], lo[u], xl2);
              s2[r][u][c] = _mm512_dpbusd_epi32(s2[r][u][c], hi[u], xh2);
            }
          }
        }
      }
      for (int r = 0; r < MR; ++r) {
        const __m512 sx = _mm512_set1_ps(a.scale[(i0 + r) * kb + b]);
        const __m512 ms = _mm512_set1_ps(kb_msum<SC>(a, i0 + r, b, h));
        for (int u = 0; u < NT; ++u) {
          __m512i n1 = s1[r][u][0], n2 = s2[r][u][0];
          if constexpr (C == 2) {
            n1 = _mm512_add_epi32(n1, s1[r][u][1]);
            n2 = _mm512_add_epi32(n2, s2[r][u][1]);
          }
          acc[r][u] = kb_add<L, SC>(acc[r][u], n1, n2, D[u][h], M[u][h], sx, ms);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NT; ++u)
      _mm512_storeu_ps(y + (i0 + r) * ldy + (t0 + u) * kTile, acc[r][u]);
}

// A batch of rows of x the other way round: each block's u made once and kept in registers
// while every row in turn meets it (kb_tiles makes u again for every 4 rows), rows two at a
// time for independent chains. x comes block by block (xb: block b, row i at (b m + i) 64
// bytes, q1's 32 then q2's), and the sums of row i at acc + i 16 NT: row-major x and y put
// a batch's rows k or ldy apart, a stride that sends them all to the same few cache sets.
// Used past 4 rows (measured: as fast for Q4_0 and Q8_0, 5-20 % faster for the others,
// whose u costs more to make; at 3 and 4 rows kb_tiles is faster). A row's numbers are
// kb_tiles's to the bit (exact integer sums, the same kb_add in the same order), so they do
// not depend on the batch around it.
constexpr int64_t kBatchRows = 4;
template <int NT, int L, int BITS, bool LUT, int SC>
void kb_batch(const Acts& a, const KbWeights& w, const int8_t* xb, float* acc, int64_t t0,
              float* y, int64_t ldy) {
  constexpr int H = SC == kSuper16 ? 2 : 1, SH = 4 / H;
  constexpr int64_t R = kb_record(BITS);
  const int64_t kb = a.k / kBlock, m = a.m;
  const __m512i lut = LUT ? kb_lut(w) : _mm512_setzero_si512();
  std::fill(acc, acc + m * NT * kTile, 0.f);
  __m512 sup[NT][2];
  for (int64_t b = 0; b < kb; ++b) {
    __m512 D[NT][2], M[NT][2];
    for (int u = 0; u < NT; ++u) kb_dm<SC>(w, kb, t0 + u, b, sup[u], D[u], M[u]);
#pragma GCC unroll 2
    for (int h = 0; h < H; ++h) {
      __m512i lo[SH][NT], hi[SH][NT];
#pragma GCC unroll 4
      for (int j = 0; j < SH; ++j)
        for (int u = 0; u < NT; ++u)
          kb_sub<BITS, LUT>(w.q + ((t0 + u) * kb + b) * R, h * SH + j, lut, lo[j][u],
                            hi[j][u]);
      auto rows = [&](auto mr, int64_t i) {
        constexpr int MR = decltype(mr)::value;
        __m512i s1[MR][NT], s2[MR][NT];
        for (int r = 0; r < MR; ++r)
          for (int u = 0; u < NT; ++u) s1[r][u] = s2[r][u] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int j = 0; j < SH; ++j)
          for (int r = 0; r < MR; ++r) {
            const int8_t* x = xb + (b * m + i + r) * 64 + 8 * (h * SH + j);
            const __m512i xl1 = _mm512_set1_epi32(load4(x));
            const __m512i xh1 = _mm512_set1_epi32(load4(x + 4));
            for (int u = 0; u < NT; ++u) {
              s1[r][u] = _mm512_dpbusd_epi32(s1[r][u], lo[j][u], xl1);
              s1[r][u] = _mm512_dpbusd_epi32(s1[r][u], hi[j][u], xh1);
            }
            if constexpr (L == 2) {
              const __m512i xl2 = _mm512_set1_epi32(load4(x + 32));
              const __m512i xh2 = _mm512_set1_epi32(load4(x + 36));
              for (int u = 0; u < NT; ++u) {
                s2[r][u] = _mm512_dpbusd_epi32(s2[r][u], lo[j][u], xl2);
                s2[r][u] = _mm512_dpbusd_epi32(s2[r][u], hi[j][u], xh2);
              }
            }
          }
        for (int r = 0; r < MR; ++r) {
          const __m512 sx = _mm512_set1_ps(a.scale[(i + r) * kb + b]);
          const __m512 ms = _mm512_set1_ps(kb_msum<SC>(a, i + r, b, h));
          for (int u = 0; u < NT; ++u) {
            float* ap = acc + ((i + r) * NT + u) * kTile;
            _mm512_storeu_ps(ap, kb_add<L, SC>(_mm512_loadu_ps(ap), s1[r][u], s2[r][u], D[u][h],
                                               M[u][h], sx, ms));
          }
        }
      };
      int64_t i = 0;
      for (; i + 2 <= m; i += 2) rows(std::integral_constant<int, 2>(), i);
      if (i < m) rows(std::integral_constant<int, 1>(), i);
    }
  }
  for (int64_t i = 0; i < m; ++i)
    std::memcpy(y + i * ldy + t0 * kTile, acc + i * NT * kTile, NT * kTile * sizeof(float));
}

template <int NT, int L, int BITS, bool LUT, int SC>
void kb_rows(const Acts& a, const KbWeights& w, int64_t t, float* y, int64_t ldy) {
  for (int64_t i = 0; i < a.m; i += 4) {
    switch (std::min<int64_t>(4, a.m - i)) {
      case 1: kb_tiles<1, NT, L, BITS, LUT, SC>(a, w, i, t, y, ldy); break;
      case 2: kb_tiles<2, NT, L, BITS, LUT, SC>(a, w, i, t, y, ldy); break;
      case 3: kb_tiles<3, NT, L, BITS, LUT, SC>(a, w, i, t, y, ldy); break;
      default: kb_tiles<4, NT, L, BITS, LUT, SC>(a, w, i, t, y, ldy); break;
    }
  }
}

template <int L, int BITS, bool LUT, int SC>
void kb_levels(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  int64_t t = n0 / kTile;  // two tiles at a time, as q4_range
  const int64_t t1 = n1 / kTile;
  if (a.m > kBatchRows) {
    thread_local std::vector<int8_t> xbuf;
    thread_local std::vector<float> abuf;
    const int64_t kb = a.k / kBlock;
    xbuf.resize(kb * a.m * 64);
    abuf.resize(a.m * 2 * kTile);
    for (int64_t b = 0; b < kb; ++b)
      for (int64_t i = 0; i < a.m; ++i) {
        int8_t* o = xbuf.data() + (b * a.m + i) * 64;
        std::memcpy(o, a.q1 + i * a.k + b * kBlock, kBlock);
        if (L == 2) std::memcpy(o + kBlock, a.q2 + i * a.k + b * kBlock, kBlock);
      }
    for (; t + 2 <= t1; t += 2)
      kb_batch<2, L, BITS, LUT, SC>(a, w, xbuf.data(), abuf.data(), t, y, ldy);
    for (; t < t1; ++t) kb_batch<1, L, BITS, LUT, SC>(a, w, xbuf.data(), abuf.data(), t, y, ldy);
    return;
  }
  for (; t + 2 <= t1; t += 2) kb_rows<2, L, BITS, LUT, SC>(a, w, t, y, ldy);
  for (; t < t1; ++t) kb_rows<1, L, BITS, LUT, SC>(a, w, t, y, ldy);
}

template <int BITS, bool LUT, int SC>
void kb_range(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
              int64_t ldy) {
  if (a.levels == 1) return kb_levels<1, BITS, LUT, SC>(a, w, n0, n1, y, ldy);
  kb_levels<2, BITS, LUT, SC>(a, w, n0, n1, y, ldy);
}

// The forms the GGUF types take (kvformer/formats/gguf/blocks.py), each compiled on its own;
// any other the portable kernel runs.
void gemm_kb(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
             int64_t ldy) {
  const bool lut = w.lut != nullptr;
  auto is = [&](int bits, int scales, bool with_lut) {
    return w.bits == bits && w.scales == scales && lut == with_lut;
  };
  if (is(4, kScale, false)) return kb_range<4, false, kScale>(a, w, n0, n1, y, ldy);  // Q4_0
  if (is(4, kPair, false)) return kb_range<4, false, kPair>(a, w, n0, n1, y, ldy);  // Q4_1
  if (is(4, kScale, true)) return kb_range<4, true, kScale>(a, w, n0, n1, y, ldy);  // IQ4_NL
  if (is(5, kScale, false)) return kb_range<5, false, kScale>(a, w, n0, n1, y, ldy);  // Q5_0
  if (is(5, kPair, false)) return kb_range<5, false, kPair>(a, w, n0, n1, y, ldy);  // Q5_1
  if (is(8, kScale, false)) return kb_range<8, false, kScale>(a, w, n0, n1, y, ldy);  // Q8_0
  if (is(4, kSuper, false)) return kb_range<4, false, kSuper>(a, w, n0, n1, y, ldy);  // Q4_K
  if (is(4, kSuperZ, true)) return kb_range<4, true, kSuperZ>(a, w, n0, n1, y, ldy);  // IQ4_XS
  if (is(5, kSuper, false)) return kb_range<5, false, kSuper>(a, w, n0, n1, y, ldy);  // Q5_K
  if (is(6, kSuper16, false)) return kb_range<6, false, kSuper16>(a, w, n0, n1, y, ldy);  // Q6_K
  gemm_kb_generic(a, w, n0, n1, y, ldy);
}

// One row of x: each weight row streamed once, with its two sums reduced at its end (at the
// memory's speed; interleaving rows was measured slower here).
void q8_one_row(const uint8_t* x1, const uint8_t* x2, float sx, int64_t k, const int8_t* q,
                const float* scale, const int32_t* rowsum, int64_t n0, int64_t n1, float* y) {
  const int64_t tail = k % 64;
  const __mmask64 tmask = tail ? (~0ULL >> (64 - tail)) : 0;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * k;
    __m512i c1 = _mm512_setzero_si512(), c2 = c1, c3 = c1;
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) {
      const __m512i wv = _mm512_loadu_si512(w + j);
      c1 = _mm512_dpbusd_epi32(c1, _mm512_loadu_si512(x1 + j), wv);
      c2 = _mm512_dpbusd_epi32(c2, _mm512_loadu_si512(x2 + j), wv);
      if (!rowsum) c3 = _mm512_dpbusd_epi32(c3, ones, wv);
    }
    if (tail) {  // the weight lanes past k are zero, so x's there do not count
      const __m512i wv = _mm512_maskz_loadu_epi8(tmask, w + j);
      c1 = _mm512_dpbusd_epi32(c1, _mm512_maskz_loadu_epi8(tmask, x1 + j), wv);
      c2 = _mm512_dpbusd_epi32(c2, _mm512_maskz_loadu_epi8(tmask, x2 + j), wv);
      if (!rowsum) c3 = _mm512_dpbusd_epi32(c3, ones, wv);
    }
    const int64_t rs = rowsum ? rowsum[n] : _mm512_reduce_add_epi32(c3);
    const int64_t s1 = int64_t(_mm512_reduce_add_epi32(c1)) - 128 * rs;
    const int64_t s2 = int64_t(_mm512_reduce_add_epi32(c2)) - 128 * rs;
    y[n] = float(s1 * 128 + s2) * sx * scale[n];
  }
}

// 16 rows of 64 bytes -> 16 vectors, o[j] holding 32-bit lane j of every row (lane i = row
// i): a 16 x 16 transpose of 32-bit lanes in four rounds of 16 shuffles.
inline void transpose16(const __m512i* r, __m512i* o) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane L: rows 2i, 2i+1 at lanes 4L..4L+3
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + p], 128-bit lane L: rows 4g..4g+3 at lane 4L + p
    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int p = 0; p < 4; ++p) {  // then the 4 x 4 transpose of 128-bit lanes
    const __m512i v0 = _mm512_shuffle_i32x4(u[p], u[4 + p], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[p], u[4 + p], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + p], u[12 + p], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + p], u[12 + p], 0xee);
    o[p] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    o[4 + p] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    o[8 + p] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    o[12 + p] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}

// The rows [n, n + 16 NT) of q (those below n1; the others zero) in the int4 kernels' lane
// shape: lanes[(j * NT + u) * 16 + i] = columns 4j..4j+3 of row n + 16u + i (zero past k).
template <int NT>
void q8_lanes(const int8_t* q, int64_t k, int64_t n, int64_t n1, int32_t* lanes) {
  const int64_t kq = (k + 3) / 4;
  for (int u = 0; u < NT; ++u)
    for (int64_t j = 0; j < k; j += 64) {
      const __mmask64 m = j + 64 <= k ? ~0ULL : ~0ULL >> (64 - (k - j));
      __m512i r[16], o[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = n + 16 * u + i;
        r[i] = row < n1 ? _mm512_maskz_loadu_epi8(m, q + row * k + j) : _mm512_setzero_si512();
      }
      transpose16(r, o);
      const int64_t nj = std::min<int64_t>(16, kq - j / 4);
      for (int c = 0; c < nj; ++c)
        _mm512_storeu_si512(lanes + ((j / 4 + c) * NT + u) * 16, o[c]);
    }
}

// MR rows of x (+128, row stride ka) times the NT tiles of `lanes`: one broadcast of 4 bytes
// of x serves NT tiles, one load of a tile MR rows, and each lane ends with its row's sum.
// rsk: 16512 * rowsum per lane as int64 (8 + 8 per tile); the result is the one-row
// kernel's expression float(s1 * 128 + s2) * sx * scale, in int64 and then in the same order.
// pf (or null): the next tiles' rows, 64 NT bytes of them fetched into L2 per step of j, so
// that reading them from memory overlaps this work (without it, a head too large for the
// cache ran at the memory's latency: 2x slower at 4 rows of x).
template <int MR, int NT>
void q8_tiles(const uint8_t* u1, const uint8_t* u2, int64_t ka, const float* sx,
              const int32_t* lanes, int64_t kq, const __m512i* rsk, const __m512* sw,
              const __mmask16* keep, const int8_t* pf, int64_t pf_bytes, float* y, int64_t ldy) {
  const int8_t* x1 = reinterpret_cast<const int8_t*>(u1);  // (load4's type: the same bytes)
  const int8_t* x2 = reinterpret_cast<const int8_t*>(u2);
  __m512i s1[MR][NT], s2[MR][NT];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NT; ++u) s1[r][u] = s2[r][u] = _mm512_setzero_si512();
  for (int64_t j = 0; j < kq; ++j) {
    __m512i w[NT];
    for (int u = 0; u < NT; ++u) w[u] = _mm512_loadu_si512(lanes + (j * NT + u) * 16);
    if (pf)
      for (int64_t b = j * 64 * NT; b < (j + 1) * 64 * NT && b < pf_bytes; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(pf + b), _MM_HINT_T1);
    for (int r = 0; r < MR; ++r) {
      const __m512i b1 = _mm512_set1_epi32(load4(x1 + r * ka + 4 * j));
      const __m512i b2 = _mm512_set1_epi32(load4(x2 + r * ka + 4 * j));
      for (int u = 0; u < NT; ++u) {
        s1[r][u] = _mm512_dpbusd_epi32(s1[r][u], b1, w[u]);
        s2[r][u] = _mm512_dpbusd_epi32(s2[r][u], b2, w[u]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NT; ++u) {
      __m256 f[2];
      for (int h = 0; h < 2; ++h) {
        const __m512i c1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s1[r][u], h));
        const __m512i c2 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s2[r][u], h));
        const __m512i v = _mm512_sub_epi64(_mm512_add_epi64(_mm512_slli_epi64(c1, 7), c2),
                                           rsk[2 * u + h]);
        f[h] = _mm512_cvtepi64_ps(v);
      }
      const __m512 fv = _mm512_insertf32x8(_mm512_castps256_ps512(f[0]), f[1], 1);
      _mm512_mask_storeu_ps(y + r * ldy + 16 * u, keep[u],
                            _mm512_mul_ps(_mm512_mul_ps(fv, _mm512_set1_ps(sx[r])), sw[u]));
    }
}

// A batch of x rows, NT tiles of 16 weight rows at a time: see q8_lanes and q8_tiles.
template <int NT>
void q8_batch(const Acts& a, const uint8_t* u1, const uint8_t* u2, int64_t ka, const int8_t* q,
              const float* scale, const int32_t* rowsum, int64_t n0, int64_t n1, float* y,
              int64_t ldy) {
  const int64_t k = a.k, kq = ka / 4;
  thread_local std::vector<int32_t> lbuf;
  lbuf.resize(kq * NT * 16);
  int32_t* lanes = lbuf.data();
  const __m512i ones = _mm512_set1_epi8(1), k16512 = _mm512_set1_epi64(16512);
  for (int64_t n = n0; n < n1; n += 16 * NT) {
    q8_lanes<NT>(q, k, n, n1, lanes);
    __m512i rsk[2 * NT];
    __m512 sw[NT];
    __mmask16 keep[NT];
    for (int u = 0; u < NT; ++u) {
      const int64_t left = std::clamp<int64_t>(n1 - n - 16 * u, 0, 16);
      keep[u] = __mmask16((1u << left) - 1);
      sw[u] = _mm512_maskz_loadu_ps(keep[u], scale + n + 16 * u);
      __m512i rs;
      if (rowsum) {
        rs = _mm512_maskz_loadu_epi32(keep[u], rowsum + n + 16 * u);
      } else {  // the rows' sums, from the lanes: a vpdpbusd with ones
        rs = _mm512_setzero_si512();
        for (int64_t j = 0; j < kq; ++j)
          rs = _mm512_dpbusd_epi32(rs, ones, _mm512_loadu_si512(lanes + (j * NT + u) * 16));
      }
      for (int h = 0; h < 2; ++h)
        rsk[2 * u + h] =
            _mm512_mullo_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(rs, h)), k16512);
    }
    const int64_t next = std::min(n + 16 * NT, n1);
    const int64_t pf_bytes = (std::min(next + 16 * NT, n1) - next) * k;
    for (int64_t i = 0; i < a.m; i += 4) {
      const int8_t* pf = i == 0 && pf_bytes > 0 ? q + next * k : nullptr;
      const uint8_t *x1 = u1 + i * ka, *x2 = u2 + i * ka;
      const float* sx = a.scale + i;
      float* yi = y + i * ldy + n;
      auto tiles = [&](auto mr) {
        q8_tiles<decltype(mr)::value, NT>(x1, x2, ka, sx, lanes, kq, rsk, sw, keep, pf,
                                          pf_bytes, yi, ldy);
      };
      switch (std::min<int64_t>(4, a.m - i)) {
        case 1: tiles(std::integral_constant<int, 1>()); break;
        case 2: tiles(std::integral_constant<int, 2>()); break;
        case 3: tiles(std::integral_constant<int, 3>()); break;
        default: tiles(std::integral_constant<int, 4>()); break;
      }
    }
  }
}

// int8 rows. vpdpbusd wants its unsigned operand first, so x's two levels are shifted by
// +128 and 128 * sum_k q[n, k] is taken off each sum afterwards; without a precomputed
// rowsum that sum comes from a vpdpbusd of the row with ones, in the same pass. A batch of
// x rows goes through q8_batch (its integer sums are the one-row kernel's, so each row's
// result has the same bits).
void gemm_q8(const Acts& a, const int8_t* q, const float* scale, const int32_t* rowsum,
             int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t k = a.k;
  const int64_t ka = a.m == 1 ? k : (k + 3) / 4 * 4;  // q8_batch reads x 4 bytes at a time
  thread_local std::vector<uint8_t> ubuf;
  ubuf.assign(2 * a.m * ka, 0);
  uint8_t* u1 = ubuf.data();
  uint8_t* u2 = u1 + a.m * ka;
  for (int64_t i = 0; i < a.m; ++i)
    for (int64_t j = 0; j < k; ++j) {
      u1[i * ka + j] = uint8_t(a.q1[i * k + j] + 128);
      u2[i * ka + j] = uint8_t(a.q2[i * k + j] + 128);
    }
  if (a.m == 1) return q8_one_row(u1, u2, a.scale[0], k, q, scale, rowsum, n0, n1, y);
  q8_batch<2>(a, u1, u2, ka, q, scale, rowsum, n0, n1, y, ldy);
}

void dequant_q4(const uint8_t* q, const uint16_t* dm, int64_t k, int64_t n0, int64_t n1,
                float* out_f32, uint16_t* out_bf16, int64_t ldo) {
  const int64_t kb = k / kBlock;
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* p = q + (t * kb + b) * kTileBytes;
      const uint16_t* d = dm + (t * kb + b) * 2 * kTile;
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d)));
      const __m512 mv =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + kTile)));
      alignas(64) float dr[kTile], mr[kTile];
      _mm512_store_ps(dr, dv);
      _mm512_store_ps(mr, mv);
      for (int r = 0; r < kTile; ++r) {
        int32_t u[4];
        for (int s = 0; s < 4; ++s) std::memcpy(&u[s], p + s * 64 + r * 4, 4);
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
        const __m128i lo = _mm_and_si128(v, low);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        const __m128i cols[2] = {_mm_unpacklo_epi32(lo, hi), _mm_unpackhi_epi32(lo, hi)};
        const int64_t row = (t * kTile + r - n0) * ldo + b * kBlock;
        for (int c = 0; c < 2; ++c) {
          const __m512 w = _mm512_fmadd_ps(_mm512_set1_ps(dr[r]),
                                           _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(cols[c])),
                                           _mm512_set1_ps(mr[r]));
          if (out_f32) {
            _mm512_storeu_ps(out_f32 + row + c * 16, w);
          } else {
            __m512i x = _mm512_castps_si512(w);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
            x = _mm512_srli_epi32(
                _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_bf16 + row + c * 16),
                                _mm512_cvtepi32_epi16(x));
          }
        }
      }
    }
}

// Of the m slots of a tile from slot s, those the row may attend (the new token's always).
inline __mmask16 allowed_lanes(const AttendArgs& a, int64_t s, int64_t m) {
  __mmask16 keep = __mmask16((1u << m) - 1);
  if (a.allowed)
    for (int64_t t = 0; t < m; ++t) {
      const int64_t slot = s + t;
      if (slot != a.own && !a.allowed[slot * a.allowed_stride]) keep &= ~(1u << t);
    }
  return keep;
}

// exp on [-87, 88] as 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6; 0 below
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
  const __m512 kf = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), kRound);
  __m512 r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(kf, _mm512_set1_ps(-2.12194440e-4f), r);
  const float c[6] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int j = 1; j < 6; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, kf));
}

void vexp(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, exp16(_mm512_loadu_ps(v + i)));
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

// v = exp(v - m) over n numbers (exp(-inf) = 0), in place; returns their sum
float exp_sum(float* v, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(v + i), mv));
    _mm512_storeu_ps(v + i, e);
    total = _mm512_add_ps(total, e);
  }
  if (i < n) {
    const __mmask16 k = __mmask16((1u << (n - i)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, v + i), mv)));
    _mm512_mask_storeu_ps(v + i, k, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// The largest of n numbers (-inf for none)
float max_of(const float* v, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(v + i));
  if (i < n) m = _mm512_mask_max_ps(m, __mmask16((1u << (n - i)) - 1), m, _mm512_maskz_loadu_ps(__mmask16((1u << (n - i)) - 1), v + i));
  return _mm512_reduce_max_ps(m);
}

// The 16 lane sums of 16 vectors, as one vector (lane t: the sum of v[t]): three rounds of
// pairwise shuffles and adds, ~3 instructions a sum where a horizontal sum each takes ~8.
inline __m512 sum16_ps(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's part of v[4i..4i+3]
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // add the four 128-bit lanes of each u[i], into 128-bit lane i
  const __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                 _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                 _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xdd));
}

// A K/V row of NV vectors of 16 numbers, in the order attend_t works in. fp32: as stored.
// bf16: 32 numbers per 64-byte load, whose 32-bit lane i holds number 2i in its low half and
// 2i + 1 in its high one: the lane shifted left by 16 is number 2i as fp32, the lane with its
// low half cleared number 2i + 1. So vector 2c holds the even numbers of 32c .. 32c + 31 and
// 2c + 1 the odd ones, one instruction per 16 numbers; the query is put in the same order,
// and the output put back in the stored one.
template <typename T, int NV>
inline void load_row(const T* p, __m512* v) {
  if constexpr (sizeof(T) == 2) {
    const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
    for (int c = 0; c < NV / 2; ++c) {
      const __m512i x = _mm512_loadu_si512(p + 32 * c);
      v[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      v[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    }
  } else {
    for (int i = 0; i < NV; ++i) v[i] = _mm512_loadu_ps(p + 16 * i);
  }
}

// hd numbers x in load_row's order
template <typename T, int NV>
inline void to_row_order(const float* x, __m512* v) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int c = 0; c < NV / 2; ++c) {
    const __m512 a = _mm512_loadu_ps(x + 32 * c), b = _mm512_loadu_ps(x + 32 * c + 16);
    if constexpr (sizeof(T) == 2) {
      v[2 * c] = _mm512_permutex2var_ps(a, even, b);
      v[2 * c + 1] = _mm512_permutex2var_ps(a, odd, b);
    } else {
      v[2 * c] = a;
      v[2 * c + 1] = b;
    }
  }
}

// v in load_row's order, stored as hd numbers in order
template <typename T, int NV>
inline void store_from_row_order(float* x, const __m512* v) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int c = 0; c < NV / 2; ++c) {
    if constexpr (sizeof(T) == 2) {
      _mm512_storeu_ps(x + 32 * c, _mm512_permutex2var_ps(v[2 * c], lo, v[2 * c + 1]));
      _mm512_storeu_ps(x + 32 * c + 16, _mm512_permutex2var_ps(v[2 * c], hi, v[2 * c + 1]));
    } else {
      _mm512_storeu_ps(x + 32 * c, v[2 * c]);
      _mm512_storeu_ps(x + 32 * c + 16, v[2 * c + 1]);
    }
  }
}

// The dots of qv with rows r .. r + 15, lane t for row r + t
template <typename T, int NV>
inline __m512 dots16(const __m512* qv, const T* r, int64_t hd) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    __m512 v[NV];
    load_row<T, NV>(r + t * hd, v);
    acc[t] = _mm512_mul_ps(qv[0], v[0]);
    for (int i = 1; i < NV; ++i) acc[t] = _mm512_fmadd_ps(qv[i], v[i], acc[t]);
  }
  return sum16_ps(acc);
}

// The same for rows r .. r + m - 1 (m < 16, or any m where 16 at once take too many
// registers), one at a time; 0 past m
template <typename T, int NV>
inline __m512 dots_each(const __m512* qv, const T* r, int64_t hd, int64_t m) {
  alignas(64) float d[16] = {};
  for (int64_t t = 0; t < m; ++t) {
    __m512 v[NV];
    load_row<T, NV>(r + t * hd, v);
    __m512 acc = _mm512_mul_ps(qv[0], v[0]);
    for (int j = 1; j < NV; ++j) acc = _mm512_fmadd_ps(qv[j], v[j], acc);
    d[t] = _mm512_reduce_add_ps(acc);
  }
  return _mm512_load_ps(d);
}

// Ask for the cache lines of `bytes` bytes from p
inline void prefetch(const void* p, int64_t bytes, int hint) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) {
    if (hint == 0) {
      _mm_prefetch(c + i, _MM_HINT_T0);
    } else {
      _mm_prefetch(c + i, _MM_HINT_T1);
    }
  }
}

// out[g0 .. g0 + G) = sum over slots of weight * V row: each V row read once for G heads
template <typename T, int NV, int G>
void weigh_rows(const AttendArgs& a, const std::vector<Run>& tiles, int64_t g0) {
  const T* V = static_cast<const T*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd, n_tiles = int64_t(tiles.size());
  const float* w = a.scores + g0 * len - a.s0;  // head g0 + h, slot s: w[h * len + s]
  __m512 o[G][NV];
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) o[h][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n_tiles; ++k) {
    if (k + 1 < n_tiles) prefetch(V + tiles[k + 1].row * hd, tiles[k + 1].n * hd * int64_t(sizeof(T)), 0);
    const int64_t s0 = tiles[k].s, s1 = s0 + tiles[k].n;
    const T* vr = V + tiles[k].row * hd;
    for (int64_t s = s0; s < s1; ++s, vr += hd) {
      if (a.allowed) {  // masked slots (weight 0) may hold anything: skip them
        bool any = false;
        for (int h = 0; h < G; ++h) any = any || w[h * len + s] != 0.f;
        if (!any) continue;
      }
      __m512 v[NV];
      load_row<T, NV>(vr, v);
      for (int h = 0; h < G; ++h) {
        const __m512 wh = _mm512_set1_ps(w[h * len + s]);
        for (int i = 0; i < NV; ++i) o[h][i] = _mm512_fmadd_ps(wh, v[i], o[h][i]);
      }
    }
  }
  for (int h = 0; h < G; ++h) store_from_row_order<T, NV>(a.out + (g0 + h) * hd, o[h]);
}

// NV vectors of 16 per head row (head_dim = 16 NV). The scores of every slot, 16 rows at a
// time (their 16 dots with a head's query summed into one vector), each tile of K rows for
// every head in turn while it is in L1; K tiles asked for 8 tiles ahead (into L2) and 1
// ahead (L1), this tile's V while its scores are computed (a row's blocks lie anywhere: the
// hardware prefetcher does not see them coming, and a batch's cache is far past L2); then per
// head exp and sum over all its scores at once; then the weighted V rows, each read once
// for up to 4 heads.
template <typename T, int NV>
void attend_t(const AttendArgs& a) {
  const T* K = static_cast<const T*>(a.k);
  const T* V = static_cast<const T*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd, group = a.group;
  const int64_t row_bytes = hd * int64_t(sizeof(T));
  thread_local std::vector<Run> tiles;
  thread_local std::vector<float> qs;  // the queries in load_row's order
  runs_of(a, 16, tiles);
  qs.resize(group * hd);
  for (int64_t g = 0; g < group; ++g) {
    __m512 qv[NV];
    to_row_order<T, NV>(a.q + g * hd, qv);
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(qs.data() + g * hd + 16 * i, qv[i]);
  }
  const int64_t n_tiles = int64_t(tiles.size());
  constexpr int64_t kAhead = 8;  // K tiles asked for into L2 ahead of use (16 KB of bf16 rows)
  for (int64_t k = 0; k < std::min(kAhead, n_tiles); ++k)
    prefetch(K + tiles[k].row * hd, tiles[k].n * row_bytes, 1);
  for (int64_t k = 0; k < n_tiles; ++k) {
    const int64_t s = tiles[k].s, m = tiles[k].n, row = tiles[k].row;
    if (k + kAhead < n_tiles)
      prefetch(K + tiles[k + kAhead].row * hd, tiles[k + kAhead].n * row_bytes, 1);
    if (k + 1 < n_tiles) prefetch(K + tiles[k + 1].row * hd, tiles[k + 1].n * row_bytes, 0);
    prefetch(V + row * hd, m * row_bytes, 1);
    const __mmask16 lanes = __mmask16((1u << m) - 1), keep = allowed_lanes(a, s, m);
    for (int64_t g = 0; g < group; ++g) {
      __m512 qv[NV];
      for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(qs.data() + g * hd + 16 * i);
      __m512 dots;
      if (NV <= 8 && m == 16) {
        dots = dots16<T, NV>(qv, K + row * hd, hd);
      } else {
        dots = dots_each<T, NV>(qv, K + row * hd, hd, m);
      }
      dots = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, dots);
      _mm512_mask_storeu_ps(a.scores + g * len + s - a.s0, lanes, dots);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sc = a.scores + g * len;
    const float mx = max_of(sc, len);
    a.max[g] = mx;
    if (mx == -INFINITY) {  // every slot masked: weight 0 each
      std::fill(sc, sc + len, 0.f);
      a.sum[g] = 0.f;
    } else {
      a.sum[g] = exp_sum(sc, len, mx);
    }
  }
  constexpr int G = NV >= 16 ? 1 : NV == 8 ? 2 : 4;  // heads per pass: G NV accumulators
  for (int64_t g0 = 0; g0 < group; g0 += G) {
    switch (std::min<int64_t>(G, group - g0)) {
      case 1: weigh_rows<T, NV, 1>(a, tiles, g0); break;
      case 2: weigh_rows<T, NV, std::min(G, 2)>(a, tiles, g0); break;
      case 3: weigh_rows<T, NV, std::min(G, 3)>(a, tiles, g0); break;
      default: weigh_rows<T, NV, G>(a, tiles, g0); break;
    }
  }
}

template <typename T>
void attend_dt(const AttendArgs& a) {
  switch (a.hd) {
    case 32: return attend_t<T, 2>(a);
    case 64: return attend_t<T, 4>(a);
    case 128: return attend_t<T, 8>(a);
    case 256: return attend_t<T, 16>(a);
    default: return attend_generic(a);
  }
}

void attend(const AttendArgs& a) {
  if (a.bf16) {
    attend_dt<uint16_t>(a);
  } else {
    attend_dt<float>(a);
  }
}

// ---------------------------------------------------------------- quantized K/V rows
// 16 int8 numbers as fp32 lanes
inline __m512 load_i8x16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

// The 32 numbers of an int4 group (16 bytes) as their q in 0..15: lo = numbers 0..15,
// hi = numbers 16..31
inline void load_i4x32(const uint8_t* p, __m512& lo, __m512& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(0x0f);
  lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low)));
  hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low)));
}

// q . k for one quantized K row (NV vectors of 16 numbers); qsum[j]: the sum of the query
// over int4 group j (the m of each group multiplies it)
template <int NV, int BITS>
inline float dot_row(const __m512* qv, const float* qsum, const uint8_t* r,
                     const uint16_t* sc) {
  if constexpr (BITS == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(r);
    __m512 acc = _mm512_mul_ps(qv[0], load_i8x16(q));
    for (int i = 1; i < NV; ++i) acc = _mm512_fmadd_ps(qv[i], load_i8x16(q + 16 * i), acc);
    return _mm512_reduce_add_ps(acc) * bf16_to_f32(sc[0]);
  } else {
    __m512 acc = _mm512_setzero_ps();
    float m = 0.f;
    for (int j = 0; j < NV / 2; ++j) {
      __m512 lo, hi;
      load_i4x32(r + 16 * j, lo, hi);
      const __m512 part = _mm512_fmadd_ps(qv[2 * j + 1], hi, _mm512_mul_ps(qv[2 * j], lo));
      acc = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32(sc[2 * j])), part, acc);
      m += bf16_to_f32(sc[2 * j + 1]) * qsum[j];
    }
    return _mm512_reduce_add_ps(acc) + m;
  }
}

// A quantized row as NV vectors of 16 numbers in order: int8 s q, int4 d q + m per group
template <int NV, int BITS>
inline void dequant_row(const uint8_t* r, const uint16_t* sc, __m512* v) {
  if constexpr (BITS == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(r);
    const __m512 s = _mm512_set1_ps(bf16_to_f32(sc[0]));
    for (int i = 0; i < NV; ++i) v[i] = _mm512_mul_ps(s, load_i8x16(q + 16 * i));
  } else {
    for (int j = 0; j < NV / 2; ++j) {
      __m512 lo, hi;
      load_i4x32(r + 16 * j, lo, hi);
      const __m512 d = _mm512_set1_ps(bf16_to_f32(sc[2 * j]));
      const __m512 m = _mm512_set1_ps(bf16_to_f32(sc[2 * j + 1]));
      v[2 * j] = _mm512_fmadd_ps(d, lo, m);
      v[2 * j + 1] = _mm512_fmadd_ps(d, hi, m);
    }
  }
}

// weigh_rows over quantized V rows: each row dequantized once for G heads
template <int NV, int BITS, int G>
void weigh_qrows(const AttendArgs& a, const std::vector<Run>& tiles, int64_t g0) {
  const uint8_t* V = static_cast<const uint8_t*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd, n_tiles = int64_t(tiles.size());
  const int64_t rb = BITS == 8 ? hd : hd / 2, ns = BITS == 8 ? 1 : hd / 16;
  const float* w = a.scores + g0 * len - a.s0;  // head g0 + h, slot s: w[h * len + s]
  __m512 o[G][NV];
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) o[h][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n_tiles; ++k) {
    const int64_t s0 = tiles[k].s, s1 = s0 + tiles[k].n;
    int64_t row = tiles[k].row;
    for (int64_t s = s0; s < s1; ++s, ++row) {
      bool any = false;  // masked slots, and those exp took to 0: skip
      for (int h = 0; h < G; ++h) any = any || w[h * len + s] != 0.f;
      if (!any) continue;
      __m512 v[NV];
      dequant_row<NV, BITS>(V + row * rb, a.v_scale + row * ns, v);
      for (int h = 0; h < G; ++h) {
        const __m512 wh = _mm512_set1_ps(w[h * len + s]);
        for (int i = 0; i < NV; ++i) o[h][i] = _mm512_fmadd_ps(wh, v[i], o[h][i]);
      }
    }
  }
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(a.out + (g0 + h) * hd + 16 * i, o[h][i]);
}

// attend_t over quantized rows of BITS (8 or 4), NV vectors of 16 per row: the same passes
// (int8 scores 16 rows at a time, their scales applied to the 16 sums at once; int4 row by
// row), K asked for 8 tiles ahead and this tile's V while its scores are computed
template <int NV, int BITS>
void attend_qt(const AttendArgs& a) {
  const uint8_t* K = static_cast<const uint8_t*>(a.k);
  const uint8_t* V = static_cast<const uint8_t*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd, group = a.group;
  const int64_t rb = BITS == 8 ? hd : hd / 2, ns = BITS == 8 ? 1 : hd / 16;
  thread_local std::vector<Run> tiles;
  runs_of(a, 16, tiles);
  const int64_t n_tiles = int64_t(tiles.size());
  constexpr int64_t kAhead = 8;
  for (int64_t k = 0; k < std::min(kAhead, n_tiles); ++k)
    prefetch(K + tiles[k].row * rb, tiles[k].n * rb, 1);
  for (int64_t k = 0; k < n_tiles; ++k) {
    const int64_t s = tiles[k].s, m = tiles[k].n, row = tiles[k].row;
    if (k + kAhead < n_tiles) prefetch(K + tiles[k + kAhead].row * rb, tiles[k + kAhead].n * rb, 1);
    prefetch(V + row * rb, m * rb, 1);
    const __mmask16 lanes = __mmask16((1u << m) - 1), keep = allowed_lanes(a, s, m);
    for (int64_t g = 0; g < group; ++g) {
      __m512 qv[NV];
      for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(a.q + g * hd + 16 * i);
      __m512 dots;
      if (BITS == 8 && NV <= 8 && m == 16) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) {
          const int8_t* q = reinterpret_cast<const int8_t*>(K + (row + t) * rb);
          acc[t] = _mm512_mul_ps(qv[0], load_i8x16(q));
          for (int i = 1; i < NV; ++i) acc[t] = _mm512_fmadd_ps(qv[i], load_i8x16(q + 16 * i), acc[t]);
        }
        dots = _mm512_mul_ps(sum16_ps(acc), load_bf16x16(a.k_scale + row));
      } else {
        float qsum[NV / 2 + 1];
        for (int j = 0; j < NV / 2; ++j)
          qsum[j] = _mm512_reduce_add_ps(_mm512_add_ps(qv[2 * j], qv[2 * j + 1]));
        alignas(64) float d[16] = {};
        for (int64_t t = 0; t < m; ++t)
          d[t] = dot_row<NV, BITS>(qv, qsum, K + (row + t) * rb, a.k_scale + (row + t) * ns);
        dots = _mm512_load_ps(d);
      }
      dots = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, dots);
      _mm512_mask_storeu_ps(a.scores + g * len + s - a.s0, lanes, dots);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sc = a.scores + g * len;
    const float mx = max_of(sc, len);
    a.max[g] = mx;
    if (mx == -INFINITY) {  // every slot masked: weight 0 each
      std::fill(sc, sc + len, 0.f);
      a.sum[g] = 0.f;
    } else {
      a.sum[g] = exp_sum(sc, len, mx);
    }
  }
  constexpr int G = NV >= 16 ? 1 : NV == 8 ? 2 : 4;
  for (int64_t g0 = 0; g0 < group; g0 += G) {
    switch (std::min<int64_t>(G, group - g0)) {
      case 1: weigh_qrows<NV, BITS, 1>(a, tiles, g0); break;
      case 2: weigh_qrows<NV, BITS, std::min(G, 2)>(a, tiles, g0); break;
      case 3: weigh_qrows<NV, BITS, std::min(G, 3)>(a, tiles, g0); break;
      default: weigh_qrows<NV, BITS, G>(a, tiles, g0); break;
    }
  }
}

template <int BITS>
void attend_qb(const AttendArgs& a) {
  switch (a.hd) {
    case 32: return attend_qt<2, BITS>(a);
    case 64: return attend_qt<4, BITS>(a);
    case 128: return attend_qt<8, BITS>(a);
    case 256: return attend_qt<16, BITS>(a);
    default: return attend_q_generic(a);
  }
}

void attend_q(const AttendArgs& a) {
  if (a.bits == 8) {
    attend_qb<8>(a);
  } else {
    attend_qb<4>(a);
  }
}

}  // namespace

const Kernels& avx512_kernels() {
  static const Kernels k{"avx512", quantize, gemm_q4, gemm_q8, dequant_q4, gemm_kb, attend, attend_q,
                         vexp};
  return k;
}

}  // namespace kvf
