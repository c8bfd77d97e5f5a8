// The AVX2 path (compiled with -mavx2 -mfma -mf16c): Intel Haswell and later, AMD Zen 1-3.
// int8 dot products with vpmaddubsw (unsigned weights or |w| times signed activations,
// pairs summed in int16) and vpmaddwd (pairs of int16 summed in int32), as llama.cpp does
// on such CPUs; each 32-bit lane holds one weight row, so no horizontal sums are needed
// for int4 (nor for int8 at several rows of x, which takes vpmaddwd on int16: q8_tiles).
//
// The same file is compiled again with KVF_VNNI defined for the `avxvnni` path: 256-bit
// registers and vpdpbusd (u8 x s8, four products summed into an int32 lane in one
// instruction) in place of the vpmaddubsw + vpmaddwd pair. KVF_VNNI=1 uses the VEX form
// (AVX-VNNI: Intel Alder Lake and later client CPUs, Sapphire Rapids, Zen 5); KVF_VNNI=2 the
// EVEX form of the same instruction on 256-bit registers (AVX-512 VNNI + VL), so that a CPU
// with AVX-512 and without AVX-VNNI runs, and tests, exactly this code. Every sum is an
// exact integer either way, so the three builds give the same bits.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../kernels.h"

namespace kvf {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline void store8_i8(int8_t* dst, __m256 rounded) {
  const __m256i v = _mm256_cvtps_epi32(rounded);
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(w, w));
}

inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i u = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(u), 16));
}

template <typename T>
inline __m256 load8(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return load_bf16x8(p);
  } else {
    return _mm256_loadu_ps(p);
  }
}

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// acc + the products u * s (u unsigned, s signed bytes) summed in groups: `Dot` is int16
// lanes (pairs, vpmaddubsw) without VNNI and int32 lanes (fours, vpdpbusd) with it; `lanes32`
// turns it into int32 sums of fours. The int16 form cannot overflow in the kernels below:
// they sum at most 8 pairs of 15 * 127 (int4) or one pair of 127 * 127 (int8) per lane.
#if defined(KVF_VNNI)
inline __m256i dot(__m256i acc, __m256i u, __m256i s) {
#if KVF_VNNI == 1
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_dpbusd_epi32(acc, u, s);
#endif
}
inline __m256i lanes32(__m256i acc) { return acc; }
#else
inline __m256i dot(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s));
}
inline __m256i lanes32(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
#endif

void quantize(const float* x, Acts& a, int8_t* q1, int8_t* q2, float* scale, float* sum) {
  const int64_t nb = a.k / a.block, blk = a.block;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t i = 0; i < a.m; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t o = i * a.k + b * blk;
      const float* xb = x + o;
      __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= blk; j += 8) {
        const __m256 v = _mm256_loadu_ps(xb + j);
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
        vsum = _mm256_add_ps(vsum, v);
      }
      float amax = hmax(vmax), s = hsum(vsum);
      for (int64_t t = j; t < blk; ++t) {
        amax = std::max(amax, std::fabs(xb[t]));
        s += xb[t];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m256 vinv = _mm256_set1_ps(inv), k128 = _mm256_set1_ps(128.f);
      for (j = 0; j + 8 <= blk; j += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + j), vinv);
        const __m256 r = _mm256_round_ps(v, kRound);
        store8_i8(q1 + o + j, r);
        store8_i8(q2 + o + j, _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, r), k128), kRound));
      }
      for (; j < blk; ++j) quantize_one(xb[j] * inv, q1 + o + j, q2 + o + j);
      scale[i * nb + b] = amax / 127.f / 128.f;
      sum[i * nb + b] = s;
    }
  a.point_at(q1, q2, scale, sum);
}

// One tile of 16 rows for MR rows of x: two 8-lane halves (rows 0-7 and 8-15). L = 1: x's
// second level is zero (Acts::levels) and its products are skipped.
template <int MR, int L>
void q4_tile(const Acts& a, int64_t i0, const uint8_t* q, const uint16_t* dm, int64_t t,
             float* y, int64_t ldy) {
  const int64_t kb = a.k / kBlock;
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* p = q + (t * kb + b) * kTileBytes;
    const uint16_t* d = dm + (t * kb + b) * 2 * kTile;
    // sums over the block: at most 8 * 2 * 15 * 127 = 30480 per int16 lane, no overflow
    __m256i s1[MR][2], s2[MR][2];
    for (int r = 0; r < MR; ++r) s1[r][0] = s1[r][1] = s2[r][0] = s2[r][1] = _mm256_setzero_si256();
    for (int s = 0; s < 4; ++s) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * 64));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * 64 + 32));
      const __m256i lo0 = _mm256_and_si256(v0, low);
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
      const __m256i lo1 = _mm256_and_si256(v1, low);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
      for (int r = 0; r < MR; ++r) {
        const int64_t o = (i0 + r) * a.k + b * kBlock + 8 * s;
        const __m256i xl1 = _mm256_set1_epi32(load4(a.q1 + o));
        const __m256i xh1 = _mm256_set1_epi32(load4(a.q1 + o + 4));
        s1[r][0] = dot(dot(s1[r][0], lo0, xl1), hi0, xh1);
        s1[r][1] = dot(dot(s1[r][1], lo1, xl1), hi1, xh1);
        if constexpr (L == 2) {
          const __m256i xl2 = _mm256_set1_epi32(load4(a.q2 + o));
          const __m256i xh2 = _mm256_set1_epi32(load4(a.q2 + o + 4));
          s2[r][0] = dot(dot(s2[r][0], lo0, xl2), hi0, xh2);
          s2[r][1] = dot(dot(s2[r][1], lo1, xl2), hi1, xh2);
        }
      }
    }
    const __m256 dv[2] = {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d))),
                          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 8)))};
    const __m256 mv[2] = {
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 16))),
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + 24)))};
    for (int r = 0; r < MR; ++r) {
      const __m256 sx = _mm256_set1_ps(a.scale[(i0 + r) * kb + b]);
      const __m256 xs = _mm256_set1_ps(a.sum[(i0 + r) * kb + b]);
      for (int h = 0; h < 2; ++h) {
        const __m256i n1 = _mm256_slli_epi32(lanes32(s1[r][h]), 7);
        const __m256i n = L == 2 ? _mm256_add_epi32(n1, lanes32(s2[r][h])) : n1;
        acc[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(dv[h], sx), _mm256_cvtepi32_ps(n), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(mv[h], xs, acc[r][h]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(y + (i0 + r) * ldy + t * kTile, acc[r][0]);
    _mm256_storeu_ps(y + (i0 + r) * ldy + t * kTile + 8, acc[r][1]);
  }
}

template <int L>
void q4_range(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t i = 0; i < a.m; i += 2) {
      if (a.m - i >= 2) {
        q4_tile<2, L>(a, i, q, dm, t, y, ldy);
      } else {
        q4_tile<1, L>(a, i, q, dm, t, y, ldy);
      }
    }
}

void gemm_q4(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t n0, int64_t n1,
             float* y, int64_t ldy) {
  if (a.levels == 1) return q4_range<1>(a, q, dm, n0, n1, y, ldy);
  q4_range<2>(a, q, dm, n0, n1, y, ldy);
}

// int8 rows: |w| (unsigned) times x with w's sign, so vpmaddubsw cannot saturate
// (2 * 127 * 127 < 32768); each vector of products goes straight into int32 lanes.
void q8_one_row(const Acts& a, const int8_t* q, const float* scale, int64_t n0, int64_t n1,
                float* y) {
  const int64_t k = a.k;
  const __m256i zero = _mm256_setzero_si256();
  const int8_t* x1 = a.q1;
  const int8_t* x2 = a.q2;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * k;
    __m256i c1 = _mm256_setzero_si256(), c2 = c1;
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j));
      const __m256i aw = _mm256_sign_epi8(wv, wv);
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1 + j));
      const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x2 + j));
      c1 = _mm256_add_epi32(c1, lanes32(dot(zero, aw, _mm256_sign_epi8(v1, wv))));
      c2 = _mm256_add_epi32(c2, lanes32(dot(zero, aw, _mm256_sign_epi8(v2, wv))));
    }
    int64_t s1 = hsum_i32(c1), s2 = hsum_i32(c2);
    for (; j < k; ++j) {
      s1 += int32_t(w[j]) * x1[j];
      s2 += int32_t(w[j]) * x2[j];
    }
    y[n] = float(s1 * 128 + s2) * a.scale[0] * scale[n];
  }
}

