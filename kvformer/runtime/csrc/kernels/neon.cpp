// The NEON path for 64-bit ARM (compiled with -march=armv8.2-a+dotprod): Apple silicon,
// AWS Graviton 2 and later, Ampere Altra, Cortex-A76 and later. The integer dot products use
// sdot/udot-style `vdotq_s32` (four int8 products summed into an int32 lane): each 32-bit
// lane of the int4 layout holds 4 columns of one weight row, so one instruction covers 4
// rows x 4 columns with no horizontal sums. Quantizing activations and unpacking weights
// for prefill are the portable path's (they are a small part of a decode step); attention
// uses 4-lane fp32 FMAs. An ARM CPU without the dot-product extension runs the scalar path.
#include <arm_neon.h>

#include <algorithm>
#include <cmath>

#include "../kernels.h"

namespace kvf {
namespace {

inline int8x16_t splat4(const int8_t* p) {  // 4 bytes repeated in every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}

// One tile of 16 rows (four vectors of 4 rows) for MR rows of x.
template <int MR>
void q4_tile(const Acts& a, int64_t i0, const uint8_t* q, const uint16_t* dm, int64_t t,
             float* y, int64_t ldy) {
  const int64_t kb = a.k / kBlock;
  const uint8x16_t low = vdupq_n_u8(0x0f);
  float32x4_t acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* p = q + (t * kb + b) * kTileBytes;
    const uint16_t* d = dm + (t * kb + b) * 2 * kTile;
    int32x4_t s1[MR][4], s2[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 4; ++v) s1[r][v] = s2[r][v] = vdupq_n_s32(0);
    for (int s = 0; s < 4; ++s) {
      int8x16_t lo[4], hi[4];
      for (int v = 0; v < 4; ++v) {
        const uint8x16_t bytes = vld1q_u8(p + s * 64 + v * 16);
        lo[v] = vreinterpretq_s8_u8(vandq_u8(bytes, low));  // 0..15: exact as int8
        hi[v] = vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4));
      }
      for (int r = 0; r < MR; ++r) {
        const int64_t o = (i0 + r) * a.k + b * kBlock + 8 * s;
        const int8x16_t xl1 = splat4(a.q1 + o), xh1 = splat4(a.q1 + o + 4);
        const int8x16_t xl2 = splat4(a.q2 + o), xh2 = splat4(a.q2 + o + 4);
        for (int v = 0; v < 4; ++v) {
          s1[r][v] = vdotq_s32(vdotq_s32(s1[r][v], lo[v], xl1), hi[v], xh1);
          s2[r][v] = vdotq_s32(vdotq_s32(s2[r][v], lo[v], xl2), hi[v], xh2);
        }
      }
    }
    float32x4_t dv[4], mv[4];
    for (int v = 0; v < 4; ++v) {
      dv[v] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(d + 4 * v)));
      mv[v] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(d + kTile + 4 * v)));
    }
    for (int r = 0; r < MR; ++r) {
      const float sx = a.scale[(i0 + r) * kb + b], xs = a.sum[(i0 + r) * kb + b];
      for (int v = 0; v < 4; ++v) {
        const int32x4_t n = vaddq_s32(vshlq_n_s32(s1[r][v], 7), s2[r][v]);
        acc[r][v] = vfmaq_f32(acc[r][v], vmulq_n_f32(dv[v], sx), vcvtq_f32_s32(n));
        acc[r][v] = vfmaq_n_f32(acc[r][v], mv[v], xs);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) vst1q_f32(y + (i0 + r) * ldy + t * kTile + 4 * v, acc[r][v]);
}

void gemm_q4(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t n0, int64_t n1,
             float* y, int64_t ldy) {
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t i = 0; i < a.m; i += 2) {
      if (a.m - i >= 2) {
        q4_tile<2>(a, i, q, dm, t, y, ldy);
      } else {
        q4_tile<1>(a, i, q, dm, t, y, ldy);
      }
    }
}

