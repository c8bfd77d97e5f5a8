// The portable path: plain C++ that compiles on any architecture (aarch64 included) and is
// the reference the SIMD paths are tested against. It is the fallback: every CPU runs it,
// whatever cpu.cpp finds (the only path on a CPU without AVX2, or an ARM one without the
// dot-product extension). Written so that the compiler can vectorise the inner loops on its
// own.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels.h"

namespace kvf {
namespace {

void quantize(const float* x, Acts& a, int8_t* q1, int8_t* q2, float* scale, float* sum) {
  const int64_t nb = a.k / a.block;
  for (int64_t i = 0; i < a.m; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t o = i * a.k + b * a.block;
      float amax = 0.f, s = 0.f;
      for (int64_t j = 0; j < a.block; ++j) {
        amax = std::max(amax, std::fabs(x[o + j]));
        s += x[o + j];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t j = 0; j < a.block; ++j)
        quantize_one(x[o + j] * inv, q1 + o + j, q2 + o + j);
      scale[i * nb + b] = amax / 127.f / 128.f;
      sum[i * nb + b] = s;
    }
  a.point_at(q1, q2, scale, sum);
}

void gemm_q4(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t n0, int64_t n1,
             float* y, int64_t ldy) {
  const int64_t kb = a.k / kBlock;
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t i = 0; i < a.m; ++i) {
      float acc[kTile] = {};
      for (int64_t b = 0; b < kb; ++b) {
        const uint8_t* p = q + (t * kb + b) * kTileBytes;
        const uint16_t* d = dm + (t * kb + b) * 2 * kTile;
        const int8_t* x1 = a.q1 + i * a.k + b * kBlock;
        const int8_t* x2 = a.q2 + i * a.k + b * kBlock;
        int32_t s1[kTile] = {}, s2[kTile] = {};
        for (int s = 0; s < 4; ++s)
          for (int r = 0; r < kTile; ++r)
            for (int j = 0; j < 4; ++j) {
              const int byte = p[s * 64 + r * 4 + j];
              const int lo = byte & 15, hi = byte >> 4;
              s1[r] += lo * x1[8 * s + j] + hi * x1[8 * s + 4 + j];
              s2[r] += lo * x2[8 * s + j] + hi * x2[8 * s + 4 + j];
            }
        const float sx = a.scale[i * kb + b], xs = a.sum[i * kb + b];
        for (int r = 0; r < kTile; ++r)
          acc[r] += f16_to_f32(d[r]) * sx * float(s1[r] * 128 + s2[r]) +
                    f16_to_f32(d[kTile + r]) * xs;
      }
      for (int r = 0; r < kTile; ++r) y[i * ldy + t * kTile + r] = acc[r];
    }
}

void gemm_q8(const Acts& a, const int8_t* q, const float* scale, const int32_t*, int64_t n0,
             int64_t n1, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * a.k;
    for (int64_t i = 0; i < a.m; ++i) {
      const int8_t* x1 = a.q1 + i * a.k;
      const int8_t* x2 = a.q2 + i * a.k;
      int32_t s1 = 0, s2 = 0;
      for (int64_t j = 0; j < a.k; ++j) {
        s1 += int32_t(w[j]) * x1[j];
        s2 += int32_t(w[j]) * x2[j];
      }
      y[i * ldy + n] = float(int64_t(s1) * 128 + s2) * a.scale[i] * scale[n];
    }
  }
}