// 8 rows of 32 bytes -> 8 vectors, o[j] holding 32-bit lane j of every row (lane i = row i)
inline void transpose8(const __m256i* r, __m256i* o) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // per 128-bit half h: rows 2i, 2i+1 at lanes 4h..4h+3
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {  // u[4g + p], half h: rows 4g..4g+3 at lane 4h + p
    u[4 * g] = _mm256_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm256_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm256_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm256_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int p = 0; p < 4; ++p) {  // then the halves: rows 0-3 low, rows 4-7 high
    o[p] = _mm256_permute2x128_si256(u[p], u[4 + p], 0x20);
    o[4 + p] = _mm256_permute2x128_si256(u[p], u[4 + p], 0x31);
  }
}

// acc + the int32 sums of pairs of int16 products: vpmaddwd (which cannot overflow here:
// no operand is -32768) or the VNNI vpdpwssd
inline __m256i dot16(__m256i acc, __m256i a, __m256i b) {
#if !defined(KVF_VNNI)
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#elif KVF_VNNI == 1
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_dpwssd_epi32(acc, a, b);
#endif
}

// The rows [n, n + 8 NT) of q (those below n1; the others zero) in the int4 kernel's lane
// shape: lanes[(j * NT + u) * 8 + i] = columns 4j..4j+3 of row n + 8u + i (zero past k).
template <int NT>
void q8_lanes(const int8_t* q, int64_t k, int64_t n, int64_t n1, int32_t* lanes) {
  const int64_t kq = (k + 3) / 4;
  for (int u = 0; u < NT; ++u)
    for (int64_t j = 0; j < k; j += 32) {
      __m256i r[8], o[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = n + 8 * u + i;
        if (row >= n1) {
          r[i] = _mm256_setzero_si256();
        } else if (j + 32 <= k) {
          r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + row * k + j));
        } else {  // the row's last bytes, zero after them
          alignas(32) int8_t tail[32] = {};
          std::memcpy(tail, q + row * k + j, k - j);
          r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        }
      }
      transpose8(r, o);
      const int64_t nj = std::min<int64_t>(8, kq - j / 4);
      for (int c = 0; c < nj; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes + ((j / 4 + c) * NT + u) * 8), o[c]);
    }
}

