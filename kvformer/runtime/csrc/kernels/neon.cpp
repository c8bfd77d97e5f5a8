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

}  // namespace

const Kernels& neon_kernels() {
  const Kernels& portable = scalar_kernels();
  static const Kernels k{"neon", portable.quantize, gemm_q4, gemm_q8, portable.dequant_q4, gemm_kb_generic,
                         attend, attend_q, portable.exp};
  return k;
}

}  // namespace kvf