// int8 rows times both activation levels, signed x signed.
void gemm_q8(const Acts& a, const int8_t* q, const float* scale, const int32_t*, int64_t n0,
             int64_t n1, float* y, int64_t ldy) {
  const int64_t k = a.k;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * k;
    for (int64_t i = 0; i < a.m; ++i) {
      const int8_t* x1 = a.q1 + i * k;
      const int8_t* x2 = a.q2 + i * k;
      int32x4_t c1 = vdupq_n_s32(0), c2 = c1;
      int64_t j = 0;
      for (; j + 16 <= k; j += 16) {
        const int8x16_t wv = vld1q_s8(w + j);
        c1 = vdotq_s32(c1, wv, vld1q_s8(x1 + j));
        c2 = vdotq_s32(c2, wv, vld1q_s8(x2 + j));
      }
      int64_t s1 = vaddvq_s32(c1), s2 = vaddvq_s32(c2);
      for (; j < k; ++j) {
        s1 += int32_t(w[j]) * x1[j];
        s2 += int32_t(w[j]) * x2[j];
      }
      y[i * ldy + n] = float(s1 * 128 + s2) * a.scale[i] * scale[n];
    }
  }
}

template <typename T>
inline float32x4_t load4f(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));  // bf16: the high half
  } else {
    return vld1q_f32(p);
  }
}

template <typename T>
void attend_t(const AttendArgs& a) {
  const T* K = static_cast<const T*>(a.k);
  const T* V = static_cast<const T*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd;
  for (int64_t g = 0; g < a.group; ++g) {
    const float* qg = a.q + g * hd;
    float* sc = a.scores + g * len;
    float mx = -INFINITY;
    each_slot(a, [&](int64_t s, int64_t row) {
      if (a.allowed && s != a.own && !a.allowed[s * a.allowed_stride]) {
        sc[s - a.s0] = -INFINITY;
        return;
      }
      float32x4_t acc = vdupq_n_f32(0.f);
      for (int64_t i = 0; i < hd; i += 4)
        acc = vfmaq_f32(acc, vld1q_f32(qg + i), load4f(K + row * hd + i));
      const float dot = vaddvq_f32(acc);
      sc[s - a.s0] = dot;
      mx = std::max(mx, dot);
    });
    float* og = a.out + g * hd;
    std::fill(og, og + hd, 0.f);
    a.max[g] = mx;
    if (mx == -INFINITY) {  // every slot of this part is masked
      a.sum[g] = 0.f;
      continue;
    }
    float total = 0.f;
    for (int64_t s = 0; s < len; ++s) {
      sc[s] = std::exp(sc[s] - mx);
      total += sc[s];
    }
    a.sum[g] = total;
    each_slot(a, [&](int64_t s, int64_t row) {
      const float w = sc[s - a.s0];
      if (w == 0.f) return;
      const T* vr = V + row * hd;
      for (int64_t i = 0; i < hd; i += 4)
        vst1q_f32(og + i, vfmaq_n_f32(vld1q_f32(og + i), load4f(vr + i), w));
    });
  }
}

void attend(const AttendArgs& a) {
  if (a.hd % 4) return attend_generic(a);
  if (a.bf16) {
    attend_t<uint16_t>(a);
  } else {
    attend_t<float>(a);
  }
}