// MR rows of x as one int16 level, 128 q1 + q2 (|.| <= 16512), times the NT tiles of
// `lanes`: each tile's bytes are widened here (columns 0, 2 and 1, 3 of each lane: two
// shifts), so that one vpmaddwd (or vpdpwssd) per pair of columns takes both levels - half
// the multiplies of vpmaddubsw + vpmaddwd per level - while the lanes stay one transpose
// per 32 columns. x comes in the same order (columns 0, 2, 1, 3 of each 4). The int32 lanes
// hold 1024 columns at most (1024 * 127 * 16512 < 2^31), so they go into doubles (exact
// below 2^53) every 256 steps; the total, 128 s1 + s2 of the one-row kernel, is rounded to
// float once, as its int64 is, and multiplied in its order.
// pf (or null): the next tiles' rows, 64 NT bytes of them fetched into L2 per step of j, so
// that reading them from memory overlaps this work.
template <int MR, int NT>
void q8_tiles(const int16_t* x, int64_t ka, const float* sx, const int32_t* lanes, int64_t kq,
              const __m256* sw, const __m256i* keep, const int8_t* pf, int64_t pf_bytes,
              float* y, int64_t ldy) {
  __m256d d[MR][NT][2];
  for (int64_t c0 = 0; c0 < kq; c0 += 256) {
    __m256i s[MR][NT];
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < NT; ++u) s[r][u] = _mm256_setzero_si256();
    for (int64_t j = c0; j < std::min(c0 + 256, kq); ++j) {
      __m256i we[NT], wo[NT];
      for (int u = 0; u < NT; ++u) {
        const __m256i w =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + (j * NT + u) * 8));
        we[u] = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8);
        wo[u] = _mm256_srai_epi16(w, 8);
      }
      if (pf)
        for (int64_t b = j * 64 * NT; b < (j + 1) * 64 * NT && b < pf_bytes; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(pf + b), _MM_HINT_T1);
      for (int r = 0; r < MR; ++r) {
        int32_t xe, xo;
        std::memcpy(&xe, x + r * ka + 4 * j, 4);
        std::memcpy(&xo, x + r * ka + 4 * j + 2, 4);
        const __m256i be = _mm256_set1_epi32(xe), bo = _mm256_set1_epi32(xo);
        for (int u = 0; u < NT; ++u) s[r][u] = dot16(dot16(s[r][u], be, we[u]), bo, wo[u]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < NT; ++u) {
        const __m256d lo = _mm256_cvtepi32_pd(_mm256_castsi256_si128(s[r][u]));
        const __m256d hi = _mm256_cvtepi32_pd(_mm256_extracti128_si256(s[r][u], 1));
        d[r][u][0] = c0 ? _mm256_add_pd(d[r][u][0], lo) : lo;
        d[r][u][1] = c0 ? _mm256_add_pd(d[r][u][1], hi) : hi;
      }
  }
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NT; ++u) {
      const __m256 fv = _mm256_set_m128(_mm256_cvtpd_ps(d[r][u][1]), _mm256_cvtpd_ps(d[r][u][0]));
      _mm256_maskstore_ps(y + r * ldy + 8 * u, keep[u],
                          _mm256_mul_ps(_mm256_mul_ps(fv, _mm256_set1_ps(sx[r])), sw[u]));
    }
}

// A batch of x rows, NT tiles of 8 weight rows at a time: see q8_lanes and q8_tiles.
template <int NT>
void q8_batch(const Acts& a, const int8_t* q, const float* scale, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  const int64_t k = a.k, kq = (k + 3) / 4, ka = 4 * kq;
  thread_local std::vector<int16_t> xbuf;  // 128 q1 + q2, rows padded to whole lanes
  xbuf.assign(a.m * ka, 0);
  int16_t* x = xbuf.data();
  for (int64_t i = 0; i < a.m; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t c = j % 4, at = j - c + (c == 1 ? 2 : c == 2 ? 1 : c);  // 0, 2, 1, 3
      x[i * ka + at] = int16_t(128 * a.q1[i * k + j] + a.q2[i * k + j]);
    }
  thread_local std::vector<int32_t> lbuf;
  lbuf.resize(kq * NT * 8);
  int32_t* lanes = lbuf.data();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t n = n0; n < n1; n += 8 * NT) {
    q8_lanes<NT>(q, k, n, n1, lanes);
    __m256 sw[NT];
    __m256i keep[NT];
    for (int u = 0; u < NT; ++u) {
      const int64_t left = std::clamp<int64_t>(n1 - n - 8 * u, 0, 8);
      keep[u] = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(left)), iota);
      sw[u] = _mm256_maskload_ps(scale + n + 8 * u, keep[u]);
    }
    const int64_t next = std::min(n + 8 * NT, n1);
    const int64_t pf_bytes = (std::min(next + 8 * NT, n1) - next) * k;
    for (int64_t i = 0; i < a.m; i += 4) {
      const int8_t* pf = i == 0 && pf_bytes > 0 ? q + next * k : nullptr;
      const int16_t* xi = x + i * ka;
      const float* sx = a.scale + i;
      float* yi = y + i * ldy + n;
      auto tiles = [&](auto mr) {
        q8_tiles<decltype(mr)::value, NT>(xi, ka, sx, lanes, kq, sw, keep, pf, pf_bytes, yi,
                                          ldy);
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

// One row of x streams each weight row once; a batch goes through q8_batch, whose integer
// sums and final expression are the one-row kernel's, so each row keeps its bits.
void gemm_q8(const Acts& a, const int8_t* q, const float* scale, const int32_t*, int64_t n0,
             int64_t n1, float* y, int64_t ldy) {
  if (a.m == 1) return q8_one_row(a, q, scale, n0, n1, y);
  q8_batch<2>(a, q, scale, n0, n1, y, ldy);
}

// ---------------------------------------------------------------- kb weights
// kernels.h's kb records in gemm_q4's shape: a tile's rows 0-7 and 8-15 as two vectors of
// eight 32-bit lanes, one row each, per sub-block s and half h (columns 8s + 4h .. +3, the
// low or the high nibbles). u is rebuilt as bytes here (nibbles, plus the bit planes, or
// through the lut) and multiplied as gemm_q4 multiplies its nibbles, or, where vpmaddubsw
// could saturate, widened to int16 (`wide`, below). The bit planes cost the most: five
// operations per 32 weights and plane (kb_plane), against two per level to multiply them,
// so for more than two rows of x each record is decoded once (kb_tile_rows).
//
// vpmaddubsw (no VNNI) sums pairs of u8 x s8 products into int16 lanes, |q1| <= 127,
// |q2| <= 64; they must neither saturate nor wrap when summed in int16:
//   4 bits: 2 * 15 * 127 = 3810 per pair, 8 pairs (a whole block) per lane: 30480
//   5 bits: 2 * 31 * 127 = 7874, 4 pairs (two sub-blocks: 31496), then into int32
//   6 bits: 2 * 63 * 127 = 16002, 2 pairs (one sub-block: 32004), then into int32
//   8 bits, lut (u up to 255): one pair could reach 2 * 255 * 127 > 32767, so these are
//     `wide`: u widened to int16 and multiplied by x as one int16 level, 128 q1 + q2
//     (|.| <= 16320), with vpmaddwd: pairs of at most 2 * 255 * 16320 = 8.3e6 in int32, 16
//     pairs per row and block (1.3e8), no overflow; both levels in one multiply.
// vpdpbusd (VNNI) sums four products into int32 without saturating: u whole, every form.
// The int32 sums are the scalar kernel's integers either way, so the builds agree.
enum KbForm : int { kU4, kU4Lut, kU5, kU6, kU8 };

template <int F>
struct KbForm_ {
  static constexpr int bits = F == kU5 ? 5 : F == kU6 ? 6 : F == kU8 ? 8 : 4;
#if defined(KVF_VNNI)
  static constexpr bool wide = false;
  static constexpr int chunk = 4;
#else
  static constexpr bool wide = F == kU4Lut || F == kU8;
  static constexpr int chunk = F == kU5 ? 2 : F == kU6 ? 1 : 4;  // sub-blocks per int16 sum
#endif
};

// bit plane bits of rows 8g..8g+7, half h (32 bits at byte 8h + 4g of the sub-block's 16
// plane bytes, bit 4r + j for row r, column j) as bytes `val` (set) or 0, lane i = bit i:
// byte i / 8 goes to lane i (vpshufb on the bytes repeated in both 128-bit halves), and
// its bit i % 8 is tested
inline __m256i kb_plane(__m256i bytes, int g, int h, __m256i val) {
  const char o = char(8 * h + 4 * g);
  const __m256i idx = _mm256_setr_epi8(o, o, o, o, o, o, o, o, o + 1, o + 1, o + 1, o + 1, o + 1,
                                       o + 1, o + 1, o + 1, o + 2, o + 2, o + 2, o + 2, o + 2,
                                       o + 2, o + 2, o + 2, o + 3, o + 3, o + 3, o + 3, o + 3,
                                       o + 3, o + 3, o + 3);
  const __m256i sel = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64,
                                       -128, 1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32,
                                       64, -128);
  const __m256i bit = _mm256_and_si256(_mm256_shuffle_epi8(bytes, idx), sel);
  return _mm256_and_si256(_mm256_cmpeq_epi8(bit, sel), val);
}

// u[g][h] of sub-block s of record p: rows 8g..8g+7 (one per lane), columns
// 8s + 4h .. 8s + 4h + 3 (the lane's bytes); lut: the 16 entries in both 128-bit halves
template <int F>
inline void kb_decode(const uint8_t* p, int s, __m256i lut, __m256i u[2][2]) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  if constexpr (F == kU8) {
    for (int g = 0; g < 2; ++g)
      for (int h = 0; h < 2; ++h)
        u[g][h] = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(p + 128 * s + 64 * h + 32 * g));
  } else {
    for (int g = 0; g < 2; ++g) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * s + 32 * g));
      u[g][0] = _mm256_and_si256(v, low);
      u[g][1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      if constexpr (F == kU4Lut)
        for (int h = 0; h < 2; ++h) u[g][h] = _mm256_shuffle_epi8(lut, u[g][h]);
    }
    for (int q = 0; q < KbForm_<F>::bits - 4; ++q) {
      const __m256i bytes = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 256 + 64 * q + 16 * s)));
      const __m256i val = _mm256_set1_epi8(char(16 << q));
      for (int g = 0; g < 2; ++g)
        for (int h = 0; h < 2; ++h) u[g][h] = _mm256_or_si256(u[g][h], kb_plane(bytes, g, h, val));
    }
  }
}

