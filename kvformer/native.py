"""The decode step as one C++ operator, for when the Python step is overhead-bound.

At batch 1 a quantized decode step is ~120 small matmuls plus ~20 tiny tensor ops per
layer; in eager PyTorch each op costs a few microseconds of Python and dispatch, which adds
up to more than the matmuls themselves. This module compiles (once per machine, with the
system's C++ compiler through ``torch.utils.cpp_extension.load_inline``; cached under
``~/.cache/kvformer/native``) an operator that runs the whole step in C++:

* the int4/int8 matmuls use kernels written here for AVX-512 VNNI, reading torch's own
  packed layouts (so the same tensors serve ``Transformer.forward``): ``vpermt2b``
  gathers four columns of the int4 block layout per 32-bit lane and ``vpdpbusd`` sums the
  products in int32. Activations enter as two int8 levels, x ~= s * (q1 + q2 / 128), which
  keeps them more precise than bf16. Without VNNI there are fp32 AVX-512 kernels, and
  without AVX-512 (or for dense weights) torch's own kernels are called;
* norms, rotary positions, writing the new K/V into the ``KVCache``, attention of the new
  token over the filled slots, SiLU/GELU and the residual adds are plain fp32 loops.

Nothing here is required: without a compiler (or with ``KVFORMER_NATIVE=0``) the build
fails quietly, ``available()`` is False and the Python ``kvformer.fast.DecodeStep`` is used.
Checked against ``Transformer.forward`` in ``tests/test_fast.py``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from .cache import KVCache
from .norms import LayerNorm, RMSNorm
from .quantize import Int4Linear, Int8Embedding, Int8Linear

NAME = "kvformer_native"

SOURCE = r"""
// kvformer's decode step in C++ (see kvformer/native.py). All activations are fp32 here;
// the matmuls use our AVX-512 kernels for int8/int4 weights when the CPU has them, and
// torch's kernels otherwise (and for dense weights).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KV_AVX512 1
#else
#define KV_AVX512 0
#endif
#if KV_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define KV_VNNI 1
#else
#define KV_VNNI 0
#endif

namespace {

using at::Tensor;

inline float bf2f(uint16_t u) {
  uint32_t x = uint32_t(u) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline uint16_t f2bf(float f) {  // round to nearest even, as torch does
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

#if KV_AVX512
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline __m512 load_bf16x16(const uint16_t* p) {
  __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16));
}
#endif

// v[i] = exp(v[i]) in place (exp(-inf) = 0): a degree-6 polynomial on [-ln2/2, ln2/2]
// scaled by 2^n, ~1e-7 relative error; the scalar std::exp made up a tenth of a step.
void vexp(float* v, int64_t n) {
  int64_t i = 0;
#if KV_AVX512
  const __m512 log2e = _mm512_set1_ps(1.44269504f), ln2_hi = _mm512_set1_ps(0.693359375f),
               ln2_lo = _mm512_set1_ps(-2.12194440e-4f), lo = _mm512_set1_ps(-87.0f),
               hi = _mm512_set1_ps(88.0f), one = _mm512_set1_ps(1.0f);
  const float c[6] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
  for (; i + 16 <= n; i += 16) {
    __m512 x = _mm512_loadu_ps(v + i);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, ln2_hi, x);
    r = _mm512_fnmadd_ps(k, ln2_lo, r);
    __m512 p = _mm512_set1_ps(c[0]);
    for (int j = 1; j < 6; ++j) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
    p = _mm512_fmadd_ps(p, r, one);
    _mm512_storeu_ps(v + i, _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, k)));
  }
#endif
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}

// ------------------------------------------------------------------ weight-only matmuls
// y[m, n] = sum_k x[m, k] * w[n, k] for int4 weights in torch's CPU layout: for each block
// of 64 rows and each column k, 32 bytes (low nibble: row i, high nibble: row 32 + i);
// w = (q - 8) * scale + zero with (scale, zero) bf16 pairs at sz[(k / G) * N + n].
// So  y = sum_g scale * (sum_{k in g} x q) + (zero - 8 scale) * (sum_{k in g} x).
#if KV_AVX512
// One block of 64 output rows for MR rows of x; the block's packed weights (K * 32 bytes)
// are unpacked once per group of 32 columns and used for every row of x.
template <int MR>
void int4_block(const float* x, int64_t K, int64_t N, const uint8_t* packed,
                const uint16_t* sz, int64_t G, const float* xg, int64_t nb, float* y) {
  const int64_t ng = K / G;
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
  const __m512 eight = _mm512_set1_ps(8.f);
  __m512 tot[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) tot[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512 acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_setzero_ps();
    const uint8_t* p = packed + (nb * K + g * G) * 32;
    for (int64_t kk = 0; kk < G; ++kk) {
      __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kk * 32));
      __m256i lo = _mm256_and_si256(bytes, low);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      __m512 w[4] = {
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo))),
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1))),
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi))),
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)))};
      const int64_t k = g * G + kk;
      for (int r = 0; r < MR; ++r) {
        const __m512 xb = _mm512_set1_ps(x[r * K + k]);
        for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_fmadd_ps(w[i], xb, acc[r][i]);
      }
    }
    const uint16_t* s = sz + (g * N + nb * 64) * 2;
    for (int i = 0; i < 4; ++i) {
      const __m512i pair = _mm512_loadu_si512(s + i * 32);  // 16 (scale, zero) bf16 pairs
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 zc = _mm512_fnmadd_ps(
          sc, eight, _mm512_castsi512_ps(_mm512_and_si512(pair, hi_mask)));  // zero - 8 scale
      for (int r = 0; r < MR; ++r) {
        tot[r][i] = _mm512_fmadd_ps(sc, acc[r][i], tot[r][i]);
        tot[r][i] = _mm512_fmadd_ps(zc, _mm512_set1_ps(xg[r * ng + g]), tot[r][i]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(y + r * N + nb * 64 + i * 16, tot[r][i]);
}
#endif

// y[m, n] = sum_k x[m, k] * w[n, k] for int4 weights in torch's CPU layout: for each block
// of 64 rows and each column k, 32 bytes (low nibble: row i, high nibble: row 32 + i);
// w = (q - 8) * scale + zero with (scale, zero) bf16 pairs at sz[(k / G) * N + n].
// So  y = sum_g scale * (sum_{k in g} x q) + (zero - 8 scale) * (sum_{k in g} x).
void gemm_int4(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* packed,
               const uint16_t* sz, int64_t G, float* y) {
#if KV_AVX512
  const int64_t ng = K / G;
  std::vector<float> xg(M * ng);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < G; ++k) s += x[m * K + g * G + k];
      xg[m * ng + g] = s;
    }
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const float* xm = x + m0 * K;
        const float* gm = xg.data() + m0 * ng;
        float* ym = y + m0 * N;
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: int4_block<1>(xm, K, N, packed, sz, G, gm, nb, ym); break;
          case 2: int4_block<2>(xm, K, N, packed, sz, G, gm, nb, ym); break;
          case 3: int4_block<3>(xm, K, N, packed, sz, G, gm, nb, ym); break;
          default: int4_block<4>(xm, K, N, packed, sz, G, gm, nb, ym); break;
        }
      }
  });