// ---------------------------------------------------------------- quantized K/V rows
// 16 int8 numbers as four vectors of fp32 lanes
inline void load_i8x16(const int8_t* p, float32x4_t* v) {
  const int8x16_t b = vld1q_s8(p);
  const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
  v[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  v[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
  v[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  v[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

// 16 bytes of 0..15 values as four vectors of fp32 lanes
inline void widen_u8x16(uint8x16_t b, float32x4_t* v) {
  const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_high_u8(b);
  v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
  v[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
  v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
  v[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
}

// The 32 numbers of an int4 group (16 bytes) as their q in 0..15, in order, 4 per vector
inline void load_i4x32(const uint8_t* p, float32x4_t* v) {
  const uint8x16_t b = vld1q_u8(p);
  widen_u8x16(vandq_u8(b, vdupq_n_u8(0x0f)), v);  // numbers 0..15
  widen_u8x16(vshrq_n_u8(b, 4), v + 4);           // numbers 16..31
}

// q . k for one quantized K row of `bits`; hd % 16 == 0 (int8) or % 32 == 0 (int4)
float dot_row(const float* q, int64_t hd, int bits, const uint8_t* r, const uint16_t* sc) {
  float32x4_t acc = vdupq_n_f32(0.f), v[8];
  if (bits == 8) {
    for (int64_t i = 0; i < hd; i += 16) {
      load_i8x16(reinterpret_cast<const int8_t*>(r) + i, v);
      for (int j = 0; j < 4; ++j) acc = vfmaq_f32(acc, vld1q_f32(q + i + 4 * j), v[j]);
    }
    return vaddvq_f32(acc) * bf16_to_f32(sc[0]);
  }
  float m = 0.f;
  for (int64_t g = 0; g < hd / 32; ++g) {
    load_i4x32(r + 16 * g, v);
    float32x4_t part = vdupq_n_f32(0.f), qs = vdupq_n_f32(0.f);
    for (int j = 0; j < 8; ++j) {
      const float32x4_t qj = vld1q_f32(q + 32 * g + 4 * j);
      part = vfmaq_f32(part, qj, v[j]);
      qs = vaddq_f32(qs, qj);
    }
    acc = vfmaq_n_f32(acc, part, bf16_to_f32(sc[2 * g]));
    m += bf16_to_f32(sc[2 * g + 1]) * vaddvq_f32(qs);
  }
  return vaddvq_f32(acc) + m;
}

// o += w * (one quantized V row)
void add_row(float* o, int64_t hd, int bits, float w, const uint8_t* r, const uint16_t* sc) {
  float32x4_t v[8];
  if (bits == 8) {
    const float ws = w * bf16_to_f32(sc[0]);
    for (int64_t i = 0; i < hd; i += 16) {
      load_i8x16(reinterpret_cast<const int8_t*>(r) + i, v);
      for (int j = 0; j < 4; ++j)
        vst1q_f32(o + i + 4 * j, vfmaq_n_f32(vld1q_f32(o + i + 4 * j), v[j], ws));
    }
    return;
  }
  for (int64_t g = 0; g < hd / 32; ++g) {
    load_i4x32(r + 16 * g, v);
    const float wd = w * bf16_to_f32(sc[2 * g]);
    const float32x4_t wm = vdupq_n_f32(w * bf16_to_f32(sc[2 * g + 1]));
    for (int j = 0; j < 8; ++j) {
      float* oj = o + 32 * g + 4 * j;
      vst1q_f32(oj, vfmaq_n_f32(vaddq_f32(vld1q_f32(oj), wm), v[j], wd));
    }
  }
}

// attend_t over quantized rows (a.bits 8 or 4)
void attend_q(const AttendArgs& a) {
  if (a.hd % 16) return attend_q_generic(a);
  const uint8_t* K = static_cast<const uint8_t*>(a.k);
  const uint8_t* V = static_cast<const uint8_t*>(a.v);
  const int64_t len = a.s1 - a.s0, hd = a.hd;
  const int64_t rb = a.bits == 8 ? hd : hd / 2, ns = a.bits == 8 ? 1 : hd / 16;
  for (int64_t g = 0; g < a.group; ++g) {
    const float* qg = a.q + g * hd;
    float* sc = a.scores + g * len;
    float mx = -INFINITY;
    each_slot(a, [&](int64_t s, int64_t row) {
      if (a.allowed && s != a.own && !a.allowed[s * a.allowed_stride]) {
        sc[s - a.s0] = -INFINITY;
        return;
      }
      const float dot = dot_row(qg, hd, a.bits, K + row * rb, a.k_scale + row * ns);
      sc[s - a.s0] = dot;
      mx = std::max(mx, dot);
    });
    float* og = a.out + g * hd;
    std::fill(og, og + hd, 0.f);
    a.max[g] = mx;
    if (mx == -INFINITY) {  // every slot of this part is masked
      a.sum[g] = 0.f;
      continue;
    }
    float total = 0.f;
    for (int64_t s = 0; s < len; ++s) {
      sc[s] = std::exp(sc[s] - mx);
      total += sc[s];
    }
    a.sum[g] = total;
    each_slot(a, [&](int64_t s, int64_t row) {
      const float w = sc[s - a.s0];
      if (w == 0.f) return;
      add_row(og, hd, a.bits, w, V + row * rb, a.v_scale + row * ns);
    });
  }
}

// ---------------------------------------------------------------- kb weights
// gemm_q4's scheme on kb records (kernels.h): each 16-byte vector is 4 rows x 4 columns of
// one sub-block, so vdotq_s32 sums 4 products per row lane. vdotq_s32 is signed x signed
// (u8 x s8 is i8mm's vusdotq_s32, which this path does not require), so the weights enter
// as int8:
//   - bits 4, 5, 6 with no lut: u <= 63, the same bits as an int8;
//   - bits 8 and lut (u up to 255): u - 128 (u ^ 0x80, or a lut of v - 128), with the
//     offset moved into the block's M: w = D u + M = D (u - 128) + (M + 128 D). The other
//     way, adding 128 sum(x's levels) back per block, would need those sums per block and row
//     in the inner loop; this one costs one fp32 op per block, and it is at least as exact:
//     every GGUF type with such u has M = -128 D (Q8_0, IQ4_NL; IQ4_XS's dmin mn = 128 d sc),
//     whose M + 128 D is exactly 0, so the result is D sx (128 n1 + n2) of the centred u
//     alone instead of the difference of two large terms that the scalar path rounds
//     separately (the two agree to fp32 rounding of those terms).
// The 1 or 2 planes of bits 5 and 6 (64 bits per sub-block and half: bit 4r + j) are spread
// to the bytes of the vector they belong to: a table lookup copies the word's byte holding
// rows 4v, 4v + 1 into lanes 0..7 and the next into lanes 8..15, vtst against 1, 2, ..., 128
// finds each lane's bit, and its value 16 << p is OR-ed into the nibble.

// D and M of the 16 rows of tile t, block b, 4 rows a vector, per half of 16 columns (the
// same for both but with kSuper16): kb_scales (kernels.h) in vectors, the same fp32 products.
inline float32x4_t f16x4(const uint16_t* p) {
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

void kb_scales_v(const KbWeights& w, int64_t t, int64_t b, float32x4_t D[2][4],
                 float32x4_t M[2][4]) {
  const int64_t kb = w.k / kBlock;
  if (w.scales == kPair) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w.s) + (t * kb + b) * 32;
    for (int v = 0; v < 4; ++v) {
      D[0][v] = D[1][v] = f16x4(p + 4 * v);
      M[0][v] = M[1][v] = f16x4(p + 16 + 4 * v);
    }
    return;
  }
  if (w.scales == kScale) {  // M = -zero D: exact in fp32
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w.s) + (t * kb + b) * 16;
    for (int v = 0; v < 4; ++v) {
      D[0][v] = D[1][v] = f16x4(p + 4 * v);
      M[0][v] = M[1][v] = vmulq_n_f32(D[0][v], -float(w.zero));
    }
    return;
  }
  const int64_t nsup = w.k / 256, sup = b / 8, j = b % 8;
  float32x4_t sc[4], mn[4];
  if (w.scales == kSuperZ) {
    const uint8_t* rec = w.s + (t * nsup + sup) * 160;
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rec);
    load_i8x16(reinterpret_cast<const int8_t*>(rec + 32 + 16 * j), sc);
    for (int v = 0; v < 4; ++v) {
      D[0][v] = D[1][v] = vmulq_f32(f16x4(d + 4 * v), sc[v]);
      M[0][v] = M[1][v] = vmulq_n_f32(D[0][v], -float(w.zero));
    }
    return;
  }
  if (w.scales == kSuper) {
    const uint8_t* rec = w.s + (t * nsup + sup) * 320;
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rec);
    load_i8x16(reinterpret_cast<const int8_t*>(rec + 64 + 32 * j), sc);
    load_i8x16(reinterpret_cast<const int8_t*>(rec + 64 + 32 * j + 16), mn);
    for (int v = 0; v < 4; ++v) {
      D[0][v] = D[1][v] = vmulq_f32(f16x4(d + 4 * v), sc[v]);
      M[0][v] = M[1][v] = vnegq_f32(vmulq_f32(f16x4(d + 16 + 4 * v), mn[v]));
    }
    return;
  }
  const uint8_t* rec = w.s + (t * nsup + sup) * 288;
  const uint16_t* d = reinterpret_cast<const uint16_t*>(rec);
  for (int h = 0; h < 2; ++h) {
    load_i8x16(reinterpret_cast<const int8_t*>(rec + 32 + 32 * j + 16 * h), sc);
    for (int v = 0; v < 4; ++v) {
      D[h][v] = vmulq_f32(f16x4(d + 4 * v), sc[v]);
      M[h][v] = vmulq_n_f32(D[h][v], -32.f);  // exact, as the scalar -32.f * D
    }
  }
}

// One tile of 16 rows for MR rows of x, L activation levels (1: q2 is zero and skipped).
template <int MR, int L, int Bits, bool Lut>
void kb_tile(const Acts& a, int64_t i0, const KbWeights& w, int64_t t, float* y,
             int64_t ldy) {
  constexpr bool centred = Bits == 8 || Lut;  // u - 128 enters the products
  constexpr int planes = Bits == 8 || Lut ? 0 : Bits - 4;
  static constexpr uint8_t kSel[16] = {1, 2, 4, 8, 16, 32, 64, 128,
                                       1, 2, 4, 8, 16, 32, 64, 128};
  static constexpr uint8_t kPick[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
  const int64_t kb = a.k / kBlock, kh = a.k / 16, rec = kb_record(Bits);
  const bool halves = w.scales == kSuper16;
  const uint8x16_t low = vdupq_n_u8(0x0f), sel = vld1q_u8(kSel), pick = vld1q_u8(kPick);
  const uint8x16_t table =
      Lut ? veorq_u8(vld1q_u8(w.lut), vdupq_n_u8(0x80)) : vdupq_n_u8(0);  // lut - 128
  float32x4_t acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = vdupq_n_f32(0.f);
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* p = w.q + (t * kb + b) * rec;
    float32x4_t D[2][4], M[2][4];
    kb_scales_v(w, t, b, D, M);
    if constexpr (centred)
      for (int h = 0; h < 2; ++h)
        for (int v = 0; v < 4; ++v) M[h][v] = vfmaq_n_f32(M[h][v], D[h][v], 128.f);
    int32x4_t s1[MR][4], s2[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 4; ++v) s1[r][v] = s2[r][v] = vdupq_n_s32(0);
    // the two halves of 16 columns (sub-blocks 0, 1 and 2, 3): kSuper16's D and M change
    // between them, so its sums are finished (and restarted) per half; the others' once per
    // block
    for (int half = 0; half < 2; ++half) {
      for (int s = 2 * half; s < 2 * half + 2; ++s) {
        uint8x16_t plane[planes > 0 ? planes : 1];
        for (int q = 0; q < planes; ++q) plane[q] = vld1q_u8(p + 256 + 64 * q + 16 * s);
        int8x16_t xl1[MR], xh1[MR], xl2[MR], xh2[MR];
        for (int r = 0; r < MR; ++r) {
          const int64_t o = (i0 + r) * a.k + b * kBlock + 8 * s;
          xl1[r] = splat4(a.q1 + o);
          xh1[r] = splat4(a.q1 + o + 4);
          if constexpr (L == 2) {
            xl2[r] = splat4(a.q2 + o);
            xh2[r] = splat4(a.q2 + o + 4);
          }
        }
        for (int v = 0; v < 4; ++v) {
          int8x16_t lo, hi;  // columns 8s .. 8s+3 and 8s+4 .. 8s+7 of rows 4v .. 4v+3
          if constexpr (Bits == 8) {
            const uint8x16_t flip = vdupq_n_u8(0x80);
            lo = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + 128 * s + 16 * v), flip));
            hi = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + 128 * s + 64 + 16 * v), flip));
          } else {
            const uint8x16_t bytes = vld1q_u8(p + 64 * s + 16 * v);
            uint8x16_t ul = vandq_u8(bytes, low), uh = vshrq_n_u8(bytes, 4);
            if constexpr (Lut) {
              ul = vqtbl1q_u8(table, ul);
              uh = vqtbl1q_u8(table, uh);
            }
            // plane bytes: word 2s (h 0) is bytes 0..7 of plane[q], word 2s + 1 bytes 8..15;
            // rows 4v .. 4v+3 are the word's bytes 2v, 2v + 1
            const uint8x16_t il = vaddq_u8(pick, vdupq_n_u8(uint8_t(2 * v)));
            const uint8x16_t ih = vaddq_u8(pick, vdupq_n_u8(uint8_t(8 + 2 * v)));
            for (int q = 0; q < planes; ++q) {
              const uint8x16_t bit = vdupq_n_u8(uint8_t(16 << q));
              ul = vorrq_u8(ul, vandq_u8(vtstq_u8(vqtbl1q_u8(plane[q], il), sel), bit));
              uh = vorrq_u8(uh, vandq_u8(vtstq_u8(vqtbl1q_u8(plane[q], ih), sel), bit));
            }
            lo = vreinterpretq_s8_u8(ul);
            hi = vreinterpretq_s8_u8(uh);
          }
          for (int r = 0; r < MR; ++r) {
            s1[r][v] = vdotq_s32(vdotq_s32(s1[r][v], lo, xl1[r]), hi, xh1[r]);
            if constexpr (L == 2)
              s2[r][v] = vdotq_s32(vdotq_s32(s2[r][v], lo, xl2[r]), hi, xh2[r]);
          }
        }
      }
      if (!halves && half == 0) continue;
      for (int r = 0; r < MR; ++r) {
        const int64_t i = i0 + r;
        const float sx = a.scale[i * kb + b];
        const float xs = halves ? a.hsum[i * kh + 2 * b + half] : a.sum[i * kb + b];
        for (int v = 0; v < 4; ++v) {
          int32x4_t n = vshlq_n_s32(s1[r][v], 7);
          if constexpr (L == 2) n = vaddq_s32(n, s2[r][v]);
          acc[r][v] = vfmaq_f32(acc[r][v], vmulq_n_f32(D[half][v], sx), vcvtq_f32_s32(n));
          acc[r][v] = vfmaq_n_f32(acc[r][v], M[half][v], xs);
          s1[r][v] = s2[r][v] = vdupq_n_s32(0);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) vst1q_f32(y + (i0 + r) * ldy + t * kTile + 4 * v, acc[r][v]);
}