void dequant_q4(const uint8_t* q, const uint16_t* dm, int64_t k, int64_t n0, int64_t n1,
                float* out_f32, uint16_t* out_bf16, int64_t ldo) {
  const int64_t kb = k / kBlock;
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* p = q + (t * kb + b) * kTileBytes;
      const uint16_t* d = dm + (t * kb + b) * 2 * kTile;
      for (int r = 0; r < kTile; ++r) {
        const float dr = f16_to_f32(d[r]), mr = f16_to_f32(d[kTile + r]);
        const int64_t row = t * kTile + r - n0;
        for (int s = 0; s < 4; ++s)
          for (int j = 0; j < 4; ++j) {
            const int byte = p[s * 64 + r * 4 + j];
            const int64_t c = row * ldo + b * kBlock + 8 * s + j;
            const float lo = dr * float(byte & 15) + mr, hi = dr * float(byte >> 4) + mr;
            if (out_f32) {
              out_f32[c] = lo;
              out_f32[c + 4] = hi;
            } else {
              out_bf16[c] = f32_to_bf16(lo);
              out_bf16[c + 4] = f32_to_bf16(hi);
            }
          }
      }
    }
}

// kb weights (kernels.h): per block, each row's integer dot products with x's two levels
// over each half of 16 columns, then D, M of the block (M against x's sums: per block, or
// per half for kSuper16).
void gemm_kb(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
             int64_t ldy) {
  const int64_t kb = a.k / kBlock, rec = kb_record(w.bits);
  const bool halves = w.scales == kSuper16;
  for (int64_t t = n0 / kTile; t < n1 / kTile; ++t)
    for (int64_t i = 0; i < a.m; ++i) {
      float acc[kTile] = {};
      for (int64_t b = 0; b < kb; ++b) {
        const uint8_t* p = w.q + (t * kb + b) * rec;
        const int8_t* x1 = a.q1 + i * a.k + b * kBlock;
        const int8_t* x2 = a.q2 + i * a.k + b * kBlock;
        float D[2][16], M[2][16];
        kb_scales(w, t, b, D, M);
        const float sx = a.scale[i * kb + b];
        for (int r = 0; r < kTile; ++r) {
          int32_t s1[2] = {0, 0}, s2[2] = {0, 0};
          for (int c = 0; c < 32; ++c) {
            const int u = kb_u(w, p, r, c);
            s1[c / 16] += u * x1[c];
            s2[c / 16] += u * x2[c];
          }
          if (halves) {
            for (int h = 0; h < 2; ++h)
              acc[r] += D[h][r] * sx * float(s1[h] * 128 + s2[h]) +
                        M[h][r] * a.hsum[i * (a.k / 16) + 2 * b + h];
          } else {
            acc[r] += D[0][r] * sx * float((s1[0] + s1[1]) * 128 + s2[0] + s2[1]) +
                      M[0][r] * a.sum[i * kb + b];
          }
        }
      }
      for (int r = 0; r < kTile; ++r) y[i * ldy + t * kTile + r] = acc[r];
    }
}

void vexp(float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

template <typename T>
inline float at(const T* p, int64_t i) {
  if constexpr (sizeof(T) == 2) {
    return bf16_to_f32(p[i]);
  } else {
    return p[i];
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
      float dot = 0.f;
      for (int64_t i = 0; i < hd; ++i) dot += qg[i] * at(K, row * hd + i);
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
      for (int64_t i = 0; i < hd; ++i) og[i] += w * at(V, row * hd + i);
    });
  }
}

void attend(const AttendArgs& a) {
  if (a.bf16) {
    attend_t<uint16_t>(a);
  } else {
    attend_t<float>(a);
  }
}

// Row s of quantized K or V rows as numbers (the layouts: kernels.h).
void dequant_row(const AttendArgs& a, const void* rows, const uint16_t* scales, int64_t s,
                 float* out) {
  const int64_t hd = a.hd;
  if (a.bits == 8) {
    const int8_t* q = static_cast<const int8_t*>(rows) + s * hd;
    const float sc = bf16_to_f32(scales[s]);
    for (int64_t i = 0; i < hd; ++i) out[i] = sc * float(q[i]);
    return;
  }
  const uint8_t* q = static_cast<const uint8_t*>(rows) + s * hd / 2;
  const uint16_t* dm = scales + s * (hd / 16);
  for (int64_t g = 0; g < hd / 32; ++g) {
    const float d = bf16_to_f32(dm[2 * g]), m = bf16_to_f32(dm[2 * g + 1]);
    for (int64_t i = 0; i < 16; ++i) {
      const int byte = q[g * 16 + i];
      out[g * 32 + i] = d * float(byte & 15) + m;
      out[g * 32 + 16 + i] = d * float(byte >> 4) + m;
    }
  }
}