#endif
}

#if KV_AVX512
inline __m512 int8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))));
}
#endif

void gemm_int8(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* q,
               const uint16_t* scale, float* y) {
#if KV_AVX512
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {  // four rows at a time share the loads of x
      const int8_t* r = q + n * K;
      for (int64_t m = 0; m < M; ++m) {  // the rows stay in L1 for every row of x
        const float* xm = x + m * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 16) {
          __m512 xv = _mm512_loadu_ps(xm + k);
          a0 = _mm512_fmadd_ps(int8x16(r + k), xv, a0);
          a1 = _mm512_fmadd_ps(int8x16(r + K + k), xv, a1);
          a2 = _mm512_fmadd_ps(int8x16(r + 2 * K + k), xv, a2);
          a3 = _mm512_fmadd_ps(int8x16(r + 3 * K + k), xv, a3);
        }
        y[m * N + n] = hsum(a0) * bf2f(scale[n]);
        y[m * N + n + 1] = hsum(a1) * bf2f(scale[n + 1]);
        y[m * N + n + 2] = hsum(a2) * bf2f(scale[n + 2]);
        y[m * N + n + 3] = hsum(a3) * bf2f(scale[n + 3]);
      }
    }
    for (; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) {
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16)
          a0 = _mm512_fmadd_ps(int8x16(q + n * K + k), _mm512_loadu_ps(x + m * K + k), a0);
        y[m * N + n] = hsum(a0) * bf2f(scale[n]);
      }
    }
  });
#endif
}

// ------------------------------------------------------------------ int8-activation kernels
// With VNNI the products are summed in int32 by vpdpbusd, 64 per instruction, instead of
// unpacking every weight to fp32. x is written as two int8 numbers per element,
// x ~= s * (q1 + q2 / 128) with s = max|x| / 127 per group (int4) or per row (int8): a
// single int8 x (as in llama.cpp) cost SmolLM2 2-4% perplexity; the second level brings the
// error of x to ~3e-5 of its range, below bf16's rounding, for a second vpdpbusd.
#if KV_VNNI
inline void quantize2(const float* x, int64_t n, float* scale, int8_t* q1, int8_t* q2) {
  float amax = 0.f;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * inv;
    const float r1 = std::nearbyint(v);
    q1[k] = int8_t(r1);
    q2[k] = int8_t(std::nearbyint((v - r1) * 128.f));
  }
  *scale = amax / 127.f;
}

template <int MR>
void int4_block_vnni(const int8_t* q1, const int8_t* q2, const float* sx, const float* xs,
                     int64_t K, int64_t N, const uint8_t* packed, const uint16_t* sz,
                     int64_t G, int64_t nb, const __m512i idx0, const __m512i idx1,
                     float* y) {
  const int64_t ng = K / G;
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i hi_mask = _mm512_set1_epi32(int32_t(0xffff0000u));
  const __m512 eight = _mm512_set1_ps(8.f);
  __m512 tot[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) tot[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i a1[MR][4], a2[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < 4; ++i) a1[r][i] = a2[r][i] = _mm512_setzero_si512();
    const uint8_t* p = packed + (nb * K + g * G) * 32;
    for (int64_t kk = 0; kk < G; kk += 4) {
      const __m512i a = _mm512_loadu_si512(p + kk * 32);
      const __m512i b = _mm512_loadu_si512(p + kk * 32 + 64);
      const __m512i r0 = _mm512_permutex2var_epi8(a, idx0, b);  // rows 0-15 | 32-47
      const __m512i r1 = _mm512_permutex2var_epi8(a, idx1, b);  // rows 16-31 | 48-63
      const __m512i w[4] = {_mm512_and_si512(r0, low), _mm512_and_si512(r1, low),
                            _mm512_and_si512(_mm512_srli_epi16(r0, 4), low),
                            _mm512_and_si512(_mm512_srli_epi16(r1, 4), low)};
      for (int r = 0; r < MR; ++r) {
        int32_t f1, f2;
        std::memcpy(&f1, q1 + r * K + g * G + kk, 4);
        std::memcpy(&f2, q2 + r * K + g * G + kk, 4);
        const __m512i x1 = _mm512_set1_epi32(f1), x2 = _mm512_set1_epi32(f2);
        for (int i = 0; i < 4; ++i) {
          a1[r][i] = _mm512_dpbusd_epi32(a1[r][i], w[i], x1);
          a2[r][i] = _mm512_dpbusd_epi32(a2[r][i], w[i], x2);
        }
      }
    }
    const uint16_t* s = sz + (g * N + nb * 64) * 2;
    for (int i = 0; i < 4; ++i) {
      const __m512i pair = _mm512_loadu_si512(s + i * 32);  // 16 (scale, zero) bf16 pairs
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 zc = _mm512_fnmadd_ps(
          sc, eight, _mm512_castsi512_ps(_mm512_and_si512(pair, hi_mask)));  // zero - 8 scale
      for (int r = 0; r < MR; ++r) {
        const __m512 q = _mm512_cvtepi32_ps(
            _mm512_add_epi32(_mm512_slli_epi32(a1[r][i], 7), a2[r][i]));
        tot[r][i] = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(sx[r * ng + g])), q,
                                    tot[r][i]);
        tot[r][i] = _mm512_fmadd_ps(zc, _mm512_set1_ps(xs[r * ng + g]), tot[r][i]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(y + r * N + nb * 64 + i * 16, tot[r][i]);
}

void gemm_int4_vnni(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* packed,
                    const uint16_t* sz, int64_t G, float* y) {
  const int64_t ng = K / G;
  std::vector<int8_t> q1(M * K), q2(M * K);
  std::vector<float> sx(M * ng), xs(M * ng);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t o = m * K + g * G;
      quantize2(x + o, G, &sx[m * ng + g], q1.data() + o, q2.data() + o);
      sx[m * ng + g] /= 128.f;  // the sums below are 128 * q1 + q2
      float sum = 0.f;
      for (int64_t k = 0; k < G; ++k) sum += x[o + k];
      xs[m * ng + g] = sum;
    }
  // Four consecutive columns k..k+3 of a block are 128 contiguous bytes (32 per column);
  // vpermt2b gathers them so that each 32-bit lane holds one row's four bytes.
  alignas(64) uint8_t i0[64], i1[64];
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 4; ++c) {
      i0[r * 4 + c] = uint8_t(c * 32 + r);
      i1[r * 4 + c] = uint8_t(c * 32 + 16 + r);
    }
  const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const int64_t o = m0 * K;
        float* ym = y + m0 * N;
        if (M - m0 >= 2) {
          int4_block_vnni<2>(q1.data() + o, q2.data() + o, sx.data() + m0 * ng,
                             xs.data() + m0 * ng, K, N, packed, sz, G, nb, idx0, idx1, ym);
        } else {
          int4_block_vnni<1>(q1.data() + o, q2.data() + o, sx.data() + m0 * ng,
                             xs.data() + m0 * ng, K, N, packed, sz, G, nb, idx0, idx1, ym);
        }
      }
  });
}