template <int L, int Bits, bool Lut>
void kb_rows(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
             int64_t ldy) {
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t i = 0; i < a.m; i += 2) {
      if (a.m - i >= 2) {
        kb_tile<2, L, Bits, Lut>(a, i, w, t, y, ldy);
      } else {
        kb_tile<1, L, Bits, Lut>(a, i, w, t, y, ldy);
      }
    }
}

template <int Bits, bool Lut>
void kb_levels(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  if (a.levels == 1) {
    kb_rows<1, Bits, Lut>(a, w, n0, n1, y, ldy);
  } else {
    kb_rows<2, Bits, Lut>(a, w, n0, n1, y, ldy);
  }
}

void gemm_kb(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
             int64_t ldy) {
  if (w.lut && w.bits != 4) return gemm_kb_generic(a, w, n0, n1, y, ldy);  // no such type
  switch (w.bits) {
    case 4:
      return w.lut ? kb_levels<4, true>(a, w, n0, n1, y, ldy)
                   : kb_levels<4, false>(a, w, n0, n1, y, ldy);
    case 5:
      return kb_levels<5, false>(a, w, n0, n1, y, ldy);
    case 6:
      return kb_levels<6, false>(a, w, n0, n1, y, ldy);
    case 8:
      return kb_levels<8, false>(a, w, n0, n1, y, ldy);
    default:
      return gemm_kb_generic(a, w, n0, n1, y, ldy);
  }
}

}  // namespace

const Kernels& neon_kernels() {
  const Kernels& portable = scalar_kernels();
  static const Kernels k{"neon", portable.quantize, gemm_q4, gemm_q8, portable.dequant_q4, gemm_kb,
                         attend, attend_q, portable.exp};
  return k;
}

}  // namespace kvf