// kb_decode's u widened to int16 for the wide forms: uw[g][h][0] (vpunpcklbw) holds rows
// 0, 1 and 4, 5 of the eight, uw[g][h][1] rows 2, 3 and 6, 7, four columns each
template <int F>
inline void kb_widen(const uint8_t* p, int s, __m256i lut, __m256i uw[2][2][2]) {
  __m256i u[2][2];
  kb_decode<F>(p, s, lut, u);
  for (int g = 0; g < 2; ++g)
    for (int h = 0; h < 2; ++h) {
      uw[g][h][0] = _mm256_unpacklo_epi8(u[g][h], _mm256_setzero_si256());
      uw[g][h][1] = _mm256_unpackhi_epi8(u[g][h], _mm256_setzero_si256());
    }
}

// D and M of a tile's rows 0-7 and 8-15 ([g]) for block b, per half of 16 columns ([h],
// kSuper16 only); sup: the super-block's d (and -dmin), decoded when b enters it
template <int SC>
inline void kb_block_scales(const KbWeights& w, int64_t t, int64_t b, __m256 sup[2][2],
                            __m256 D[2][2], __m256 M[2][2]) {
  auto f16 = [](const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  auto i8 = [](const uint8_t* p) {  // 8 int8 scales as floats
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  };
  const int64_t kb = w.k / kBlock;
  if constexpr (SC == kPair) {
    const uint16_t* d = reinterpret_cast<const uint16_t*>(w.s) + (t * kb + b) * 32;
    for (int g = 0; g < 2; ++g) {
      D[0][g] = f16(d + 8 * g);
      M[0][g] = f16(d + 16 + 8 * g);
    }
  } else if constexpr (SC == kScale) {  // M = -zero D: exact in fp32
    const uint16_t* d = reinterpret_cast<const uint16_t*>(w.s) + (t * kb + b) * 16;
    for (int g = 0; g < 2; ++g) {
      D[0][g] = f16(d + 8 * g);
      M[0][g] = _mm256_mul_ps(D[0][g], _mm256_set1_ps(-float(w.zero)));
    }
  } else {
    const uint8_t* rec = w.s + (t * (w.k / 256) + b / 8) * kb_super_bytes(SC);
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rec);
    if (b % 8 == 0)
      for (int g = 0; g < 2; ++g) {
        sup[0][g] = f16(d + 8 * g);
        if constexpr (SC == kSuper)
          sup[1][g] = _mm256_xor_ps(f16(d + 16 + 8 * g), _mm256_set1_ps(-0.f));
      }
    // d sc and -dmin mn in fp32, exact (fp16 times int8), as kb_scales makes them
    const uint8_t* sc = rec + (SC == kSuper ? 64 : 32) + (SC == kSuperZ ? 16 : 32) * (b % 8);
    for (int g = 0; g < 2; ++g) {
      if constexpr (SC == kSuperZ) {
        D[0][g] = _mm256_mul_ps(sup[0][g], i8(sc + 8 * g));
        M[0][g] = _mm256_mul_ps(D[0][g], _mm256_set1_ps(-float(w.zero)));
      } else if constexpr (SC == kSuper) {
        D[0][g] = _mm256_mul_ps(sup[0][g], i8(sc + 8 * g));
        M[0][g] = _mm256_mul_ps(sup[1][g], i8(sc + 16 + 8 * g));
      } else {
        for (int h = 0; h < 2; ++h) {
          D[h][g] = _mm256_mul_ps(sup[0][g], i8(sc + 16 * h + 8 * g));
          M[h][g] = _mm256_mul_ps(D[h][g], _mm256_set1_ps(-32.f));
        }
      }
    }
  }
}