// int8 rows [N, K] (K a multiple of 64), x per row. vpdpbusd wants the unsigned operand
// first, so x's two levels are shifted by +128 and 128 * sum_k q[n, k] is taken off each.
void gemm_int8_vnni(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* q,
                    const uint16_t* scale, const int32_t* rowsum, float* y) {
  std::vector<uint8_t> u1(M * K), u2(M * K);
  std::vector<int8_t> t1(K), t2(K);
  std::vector<float> sx(M);
  for (int64_t m = 0; m < M; ++m) {
    quantize2(x + m * K, K, &sx[m], t1.data(), t2.data());
    sx[m] /= 128.f;
    for (int64_t k = 0; k < K; ++k) {
      u1[m * K + k] = uint8_t(t1[k] + 128);
      u2[m * K + k] = uint8_t(t2[k] + 128);
    }
  }
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    // One row at a time with its two accumulators combined before the one reduction:
    // measured at the memory's streaming speed (interleaving rows was half as fast).
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = q + n * K;
      const int32_t off = 128 * rowsum[n];
      const float sw = bf2f(scale[n]);
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* x1 = u1.data() + m * K;
        const uint8_t* x2 = u2.data() + m * K;
        __m512i a = _mm512_setzero_si512(), b = a;
        for (int64_t k = 0; k < K; k += 64) {
          const __m512i w = _mm512_loadu_si512(row + k);
          a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(x1 + k), w);
          b = _mm512_dpbusd_epi32(b, _mm512_loadu_si512(x2 + k), w);
        }
        // sum_k (q1 + 128) w = sum q1 w + 128 rowsum, the same for q2
        const int64_t t = 128 * (int64_t(_mm512_reduce_add_epi32(a)) - off) +
                          (int64_t(_mm512_reduce_add_epi32(b)) - off);
        y[m * N + n] = float(t) * sx[m] * sw;
      }
    }
  });
}
#endif

struct Cursor {
  const std::vector<Tensor>& ts;
  const std::vector<int64_t>& is;
  const std::vector<double>& fs;
  size_t t = 0, i = 0, f = 0;
  Tensor tensor() { return ts.at(t++); }
  int64_t integer() { return is.at(i++); }
  double real() { return fs.at(f++); }
};

struct Lin {
  int64_t kind = 0;  // 0: dense (torch), 1: int8 rows + scales, 2: int4 packed
  int64_t group = 0, n = 0, k = 0;
  bool own = false;   // our kernel (else torch's)
  bool vnni = false;  // our int8-activation kernel
  Tensor a, b, bias;
  std::vector<float> biasf;
  std::vector<int32_t> rowsum;

  void read(Cursor& c, at::ScalarType act, bool int8_act = false) {
    kind = c.integer();
    group = c.integer();
    const bool has_bias = c.integer() != 0;
    a = c.tensor().contiguous();
    b = c.tensor().contiguous();
    n = a.size(0);
    k = kind == 2 ? a.size(1) * 2 : a.size(1);
    if (has_bias) {
      bias = c.tensor().to(act);
      Tensor bf = bias.to(at::kFloat).contiguous();
      biasf.assign(bf.data_ptr<float>(), bf.data_ptr<float>() + bf.numel());
    }
    own = KV_AVX512 && ((kind == 2 && n % 64 == 0 && k % group == 0) ||
                        (kind == 1 && k % 16 == 0));
    vnni = KV_VNNI && int8_act && own && (kind == 2 ? group % 4 == 0 : k % 64 == 0);
    if (vnni && kind == 1) {
      rowsum.resize(n);
      const int8_t* q = a.data_ptr<int8_t>();
      for (int64_t r = 0; r < n; ++r) {
        int32_t t = 0;
        for (int64_t j = 0; j < k; ++j) t += q[r * k + j];
        rowsum[r] = t;
      }
    }
  }

  // y [M, n] = x [M, k] W^T (+ bias), both fp32
  void run(const float* x, int64_t M, float* y, at::ScalarType act) const {
#if KV_VNNI
    if (vnni && kind == 2) {
      gemm_int4_vnni(x, M, k, n, a.data_ptr<uint8_t>(),
                     reinterpret_cast<const uint16_t*>(b.data_ptr()), group, y);
    } else if (vnni && kind == 1) {
      gemm_int8_vnni(x, M, k, n, a.data_ptr<int8_t>(),
                     reinterpret_cast<const uint16_t*>(b.data_ptr()), rowsum.data(), y);
    } else
#endif
    if (own && kind == 2) {
      gemm_int4(x, M, k, n, a.data_ptr<uint8_t>(),
                reinterpret_cast<const uint16_t*>(b.data_ptr()), group, y);
    } else if (own && kind == 1) {
      gemm_int8(x, M, k, n, a.data_ptr<int8_t>(),
                reinterpret_cast<const uint16_t*>(b.data_ptr()), y);
    } else {
      Tensor xt = at::from_blob(const_cast<float*>(x), {M, k}, at::kFloat).to(act);
      Tensor yt;
      if (kind == 0) {
        yt = bias.defined() ? at::linear(xt, a, bias) : at::linear(xt, a);
      } else {
        yt = kind == 1 ? at::_weight_int8pack_mm(xt, a, b)
                       : at::_weight_int4pack_mm_for_cpu(xt, a, group, b);
        if (bias.defined()) yt.add_(bias);
      }
      yt = yt.to(at::kFloat).contiguous();
      std::memcpy(y, yt.data_ptr<float>(), M * n * sizeof(float));
      return;
    }
    if (!biasf.empty())
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < n; ++i) y[m * n + i] += biasf[i];
  }
};