// attend over quantized rows: each K and V row is dequantized once, for the whole group.
void attend_q(const AttendArgs& a) {
  const int64_t len = a.s1 - a.s0, hd = a.hd;
  std::vector<float> row(hd);
  std::fill(a.max, a.max + a.group, -INFINITY);
  each_slot(a, [&](int64_t s, int64_t r) {
    if (a.allowed && s != a.own && !a.allowed[s * a.allowed_stride]) {
      for (int64_t g = 0; g < a.group; ++g) a.scores[g * len + s - a.s0] = -INFINITY;
      return;
    }
    dequant_row(a, a.k, a.k_scale, r, row.data());
    for (int64_t g = 0; g < a.group; ++g) {
      float dot = 0.f;
      for (int64_t i = 0; i < hd; ++i) dot += a.q[g * hd + i] * row[i];
      a.scores[g * len + s - a.s0] = dot;
      a.max[g] = std::max(a.max[g], dot);
    }
  });
  for (int64_t g = 0; g < a.group; ++g) {
    float* sc = a.scores + g * len;
    std::fill(a.out + g * hd, a.out + (g + 1) * hd, 0.f);
    a.sum[g] = 0.f;
    if (a.max[g] == -INFINITY) continue;  // every slot of this part is masked
    for (int64_t s = 0; s < len; ++s) {
      sc[s] = std::exp(sc[s] - a.max[g]);
      a.sum[g] += sc[s];
    }
  }
  each_slot(a, [&](int64_t s, int64_t r) {
    bool any = false;
    for (int64_t g = 0; g < a.group; ++g) any = any || a.scores[g * len + s - a.s0] != 0.f;
    if (!any) return;
    dequant_row(a, a.v, a.v_scale, r, row.data());
    for (int64_t g = 0; g < a.group; ++g) {
      const float w = a.scores[g * len + s - a.s0];
      float* og = a.out + g * hd;
      for (int64_t i = 0; i < hd; ++i) og[i] += w * row[i];
    }
  });
}

}  // namespace

void dequant_kb(const KbWeights& w, int64_t n0, int64_t n1, float* out_f32, uint16_t* out_bf16,
                int64_t ldo) {
  const int64_t kb = w.k / kBlock, rec = kb_record(w.bits);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t t = n / kTile;
    const int r = int(n % kTile);
    for (int64_t b = 0; b < kb; ++b) {
      const uint8_t* p = w.q + (t * kb + b) * rec;
      float D[2][16], M[2][16];
      kb_scales(w, t, b, D, M);
      for (int c = 0; c < 32; ++c) {
        const float v = D[c / 16][r] * float(kb_u(w, p, r, c)) + M[c / 16][r];
        const int64_t o = (n - n0) * ldo + b * kBlock + c;
        if (out_f32) {
          out_f32[o] = v;
        } else {
          out_bf16[o] = f32_to_bf16(v);
        }
      }
    }
  }
}

// Shared with the SIMD paths for shapes they do not specialise.
void attend_generic(const AttendArgs& a) { attend(a); }
void attend_q_generic(const AttendArgs& a) { attend_q(a); }
void gemm_kb_generic(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  gemm_kb(a, w, n0, n1, y, ldy);
}

const Kernels& scalar_kernels() {
  static const Kernels k{"scalar", quantize, gemm_q4, gemm_q8, dequant_q4, gemm_kb, attend,
                         attend_q, vexp};
  return k;
}

}  // namespace kvf