// Block b of a tile for MR rows of x (q4_tile's shape): acc += the block's products, kb
// weights of form F and scales SC (D, M from kb_block_scales); L = 1: x's second level is
// zero and skipped (`wide` forms take both levels as one). u comes from record p, or,
// BUF, from ub, the record already decoded ([s][g][h] as kb_decode gives it; wide:
// [s][g][h][2] as kb_widen does). x16: x as 128 q1 + q2 (int16), for the wide forms.
// kSuper16's halves of 16 columns (sub-blocks 0-1 and 2-3) have their own D and M, so
// each is summed and scaled apart.
template <int MR, int L, int F, int SC, bool BUF>
inline void kb_block(const Acts& a, const uint8_t* p, const __m256i* ub, __m256i lut,
                     const int16_t* x16, int64_t i0, int64_t b, const __m256 D[2][2],
                     const __m256 M[2][2], __m256 acc[MR][2]) {
  using Form = KbForm_<F>;
  constexpr int NH = SC == kSuper16 ? 2 : 1, per = 4 / NH;
  constexpr int chunk = std::min(Form::chunk, per);
  const int64_t kb = a.k / kBlock;
  auto get = [&](int s, __m256i u[2][2]) {
    if constexpr (BUF) {
      for (int g = 0; g < 2; ++g)
        for (int h = 0; h < 2; ++h) u[g][h] = _mm256_load_si256(ub + (s * 2 + g) * 2 + h);
    } else {
      kb_decode<F>(p, s, lut, u);
    }
  };
#pragma GCC unroll 2
  for (int h = 0; h < NH; ++h) {
    __m256i n[MR][2];  // 128 n1 + n2 of the half (or block), int32, rows 8g..8g+7
    if constexpr (Form::wide) {
      // products of rows (0, 1, 4, 5) and (2, 3, 6, 7) of each g (kb_widen's order), two
      // lanes per row (columns 0-1, 2-3): vphaddd puts rows 0..7 in order
      __m256i c[MR][2][2];
      for (int r = 0; r < MR; ++r)
        for (int g = 0; g < 2; ++g) c[r][g][0] = c[r][g][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int s = h * per; s < (h + 1) * per; ++s) {
        __m256i uw[2][2][2];
        if constexpr (BUF) {
          for (int g = 0; g < 2; ++g)
            for (int hh = 0; hh < 2; ++hh)
              for (int e = 0; e < 2; ++e)
                uw[g][hh][e] = _mm256_load_si256(ub + ((s * 2 + g) * 2 + hh) * 2 + e);
        } else {
          kb_widen<F>(p, s, lut, uw);
        }
        for (int r = 0; r < MR; ++r) {
          const int16_t* xs = x16 + (i0 + r) * a.k + b * kBlock + 8 * s;
          int64_t xl, xh;
          std::memcpy(&xl, xs, 8);
          std::memcpy(&xh, xs + 4, 8);
          const __m256i bl = _mm256_set1_epi64x(xl), bh = _mm256_set1_epi64x(xh);
          for (int g = 0; g < 2; ++g)
            for (int e = 0; e < 2; ++e)
              c[r][g][e] = dot16(dot16(c[r][g][e], uw[g][0][e], bl), uw[g][1][e], bh);
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int g = 0; g < 2; ++g) n[r][g] = _mm256_hadd_epi32(c[r][g][0], c[r][g][1]);
    } else {
      __m256i n1[MR][2], n2[MR][2];
      for (int r = 0; r < MR; ++r)
        n1[r][0] = n1[r][1] = n2[r][0] = n2[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int s0 = h * per; s0 < (h + 1) * per; s0 += chunk) {
        __m256i c1[MR][2], c2[MR][2];  // `dot` sums over `chunk` sub-blocks
        for (int r = 0; r < MR; ++r)
          c1[r][0] = c1[r][1] = c2[r][0] = c2[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int s = s0; s < s0 + chunk; ++s) {
          __m256i u[2][2];
          get(s, u);
          for (int r = 0; r < MR; ++r) {
            const int64_t o = (i0 + r) * a.k + b * kBlock + 8 * s;
            const __m256i xl1 = _mm256_set1_epi32(load4(a.q1 + o));
            const __m256i xh1 = _mm256_set1_epi32(load4(a.q1 + o + 4));
            for (int g = 0; g < 2; ++g) c1[r][g] = dot(dot(c1[r][g], u[g][0], xl1), u[g][1], xh1);
            if constexpr (L == 2) {
              const __m256i xl2 = _mm256_set1_epi32(load4(a.q2 + o));
              const __m256i xh2 = _mm256_set1_epi32(load4(a.q2 + o + 4));
              for (int g = 0; g < 2; ++g) c2[r][g] = dot(dot(c2[r][g], u[g][0], xl2), u[g][1], xh2);
            }
          }
        }
        for (int r = 0; r < MR; ++r)
          for (int g = 0; g < 2; ++g) {
            n1[r][g] = _mm256_add_epi32(n1[r][g], lanes32(c1[r][g]));
            if constexpr (L == 2) n2[r][g] = _mm256_add_epi32(n2[r][g], lanes32(c2[r][g]));
          }
      }
      for (int r = 0; r < MR; ++r)
        for (int g = 0; g < 2; ++g) {
          const __m256i n1s = _mm256_slli_epi32(n1[r][g], 7);
          n[r][g] = L == 2 ? _mm256_add_epi32(n1s, n2[r][g]) : n1s;
        }
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 sx = _mm256_set1_ps(a.scale[(i0 + r) * kb + b]);
      const __m256 xs = _mm256_set1_ps(NH == 2 ? a.hsum[(i0 + r) * (a.k / 16) + 2 * b + h]
                                               : a.sum[(i0 + r) * kb + b]);
      for (int g = 0; g < 2; ++g) {
        acc[r][g] = _mm256_fmadd_ps(_mm256_mul_ps(D[h][g], sx), _mm256_cvtepi32_ps(n[r][g]),
                                    acc[r][g]);
        acc[r][g] = _mm256_fmadd_ps(M[h][g], xs, acc[r][g]);
      }
    }
  }
}

// One tile of 16 rows for MR rows of x
template <int MR, int L, int F, int SC>
void kb_tile(const Acts& a, const KbWeights& w, __m256i lut, const int16_t* x16, int64_t i0,
             int64_t t, float* y, int64_t ldy) {
  const int64_t kb = a.k / kBlock, rec = kb_record(KbForm_<F>::bits);
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  __m256 sup[2][2] = {};
  for (int64_t b = 0; b < kb; ++b) {
    __m256 D[2][2], M[2][2];
    kb_block_scales<SC>(w, t, b, sup, D, M);
    kb_block<MR, L, F, SC, false>(a, w.q + (t * kb + b) * rec, nullptr, lut, x16, i0, b, D, M,
                                  acc);
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(y + (i0 + r) * ldy + t * kTile, acc[r][0]);
    _mm256_storeu_ps(y + (i0 + r) * ldy + t * kTile + 8, acc[r][1]);
  }
}

// One tile for all the rows of x (more than two): each record is decoded (and widened)
// once into ub, and every pair of x rows multiplies it from there, in L1 (row sums in
// accs, [m][16]); decoding the bit planes costs more than multiplying them
template <int L, int F, int SC>
void kb_tile_rows(const Acts& a, const KbWeights& w, __m256i lut, const int16_t* x16,
                  int64_t t, float* y, int64_t ldy, float* accs) {
  const int64_t kb = a.k / kBlock, rec = kb_record(KbForm_<F>::bits);
  std::fill(accs, accs + a.m * kTile, 0.f);
  __m256 sup[2][2] = {};
  alignas(32) __m256i ub[32];
  for (int64_t b = 0; b < kb; ++b) {
    __m256 D[2][2], M[2][2];
    kb_block_scales<SC>(w, t, b, sup, D, M);
    const uint8_t* p = w.q + (t * kb + b) * rec;
    for (int s = 0; s < 4; ++s) {
      if constexpr (KbForm_<F>::wide) {
        __m256i uw[2][2][2];
        kb_widen<F>(p, s, lut, uw);
        for (int j = 0; j < 8; ++j) _mm256_store_si256(ub + 8 * s + j, uw[j / 4][j / 2 % 2][j % 2]);
      } else {
        __m256i u[2][2];
        kb_decode<F>(p, s, lut, u);
        for (int j = 0; j < 4; ++j) _mm256_store_si256(ub + 4 * s + j, u[j / 2][j % 2]);
      }
    }
    auto rows = [&](int64_t i, auto mr) {
      constexpr int MR = decltype(mr)::value;
      __m256 acc[MR][2];
      for (int r = 0; r < MR; ++r)
        for (int g = 0; g < 2; ++g) acc[r][g] = _mm256_loadu_ps(accs + (i + r) * kTile + 8 * g);
      kb_block<MR, L, F, SC, true>(a, nullptr, ub, lut, x16, i, b, D, M, acc);
      for (int r = 0; r < MR; ++r)
        for (int g = 0; g < 2; ++g) _mm256_storeu_ps(accs + (i + r) * kTile + 8 * g, acc[r][g]);
    };
    for (int64_t i = 0; i < a.m; i += 2) {
      if (a.m - i >= 2) {
        rows(i, std::integral_constant<int, 2>());
      } else {
        rows(i, std::integral_constant<int, 1>());
      }
    }
  }
  for (int64_t i = 0; i < a.m; ++i)
    std::memcpy(y + i * ldy + t * kTile, accs + i * kTile, kTile * sizeof(float));
}

template <int L, int F, int SC>
void kb_range(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
              int64_t ldy) {
  const __m256i lut = w.lut ? _mm256_broadcastsi128_si256(
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.lut)))
                            : _mm256_setzero_si256();
  const int16_t* x16 = nullptr;
  if constexpr (KbForm_<F>::wide) {
    thread_local std::vector<int16_t> xbuf;
    xbuf.resize(a.m * a.k);
    for (int64_t j = 0; j < a.m * a.k; j += 16) {  // k % 32 == 0
      const __m256i v1 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.q1 + j)));
      const __m256i v2 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.q2 + j)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xbuf.data() + j),
                          _mm256_add_epi16(_mm256_slli_epi16(v1, 7), v2));
    }
    x16 = xbuf.data();
  }
  if (a.m > 2) {
    thread_local std::vector<float> accs;
    accs.resize(a.m * kTile);
    for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
      kb_tile_rows<L, F, SC>(a, w, lut, x16, t, y, ldy, accs.data());
    return;
  }
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t i = 0; i < a.m; i += 2) {
      if (a.m - i >= 2) {
        kb_tile<2, L, F, SC>(a, w, lut, x16, i, t, y, ldy);
      } else {
        kb_tile<1, L, F, SC>(a, w, lut, x16, i, t, y, ldy);
      }
    }
}