struct Norm {
  bool rms = true, has_bias = false;
  float eps = 1e-5f;
  std::vector<float> w, b;

  void read(Cursor& c) {
    rms = c.integer() != 0;
    has_bias = c.integer() != 0;
    eps = float(c.real());
    Tensor tw = c.tensor().to(at::kFloat).contiguous();
    w.assign(tw.data_ptr<float>(), tw.data_ptr<float>() + tw.numel());
    if (has_bias) {
      Tensor tb = c.tensor().to(at::kFloat).contiguous();
      b.assign(tb.data_ptr<float>(), tb.data_ptr<float>() + tb.numel());
    }
  }

  // rows of x [M, n] -> out [M, n]
  void apply(const float* x, int64_t M, int64_t n, float* out) const {
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * n;
      float* om = out + m * n;
      if (rms) {
        double sq = 0.0;
        for (int64_t i = 0; i < n; ++i) sq += double(xm[i]) * xm[i];
        const float inv = 1.0f / std::sqrt(float(sq / n) + eps);
        for (int64_t i = 0; i < n; ++i) om[i] = xm[i] * inv * w[i];
      } else {
        double mean = 0.0, var = 0.0;
        for (int64_t i = 0; i < n; ++i) mean += xm[i];
        mean /= n;
        for (int64_t i = 0; i < n; ++i) var += (xm[i] - mean) * (xm[i] - mean);
        const float inv = 1.0f / std::sqrt(float(var / n) + eps), mu = float(mean);
        for (int64_t i = 0; i < n; ++i)
          om[i] = (xm[i] - mu) * inv * w[i] + (has_bias ? b[i] : 0.f);
      }
    }
  }
};

struct Layer {
  Norm n1, n2;
  bool fused_qkv = false, fused_gu = false;
  Lin qkv, q, k, v, o, gu, gate, up, down;
};

struct Plan {
  int64_t n_layer, d, hd, nq, nkv, dff, vocab;
  bool rope = false, swiglu = true, int8_act = false;
  at::ScalarType act = at::kFloat;
  int64_t emb_kind = 0;  // 0: dense table, 1: int8 rows + bf16 scales
  Tensor emb_w, emb_q, emb_s, cos, sin;
  std::vector<Layer> layers;
  Norm fnorm;
  Lin head;
  float scale = 1.0f;
};

// Optional timing of the parts of a step (kvformer_native::profile): torch's profiler
// sees the operator as one box.
enum Part { kMatmul, kHead, kAttention, kOther, kParts };
bool timing = false;
double part_ns[kParts] = {0, 0, 0, 0};
int64_t timed_steps = 0;

struct Clock {
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(Part part) {
    if (!timing) return;
    auto now = std::chrono::steady_clock::now();
    part_ns[part] += std::chrono::duration<double, std::nano>(now - t).count();
    t = now;
  }
};

std::vector<double> profile(bool enable) {
  std::vector<double> out(part_ns, part_ns + kParts);
  out.push_back(double(timed_steps));
  timing = enable;
  std::fill(part_ns, part_ns + kParts, 0.0);
  timed_steps = 0;
  return out;
}

std::mutex registry_mu;
std::vector<std::shared_ptr<Plan>> registry;

int64_t plan_new(std::vector<Tensor> ts, std::vector<int64_t> is, std::vector<double> fs) {
  auto p = std::make_shared<Plan>();
  Cursor c{ts, is, fs};
  p->n_layer = c.integer();
  p->d = c.integer();
  p->hd = c.integer();
  p->nq = c.integer();
  p->nkv = c.integer();
  p->dff = c.integer();
  p->act = c.integer() != 0 ? at::kBFloat16 : at::kFloat;
  p->rope = c.integer() != 0;
  p->swiglu = c.integer() != 0;
  p->int8_act = c.integer() != 0;
  p->emb_kind = c.integer();
  p->scale = float(c.real());
  if (p->emb_kind == 0) {
    p->emb_w = c.tensor().contiguous();
  } else {
    p->emb_q = c.tensor().contiguous();
    p->emb_s = c.tensor().to(at::kFloat).contiguous();
  }
  if (p->rope) {
    p->cos = c.tensor().to(at::kFloat).contiguous();
    p->sin = c.tensor().to(at::kFloat).contiguous();
  }
  for (int64_t l = 0; l < p->n_layer; ++l) {
    Layer L;
    L.n1.read(c);
    L.fused_qkv = c.integer() != 0;
    if (L.fused_qkv) {
      L.qkv.read(c, p->act, p->int8_act);
    } else {
      L.q.read(c, p->act, p->int8_act);
      L.k.read(c, p->act, p->int8_act);
      L.v.read(c, p->act, p->int8_act);
    }
    L.o.read(c, p->act, p->int8_act);
    L.n2.read(c);
    L.fused_gu = c.integer() != 0;
    if (L.fused_gu) {
      L.gu.read(c, p->act, p->int8_act);
    } else {
      if (p->swiglu) L.gate.read(c, p->act, p->int8_act);
      L.up.read(c, p->act, p->int8_act);
    }
    L.down.read(c, p->act, p->int8_act);
    p->layers.push_back(std::move(L));
  }
  p->fnorm.read(c);
  p->head.read(c, p->act, p->int8_act);
  p->vocab = p->head.n;
  TORCH_CHECK(c.t == ts.size() && c.i == is.size() && c.f == fs.size(),
              "kvformer_native: the plan description has leftover entries");
  std::lock_guard<std::mutex> g(registry_mu);
  registry.push_back(std::move(p));
  return int64_t(registry.size()) - 1;
}

void plan_free(int64_t handle) {
  std::lock_guard<std::mutex> g(registry_mu);
  if (handle >= 0 && handle < int64_t(registry.size())) registry[handle].reset();
}

// ------------------------------------------------------------------ attention
template <typename CT>
inline float get(const CT* p, int64_t i);
template <>
inline float get<float>(const float* p, int64_t i) { return p[i]; }
template <>
inline float get<uint16_t>(const uint16_t* p, int64_t i) { return bf2f(p[i]); }

template <typename CT>
inline void put(CT* p, int64_t i, float v);
template <>
inline void put<float>(float* p, int64_t i, float v) { p[i] = v; }
template <>
inline void put<uint16_t>(uint16_t* p, int64_t i, float v) { p[i] = f2bf(v); }

// q . k for one cached key row
template <typename CT>
inline float dot(const float* q, const CT* k, int64_t hd) {
#if KV_AVX512
  if (hd % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < hd; i += 16) {
      __m512 kv;
      if constexpr (std::is_same_v<CT, float>) {
        kv = _mm512_loadu_ps(k + i);
      } else {
        kv = load_bf16x16(k + i);
      }
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv, acc);
    }
    return hsum(acc);
  }
#endif
  float acc = 0.f;
  for (int64_t i = 0; i < hd; ++i) acc += q[i] * get(k, i);
  return acc;
}

// out += w * v for one cached value row
template <typename CT>
inline void axpy(float w, const CT* v, float* out, int64_t hd) {
#if KV_AVX512
  if (hd % 16 == 0) {
    __m512 wv = _mm512_set1_ps(w);
    for (int64_t i = 0; i < hd; i += 16) {
      __m512 vv;
      if constexpr (std::is_same_v<CT, float>) {
        vv = _mm512_loadu_ps(v + i);
      } else {
        vv = load_bf16x16(v + i);
      }
      _mm512_storeu_ps(out + i, _mm512_fmadd_ps(wv, vv, _mm512_loadu_ps(out + i)));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < hd; ++i) out[i] += w * get(v, i);
}

#if KV_AVX512
template <typename CT>
inline __m512 load16(const CT* p) {
  if constexpr (std::is_same_v<CT, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return load_bf16x16(p);
  }
}

// head_dim 64 and G query heads per KV head: every K and V row is loaded (and widened from
// bf16) once for the G heads, and the G outputs stay in registers.
template <typename CT, int G>
void attend64(const float* q, const CT* K, const CT* V, int64_t len, const bool* allowed,
              int64_t allowed_stride, float* scores, float* out) {
  __m512 qv[G][4];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 4; ++i) qv[g][i] = _mm512_loadu_ps(q + g * 64 + i * 16);
  float mx[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t s = 0; s < len; ++s) {
    if (allowed && !allowed[s * allowed_stride] && s != len - 1) {
      for (int g = 0; g < G; ++g) scores[g * len + s] = -INFINITY;
      continue;
    }
    __m512 k[4];
    for (int i = 0; i < 4; ++i) k[i] = load16(K + s * 64 + i * 16);
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(qv[g][0], k[0]);
      for (int i = 1; i < 4; ++i) acc = _mm512_fmadd_ps(qv[g][i], k[i], acc);
      const float v = hsum(acc);
      scores[g * len + s] = v;
      mx[g] = std::max(mx[g], v);
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * len;
    for (int64_t s = 0; s < len; ++s) sg[s] -= mx[g];
    vexp(sg, len);
    float sum = 0.f;
    for (int64_t s = 0; s < len; ++s) sum += sg[s];
    inv[g] = 1.0f / sum;
  }
  __m512 o[G][4];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 4; ++i) o[g][i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < len; ++s) {
    __m512 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load16(V + s * 64 + i * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * len + s]);
      for (int i = 0; i < 4; ++i) o[g][i] = _mm512_fmadd_ps(w, v[i], o[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < 4; ++i)
      _mm512_storeu_ps(out + g * 64 + i * 16, _mm512_mul_ps(o[g][i], _mm512_set1_ps(inv[g])));
}
#endif

// softmax(q K^T) V over the first len slots, for the `group` query heads sharing one KV
// head (queries already scaled by 1/sqrt(d_k)). allowed: per-slot bool (stride), or null.
template <typename CT>
void attend(const float* q, int64_t group, const CT* K, const CT* V, int64_t len, int64_t hd,
            const bool* allowed, int64_t allowed_stride, float* out) {
  std::vector<float> scores(group * len);
#if KV_AVX512
  if (hd == 64 && group <= 4) {
    float* sc = scores.data();
    switch (group) {
      case 1: return attend64<CT, 1>(q, K, V, len, allowed, allowed_stride, sc, out);
      case 2: return attend64<CT, 2>(q, K, V, len, allowed, allowed_stride, sc, out);
      case 3: return attend64<CT, 3>(q, K, V, len, allowed, allowed_stride, sc, out);
      default: return attend64<CT, 4>(q, K, V, len, allowed, allowed_stride, sc, out);
    }
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores.data() + g * len;
    float mx = -INFINITY;
    for (int64_t s = 0; s < len; ++s) {
      if (allowed && !allowed[s * allowed_stride] && s != len - 1) {
        sg[s] = -INFINITY;
        continue;
      }
      sg[s] = dot(q + g * hd, K + s * hd, hd);
      mx = std::max(mx, sg[s]);
    }
    float sum = 0.f;
    for (int64_t s = 0; s < len; ++s) sg[s] -= mx;
    vexp(sg, len);
    for (int64_t s = 0; s < len; ++s) sum += sg[s];
    const float inv = 1.0f / sum;
    float* og = out + g * hd;
    std::fill(og, og + hd, 0.f);
    for (int64_t s = 0; s < len; ++s)
      if (sg[s] != 0.f) axpy(sg[s] * inv, V + s * hd, og, hd);
  }
}

// rotate-half rotary positions of one head x [hd] (cos/sin rows of its position), times mul
inline void rotate(const float* x, const float* c, const float* s, int64_t hd, float mul,
                   float* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = (x[i] * c[i] - x[i + half] * s[i]) * mul;
  for (int64_t i = half; i < hd; ++i) out[i] = (x[i] * c[i] + x[i - half] * s[i]) * mul;
}

struct StepArgs {
  int64_t B, slot, pos0, pos_stride, ms0, ms1;
  const int64_t* pos;
  const bool* mask;
};