template <int F, int SC>
void kb_levels(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  // wide forms take both levels in one int16 number: no gain in skipping a zero q2
  if (a.levels == 1 && !KbForm_<F>::wide) return kb_range<1, F, SC>(a, w, n0, n1, y, ldy);
  kb_range<2, F, SC>(a, w, n0, n1, y, ldy);
}

template <int F>
void kb_scales_of(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  // the forms the GGUF types take (kvformer/formats/gguf/blocks.py); others run portably
  switch (w.scales) {
    case kPair:  // Q4_1, Q5_1
      if constexpr (F == kU4 || F == kU5) return kb_levels<F, kPair>(a, w, n0, n1, y, ldy);
      break;
    case kScale:  // Q4_0, Q5_0, Q8_0, IQ4_NL
      if constexpr (F != kU6) return kb_levels<F, kScale>(a, w, n0, n1, y, ldy);
      break;
    case kSuper:  // Q4_K, Q5_K
      if constexpr (F == kU4 || F == kU5) return kb_levels<F, kSuper>(a, w, n0, n1, y, ldy);
      break;
    case kSuperZ:  // IQ4_XS
      if constexpr (F == kU4Lut) return kb_levels<F, kSuperZ>(a, w, n0, n1, y, ldy);
      break;
    case kSuper16:  // Q6_K
      if constexpr (F == kU6) return kb_levels<F, kSuper16>(a, w, n0, n1, y, ldy);
      break;
    default: break;
  }
  gemm_kb_generic(a, w, n0, n1, y, ldy);
}

void gemm_kb(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
             int64_t ldy) {
  switch (w.bits) {
    case 4: return w.lut ? kb_scales_of<kU4Lut>(a, w, n0, n1, y, ldy)
                         : kb_scales_of<kU4>(a, w, n0, n1, y, ldy);
    case 5: return kb_scales_of<kU5>(a, w, n0, n1, y, ldy);
    case 6: return kb_scales_of<kU6>(a, w, n0, n1, y, ldy);
    default: return kb_scales_of<kU8>(a, w, n0, n1, y, ldy);
  }
}

inline void store_bf16x8(uint16_t* dst, __m256 v) {
  __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  x = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)));
}

void dequant_q4(const uint8_t* q, const uint16_t* dm, int64_t k, int64_t n0, int64_t n1,
                float* out_f32, uint16_t* out_bf16, int64_t ldo) {
  const int64_t kb = k / kBlock;
  const __m128i low = _mm_set1_epi8(0x0f);
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* p = q + (t * kb + b) * kTileBytes;
      const uint16_t* d = dm + (t * kb + b) * 2 * kTile;
      for (int r = 0; r < kTile; ++r) {
        int32_t u[4];
        for (int s = 0; s < 4; ++s) std::memcpy(&u[s], p + s * 64 + r * 4, 4);
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
        const __m128i lo = _mm_and_si128(v, low);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        // per sub-block s: 4 low nibbles (columns 8s..8s+3), then 4 high (8s+4..8s+7)
        const __m128i cols[2] = {_mm_unpacklo_epi32(lo, hi), _mm_unpackhi_epi32(lo, hi)};
        const __m256 dr = _mm256_set1_ps(f16_to_f32(d[r])), mr = _mm256_set1_ps(f16_to_f32(d[kTile + r]));
        const int64_t row = (t * kTile + r - n0) * ldo + b * kBlock;
        for (int c = 0; c < 4; ++c) {
          const __m128i bytes = c % 2 ? _mm_srli_si128(cols[c / 2], 8) : cols[c / 2];
          const __m256 w = _mm256_fmadd_ps(dr, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), mr);
          if (out_f32) {
            _mm256_storeu_ps(out_f32 + row + c * 8, w);
          } else {
            store_bf16x8(out_bf16 + row + c * 8, w);
          }
        }
      }
    }
}

// exp on [-87, 88] as 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6
void vexp(float* v, int64_t n) {
  int64_t i = 0;
  const __m256 log2e = _mm256_set1_ps(1.44269504f), ln2_hi = _mm256_set1_ps(0.693359375f),
               ln2_lo = _mm256_set1_ps(-2.12194440e-4f), lo = _mm256_set1_ps(-87.0f),
               hi = _mm256_set1_ps(88.0f), one = _mm256_set1_ps(1.0f);
  const float c[6] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(v + i);
    const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const __m256 kf = _mm256_round_ps(_mm256_mul_ps(x, log2e), kRound);
    __m256 r = _mm256_fnmadd_ps(kf, ln2_hi, x);
    r = _mm256_fnmadd_ps(kf, ln2_lo, r);
    __m256 p = _mm256_set1_ps(c[0]);
    for (int j = 1; j < 6; ++j) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[j]));
    p = _mm256_fmadd_ps(p, r, one);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(kf), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(v + i, _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e))));
  }
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

// NV vectors of 8 per head row (head_dim = 8 NV)
template <typename T, int NV>
void attend_t(const AttendArgs& a) {
  const T* K = static_cast<const T*>(a.k);
  const T* V = static_cast<const T*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd;
  for (int64_t g = 0; g < a.group; ++g) {
    __m256 qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = _mm256_loadu_ps(a.q + g * hd + i * 8);
    float* sc = a.scores + g * len;
    float mx = -INFINITY;
    each_slot(a, [&](int64_t s, int64_t row) {
      if (a.allowed && s != a.own && !a.allowed[s * a.allowed_stride]) {
        sc[s - a.s0] = -INFINITY;
        return;
      }
      const T* kr = K + row * hd;
      __m256 acc = _mm256_mul_ps(qv[0], load8(kr));
      for (int i = 1; i < NV; ++i) acc = _mm256_fmadd_ps(qv[i], load8(kr + i * 8), acc);
      const float dot = hsum(acc);
      sc[s - a.s0] = dot;
      mx = std::max(mx, dot);
    });
    a.max[g] = mx;
    float* og = a.out + g * hd;
    if (mx == -INFINITY) {
      std::fill(og, og + hd, 0.f);
      a.sum[g] = 0.f;
      continue;
    }
    for (int64_t s = 0; s < len; ++s) sc[s] -= mx;
    vexp(sc, len);
    float total = 0.f;
    for (int64_t s = 0; s < len; ++s) total += sc[s];
    a.sum[g] = total;
    __m256 o[NV];
    for (int i = 0; i < NV; ++i) o[i] = _mm256_setzero_ps();
    each_slot(a, [&](int64_t s, int64_t row) {
      if (sc[s - a.s0] == 0.f) return;
      const __m256 w = _mm256_set1_ps(sc[s - a.s0]);
      const T* vr = V + row * hd;
      for (int i = 0; i < NV; ++i) o[i] = _mm256_fmadd_ps(w, load8(vr + i * 8), o[i]);
    });
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(og + i * 8, o[i]);
  }
}