// RoPE q and k of the new token, write k and v into the cache, attend: qkv rows [B, *]
// (q at qo, k at ko, v at vo, row stride rs) -> out [B, nq * hd]
template <typename CT>
void attention(const Plan& p, const StepArgs& a, const Tensor& kc, const Tensor& vc,
               const float* qkv_q, const float* qkv_k, const float* qkv_v, int64_t sq,
               int64_t sk, int64_t sv, float* out, float* qf) {
  const int64_t hd = p.hd, nq = p.nq, nkv = p.nkv, group = nq / nkv, len = a.slot + 1;
  const int64_t max_len = kc.size(2);
  CT* K = static_cast<CT*>(kc.data_ptr());
  CT* V = static_cast<CT*>(vc.data_ptr());
  std::vector<float> rot(hd);
  for (int64_t b = 0; b < a.B; ++b) {
    const float *c = nullptr, *s = nullptr;
    if (p.rope) {
      const int64_t ps = a.pos ? a.pos[b * a.pos_stride] : a.pos0;
      c = p.cos.data_ptr<float>() + ps * hd;
      s = p.sin.data_ptr<float>() + ps * hd;
    }
    for (int64_t h = 0; h < nq; ++h) {
      const float* x = qkv_q + b * sq + h * hd;
      float* dst = qf + (b * nq + h) * hd;
      if (p.rope) {
        rotate(x, c, s, hd, p.scale, dst);
      } else {
        for (int64_t i = 0; i < hd; ++i) dst[i] = x[i] * p.scale;
      }
    }
    for (int64_t j = 0; j < nkv; ++j) {
      CT* kd = K + ((b * nkv + j) * max_len + a.slot) * hd;
      CT* vd = V + ((b * nkv + j) * max_len + a.slot) * hd;
      const float* kx = qkv_k + b * sk + j * hd;
      const float* vx = qkv_v + b * sv + j * hd;
      if (p.rope) {
        rotate(kx, c, s, hd, 1.0f, rot.data());
        kx = rot.data();
      }
      for (int64_t i = 0; i < hd; ++i) {
        put(kd, i, kx[i]);
        put(vd, i, vx[i]);
      }
    }
  }
  const int64_t tasks = a.B * nkv;
  const int64_t grain = len * group * hd * tasks > (1 << 16) ? 1 : tasks;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nkv, j = t % nkv;
      const CT* Kj = K + (b * nkv + j) * max_len * hd;
      const CT* Vj = V + (b * nkv + j) * max_len * hd;
      attend<CT>(qf + (b * nq + j * group) * hd, group, Kj, Vj, len, hd,
                 a.mask ? a.mask + b * a.ms0 : nullptr, a.ms1,
                 out + (b * nq + j * group) * hd);
    }
  });
}

Tensor plan_step(int64_t handle, Tensor tokens, std::vector<Tensor> kcs,
                 std::vector<Tensor> vcs, int64_t slot, int64_t pos0, Tensor pos,
                 Tensor mask) {
  std::shared_ptr<Plan> pp;
  {
    std::lock_guard<std::mutex> g(registry_mu);
    TORCH_CHECK(handle >= 0 && handle < int64_t(registry.size()) && registry[handle],
                "kvformer_native: no such plan");
    pp = registry[handle];
  }
  const Plan& p = *pp;
  const int64_t B = tokens.size(0), d = p.d, hd = p.hd, nq = p.nq, nkv = p.nkv, f = p.dff;
  TORCH_CHECK(int64_t(kcs.size()) == p.n_layer && int64_t(vcs.size()) == p.n_layer,
              "kvformer_native: the cache has the wrong number of layers");
  const bool cache_bf = kcs[0].scalar_type() == at::kBFloat16;
  StepArgs a{B, slot, pos0, pos.numel() ? pos.stride(0) : 0,
             mask.numel() ? mask.stride(0) : 0, mask.numel() ? mask.stride(1) : 0,
             pos.numel() ? pos.data_ptr<int64_t>() : nullptr,
             mask.numel() ? mask.data_ptr<bool>() : nullptr};

  const int64_t nqkv = (nq + 2 * nkv) * hd;
  std::vector<float> x(B * d), h(B * d), o(B * d), qkv(B * nqkv), qf(B * nq * hd),
      att(B * nq * hd), gu(B * 2 * f), act(B * f), logits(B * p.vocab);

  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = tok[b * tokens.stride(0)];
    float* xb = x.data() + b * d;
    if (p.emb_kind == 0) {
      if (p.emb_w.scalar_type() == at::kBFloat16) {
        const uint16_t* e = reinterpret_cast<const uint16_t*>(p.emb_w.data_ptr()) + t * d;
        for (int64_t i = 0; i < d; ++i) xb[i] = bf2f(e[i]);
      } else {
        std::memcpy(xb, p.emb_w.data_ptr<float>() + t * d, d * sizeof(float));
      }
    } else {
      const int8_t* q = p.emb_q.data_ptr<int8_t>() + t * d;
      const float sc = p.emb_s.data_ptr<float>()[t];
      for (int64_t i = 0; i < d; ++i) xb[i] = float(q[i]) * sc;
    }
  }

  Clock clock;
  for (const Layer& L : p.layers) {
    const int64_t l = &L - p.layers.data();
    L.n1.apply(x.data(), B, d, h.data());
    clock.lap(kOther);
    const float *qs, *ks, *vs;
    int64_t sq, sk, sv;
    if (L.fused_qkv) {
      L.qkv.run(h.data(), B, qkv.data(), p.act);
      qs = qkv.data();
      ks = qs + nq * hd;
      vs = ks + nkv * hd;
      sq = sk = sv = nqkv;
    } else {
      float* base = qkv.data();  // q [B, nq*hd] | k [B, nkv*hd] | v [B, nkv*hd]
      L.q.run(h.data(), B, base, p.act);
      L.k.run(h.data(), B, base + B * nq * hd, p.act);
      L.v.run(h.data(), B, base + B * (nq + nkv) * hd, p.act);
      qs = base;
      ks = base + B * nq * hd;
      vs = base + B * (nq + nkv) * hd;
      sq = nq * hd;
      sk = sv = nkv * hd;
    }
    clock.lap(kMatmul);
    if (cache_bf) {
      attention<uint16_t>(p, a, kcs[l], vcs[l], qs, ks, vs, sq, sk, sv, att.data(), qf.data());
    } else {
      attention<float>(p, a, kcs[l], vcs[l], qs, ks, vs, sq, sk, sv, att.data(), qf.data());
    }
    clock.lap(kAttention);
    L.o.run(att.data(), B, o.data(), p.act);
    clock.lap(kMatmul);
    for (int64_t i = 0; i < B * d; ++i) x[i] += o[i];
    L.n2.apply(x.data(), B, d, h.data());
    clock.lap(kOther);
    if (p.swiglu) {
      const float *g, *u;
      int64_t gs;
      if (L.fused_gu) {
        L.gu.run(h.data(), B, gu.data(), p.act);
        g = gu.data();
        u = g + f;
        gs = 2 * f;
      } else {
        L.gate.run(h.data(), B, gu.data(), p.act);
        L.up.run(h.data(), B, gu.data() + B * f, p.act);
        g = gu.data();
        u = g + B * f;
        gs = f;
      }
      clock.lap(kMatmul);
      for (int64_t b = 0; b < B; ++b) {  // silu(g) * u = g / (1 + exp(-g)) * u
        float* ab = act.data() + b * f;
        for (int64_t i = 0; i < f; ++i) ab[i] = -g[b * gs + i];
        vexp(ab, f);
        for (int64_t i = 0; i < f; ++i) ab[i] = g[b * gs + i] / (1.0f + ab[i]) * u[b * gs + i];
      }
    } else {
      L.up.run(h.data(), B, gu.data(), p.act);
      clock.lap(kMatmul);
      const float k0 = 0.7978845608028654f;  // sqrt(2 / pi): GELU, tanh approximation
      for (int64_t i = 0; i < B * f; ++i) {
        const float v = gu[i];
        act[i] = 0.5f * v * (1.0f + std::tanh(k0 * (v + 0.044715f * v * v * v)));
      }
    }
    clock.lap(kOther);
    L.down.run(act.data(), B, o.data(), p.act);
    clock.lap(kMatmul);
    for (int64_t i = 0; i < B * d; ++i) x[i] += o[i];
  }
  p.fnorm.apply(x.data(), B, d, h.data());
  clock.lap(kOther);
  p.head.run(h.data(), B, logits.data(), p.act);
  clock.lap(kHead);
  if (timing) ++timed_steps;
  Tensor out = at::from_blob(logits.data(), {B, 1, p.vocab}, at::kFloat).to(p.act);
  return p.act == at::kFloat ? out.clone() : out;
}