template <typename T>
void attend_dt(const AttendArgs& a) {
  switch (a.hd) {
    case 32: return attend_t<T, 4>(a);
    case 64: return attend_t<T, 8>(a);
    case 128: return attend_t<T, 16>(a);
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
// 8 int8 numbers as fp32 lanes
inline __m256 load_i8x8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// The 32 numbers of an int4 group (16 bytes) as their q in 0..15, 8 per vector in order:
// v[0] = numbers 0..7, v[1] = 8..15 (low nibbles), v[2] = 16..23, v[3] = 24..31 (high)
inline void load_i4x32(const uint8_t* p, __m256* v) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
  v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

// q . k for one quantized K row (NV vectors of 8 numbers); qsum[j]: the sum of the query
// over int4 group j (the m of each group multiplies it)
template <int NV, int BITS>
inline float dot_row(const __m256* qv, const float* qsum, const uint8_t* r,
                     const uint16_t* sc) {
  if constexpr (BITS == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(r);
    __m256 acc = _mm256_mul_ps(qv[0], load_i8x8(q));
    for (int i = 1; i < NV; ++i) acc = _mm256_fmadd_ps(qv[i], load_i8x8(q + 8 * i), acc);
    return hsum(acc) * bf16_to_f32(sc[0]);
  } else {
    __m256 acc = _mm256_setzero_ps();
    float m = 0.f;
    for (int j = 0; j < NV / 4; ++j) {
      __m256 v[4];
      load_i4x32(r + 16 * j, v);
      __m256 part = _mm256_mul_ps(qv[4 * j], v[0]);
      for (int i = 1; i < 4; ++i) part = _mm256_fmadd_ps(qv[4 * j + i], v[i], part);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(bf16_to_f32(sc[2 * j])), part, acc);
      m += bf16_to_f32(sc[2 * j + 1]) * qsum[j];
    }
    return hsum(acc) + m;
  }
}

// o += w * (one quantized V row)
template <int NV, int BITS>
inline void add_row(__m256* o, float w, const uint8_t* r, const uint16_t* sc) {
  if constexpr (BITS == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(r);
    const __m256 ws = _mm256_set1_ps(w * bf16_to_f32(sc[0]));
    for (int i = 0; i < NV; ++i) o[i] = _mm256_fmadd_ps(ws, load_i8x8(q + 8 * i), o[i]);
  } else {
    for (int j = 0; j < NV / 4; ++j) {
      __m256 v[4];
      load_i4x32(r + 16 * j, v);
      const __m256 wd = _mm256_set1_ps(w * bf16_to_f32(sc[2 * j]));
      const __m256 wm = _mm256_set1_ps(w * bf16_to_f32(sc[2 * j + 1]));
      for (int i = 0; i < 4; ++i)
        o[4 * j + i] = _mm256_fmadd_ps(wd, v[i], _mm256_add_ps(o[4 * j + i], wm));
    }
  }
}

// attend_t over quantized rows of BITS (8 or 4), NV vectors of 8 per row
template <int NV, int BITS>
void attend_qt(const AttendArgs& a) {
  const uint8_t* K = static_cast<const uint8_t*>(a.k);
  const uint8_t* V = static_cast<const uint8_t*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd;
  const int64_t rb = BITS == 8 ? hd : hd / 2, ns = BITS == 8 ? 1 : hd / 16;
  for (int64_t g = 0; g < a.group; ++g) {
    __m256 qv[NV];
    float qsum[NV / 4 + 1];
    for (int i = 0; i < NV; ++i) qv[i] = _mm256_loadu_ps(a.q + g * hd + i * 8);
    for (int j = 0; j < NV / 4; ++j)
      qsum[j] = hsum(_mm256_add_ps(_mm256_add_ps(qv[4 * j], qv[4 * j + 1]),
                                   _mm256_add_ps(qv[4 * j + 2], qv[4 * j + 3])));
    float* sc = a.scores + g * len;
    float mx = -INFINITY;
    each_slot(a, [&](int64_t s, int64_t row) {
      if (a.allowed && s != a.own && !a.allowed[s * a.allowed_stride]) {
        sc[s - a.s0] = -INFINITY;
        return;
      }
      const float dot = dot_row<NV, BITS>(qv, qsum, K + row * rb, a.k_scale + row * ns);
      sc[s - a.s0] = dot;
      mx = std::max(mx, dot);
    });
    a.max[g] = mx;
    float* og = a.out + g * hd;
    if (mx == -INFINITY) {
      std::fill(og, og + hd, 0.f);
      a.sum[g] = 0.f;
      continue;
    }
    for (int64_t s = 0; s < len; ++s) sc[s] -= mx;
    vexp(sc, len);
    float total = 0.f;
    for (int64_t s = 0; s < len; ++s) total += sc[s];
    a.sum[g] = total;
    __m256 o[NV];
    for (int i = 0; i < NV; ++i) o[i] = _mm256_setzero_ps();
    each_slot(a, [&](int64_t s, int64_t row) {
      if (sc[s - a.s0] == 0.f) return;
      add_row<NV, BITS>(o, sc[s - a.s0], V + row * rb, a.v_scale + row * ns);
    });
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(og + i * 8, o[i]);
  }
}

template <int BITS>
void attend_qb(const AttendArgs& a) {
  switch (a.hd) {
    case 32: return attend_qt<4, BITS>(a);
    case 64: return attend_qt<8, BITS>(a);
    case 128: return attend_qt<16, BITS>(a);
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

#if !defined(KVF_VNNI)
const Kernels& avx2_kernels() {
  static const Kernels k{"avx2", quantize, gemm_q4, gemm_q8, dequant_q4, gemm_kb, attend, attend_q,
                         vexp};
  return k;
}
#elif KVF_VNNI == 1
const Kernels& avxvnni_kernels() {
  static const Kernels k{"avxvnni", quantize, gemm_q4, gemm_q8, dequant_q4, gemm_kb, attend, attend_q,
                         vexp};
  return k;
}
#else
const Kernels& avxvnni_evex_kernels() {
  static const Kernels k{"avxvnni", quantize, gemm_q4, gemm_q8, dequant_q4, gemm_kb, attend, attend_q,
                         vexp};
  return k;
}
#endif

}  // namespace kvf