// x [M, K] fp32 -> x W^T [M, N] fp32 through one layer's kernel (for tests and timing)
Tensor linear(Tensor x, int64_t kind, int64_t group, Tensor a, Tensor b, bool int8_act,
              int64_t reps) {
  std::vector<Tensor> ts{a, b};
  std::vector<int64_t> is{kind, group, 0};
  std::vector<double> fs;
  Cursor c{ts, is, fs};
  Lin lin;
  lin.read(c, at::kBFloat16, int8_act);
  x = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  Tensor y = at::empty({M, lin.n}, x.options());
  for (int64_t r = 0; r < std::max<int64_t>(reps, 1); ++r)
    lin.run(x.data_ptr<float>(), M, y.data_ptr<float>(), at::kBFloat16);
  return y;
}

// The transposed weight W^T [K, N] in bf16 from torch's int4 layout (one block of 64 rows
// and one column k is 32 contiguous bytes, and 64 contiguous outputs): prefill unpacks each
// weight once and runs a dense bf16 matmul, ten times faster than unpacking with torch ops.
Tensor dequant_int4_t(Tensor packed, Tensor sz, int64_t group) {
  packed = packed.contiguous();
  sz = sz.contiguous();
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(N % 64 == 0 && K % group == 0, "dequant_int4_t: bad shape");
  Tensor out = at::empty({K, N}, packed.options().dtype(at::kBFloat16));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* z = reinterpret_cast<const uint16_t*>(sz.data_ptr());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    float w[64];
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* src = p + (nb * K + k) * 32;
        const uint16_t* pair = z + ((k / group) * N + nb * 64) * 2;
        for (int i = 0; i < 32; ++i) {
          w[i] = float(src[i] & 15);
          w[i + 32] = float(src[i] >> 4);
        }
        uint16_t* dst = o + k * N + nb * 64;
        for (int i = 0; i < 64; ++i)
          dst[i] = f2bf((w[i] - 8.f) * bf2f(pair[2 * i]) + bf2f(pair[2 * i + 1]));
      }
  });
  return out;
}

// 0: torch's kernels only, 1: our fp32 kernels (AVX-512), 2: also int8-activation (VNNI)
int64_t kernels() { return KV_VNNI ? 2 : KV_AVX512 ? 1 : 0; }

}  // namespace

TORCH_LIBRARY(kvformer_native, m) {
  m.def("linear(Tensor x, int kind, int group, Tensor a, Tensor b, bool int8_act, int reps) "
        "-> Tensor", &linear);
  m.def("kernels() -> int", &kernels);
  m.def("dequant_int4_t(Tensor packed, Tensor sz, int group) -> Tensor", &dequant_int4_t);
  m.def("profile(bool enable) -> float[]", &profile);
  m.def("plan_new(Tensor[] tensors, int[] ints, float[] reals) -> int", &plan_new);
  m.def("plan_free(int plan) -> ()", &plan_free);
  m.def("plan_step(int plan, Tensor tokens, Tensor[] k, Tensor[] v, int slot, int pos0, "
        "Tensor pos, Tensor mask) -> Tensor", &plan_step);
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("KVFORMER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvformer")
    return Path(root) / "native"


def cpuinfo(field: str) -> str:
    """The first line of /proc/cpuinfo that starts with ``field`` ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(field)), "")
    except OSError:
        return ""


def _build_key() -> str:
    """Source, torch version and CPU features: a binary built with -march=native is only
    reused on the kind of machine it was built for."""
    h = hashlib.sha256("\0".join([SOURCE, torch.__version__, cpuinfo("flags")]).encode())
    return h.hexdigest()[:16]


def available(build: bool = True) -> bool:
    """Whether the native decode step can be used; builds it on first call (a minute, once
    per machine) unless ``build`` is False. Never raises."""
    if "ok" in _state:
        return bool(_state["ok"])
    if not build:
        return False
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        _state["ok"] = _load()
    return bool(_state["ok"])


def _load() -> bool:
    if os.environ.get("KVFORMER_NATIVE", "1") in ("0", "false", "no", "off"):
        return False
    if sys.platform != "linux":
        return False
    try:
        key = _build_key()
        build_dir = _cache_dir() / key
        built = build_dir / f"{NAME}_{key}.so"
        if built.exists():
            # Built before (the key covers the source, torch and the CPU): load it directly,
            # without importing torch's build machinery (setuptools & co., ~4 MB).
            try:
                torch.ops.load_library(str(built))
                return hasattr(torch.ops.kvformer_native, "plan_step")
            except (OSError, RuntimeError):
                pass  # unreadable (e.g. another process is writing it): the build below
        from torch.utils.cpp_extension import load_inline

        build_dir.mkdir(parents=True, exist_ok=True)
        if not built.exists():
            print("kvformer: compiling the native decode step (once per machine, about a "
                  "minute)...", file=sys.stderr, flush=True)
        load_inline(f"{NAME}_{key}", cpp_sources=[SOURCE], is_python_module=False,
                    build_directory=str(build_dir), verbose=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp"])
        return hasattr(torch.ops.kvformer_native, "plan_step")
    except Exception as exc:  # no compiler, no headers, a failed build: use Python
        warnings.warn(f"kvformer: native decode step unavailable ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); "
                      "using the Python one", stacklevel=2)
        return False


# --------------------------------------------------------------------------- the plan
_EMPTY = torch.empty(0)
_EMPTY_LONG = torch.empty(0, dtype=torch.long)
_EMPTY_BOOL = torch.empty(0, dtype=torch.bool)


def _lin(linear: nn.Module, act: torch.dtype, ts: list, ints: list) -> None:
    """Describe one linear layer: kind, group, has_bias; a, b[, bias]."""
    bias = linear.bias
    if isinstance(linear, Int4Linear):
        ints += [2, linear.group, bias is not None]
        ts += [linear.packed, linear.scales_and_zeros.contiguous()]
    elif isinstance(linear, Int8Linear):
        ints += [1, 0, bias is not None]
        ts += [linear.qweight, linear.scale]
    elif isinstance(linear, nn.Linear):
        ints += [0, 0, bias is not None]
        ts += [linear.weight.detach().to(act), _EMPTY]
    else:
        raise TypeError(f"no native path for {type(linear).__name__}")
    if bias is not None:
        ts.append(bias.detach().to(act))


def _norm(norm: nn.Module, ts: list, ints: list, reals: list) -> None:
    if not isinstance(norm, (RMSNorm, LayerNorm)):
        raise TypeError(f"no native path for {type(norm).__name__}")
    bias = getattr(norm, "bias", None)
    ints += [isinstance(norm, RMSNorm), bias is not None]
    reals.append(float(norm.eps))
    ts.append(norm.weight.detach())
    if bias is not None:
        ts.append(bias.detach())


class NativeDecodeStep:
    """The same contract as ``kvformer.fast.DecodeStep``, computed by the C++ operator."""

    def __init__(self, model: nn.Module, int8_activations: bool = True):
        cfg = model.cfg
        self.model = model
        self.supported = False
        if not available():
            return
        if cfg.pos not in ("rope", "none") or cfg.norm not in ("rmsnorm", "layernorm"):
            return
        act = model.dtype
        if act not in (torch.float32, torch.bfloat16):
            return
        ts: list[torch.Tensor] = []
        ints: list[int] = [cfg.n_layer, cfg.d_model, cfg.head_dim, cfg.n_head, cfg.n_kv_head,
                           cfg.d_ff, act == torch.bfloat16, cfg.pos == "rope",
                           cfg.mlp == "swiglu", int8_activations]
        reals: list[float] = [cfg.head_dim ** -0.5]
        try:
            emb = model.tok_emb
            if isinstance(emb, Int8Embedding):
                ints.append(1)
                ts += [emb.qweight, emb.scale]
            else:
                ints.append(0)
                ts.append(emb.weight.detach())
            if cfg.pos == "rope":
                ts += [model.rotary.cos, model.rotary.sin]
            for block in model.layers:
                attn, mlp = block.attn, block.mlp
                _norm(block.attn_norm, ts, ints, reals)
                fused = attn._modules.get("wqkv")
                ints.append(fused is not None)
                for lin in [fused] if fused is not None else [attn.wq, attn.wk, attn.wv]:
                    _lin(lin, act, ts, ints)
                _lin(attn.wo, act, ts, ints)
                _norm(block.mlp_norm, ts, ints, reals)
                fused = mlp._modules.get("w_gate_up")
                ints.append(fused is not None)
                if fused is not None:
                    parts = [fused]
                else:
                    parts = [mlp.w_gate, mlp.w_up] if cfg.mlp == "swiglu" else [mlp.w_up]
                for lin in parts:
                    _lin(lin, act, ts, ints)
                _lin(mlp.w_down, act, ts, ints)
            _norm(model.norm, ts, ints, reals)
            head = model._modules.get("lm_head")
            if head is None:
                ints += [0, 0, 0]
                ts += [model.tok_emb.weight.detach().to(act), _EMPTY]
            else:
                _lin(head, act, ts, ints)
        except (TypeError, AttributeError):
            return
        self.rope_len = model.rotary.cos.shape[0] if cfg.pos == "rope" else None
        self.handle = torch.ops.kvformer_native.plan_new(ts, [int(i) for i in ints], reals)
        self.supported = True

    def __del__(self):
        handle = getattr(self, "handle", None)
        if handle is not None:
            try:
                torch.ops.kvformer_native.plan_free(handle)
            except Exception:  # interpreter shutdown
                pass

    def usable(self, tokens: torch.Tensor, cache) -> bool:
        return (self.supported and tokens.shape[1] == 1 and type(cache) is KVCache
                and tokens.shape[0] == cache.batch_size and tokens.dtype == torch.long
                and cache.k[0].dtype in (torch.float32, torch.bfloat16)
                and all(b.attn.weights_sink is None for b in self.model.layers))

    def __call__(self, tokens: torch.Tensor, cache: KVCache,
                 input_pos: torch.Tensor | None = None,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        slot = cache.length
        cache.check_room(1)
        pos0, pos = slot, _EMPTY_LONG
        if input_pos is not None:
            pos = input_pos.reshape(-1, 1)[:, 0] if input_pos.dim() == 2 else input_pos
            if pos.numel() == 1:
                pos0, pos = int(pos.reshape(())), _EMPTY_LONG
            elif pos.dtype != torch.long:
                pos = pos.long()
        if self.rope_len is not None:
            top = pos0 if pos.numel() == 0 else int(pos.max())
            if top >= self.rope_len:
                return None  # past the rotary table: the model computes it afresh
        mask = _EMPTY_BOOL if key_mask is None else key_mask
        logits = torch.ops.kvformer_native.plan_step(self.handle, tokens, cache.k, cache.v,
                                                      slot, pos0, pos, mask)
        cache.advance(1)
        return logits
