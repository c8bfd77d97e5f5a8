// kvformer's CPU kernels: the interface every instruction-set path implements.
//
// The kernels see raw pointers only (no torch), so each path is one translation unit built
// with its own compiler flags (kernels/scalar.cpp: none, the fallback every CPU runs;
// kernels/avx2.cpp: -mavx2 -mfma -mf16c, and again with vpdpbusd for the avxvnni path;
// kernels/avx512.cpp: AVX-512 with VNNI; kernels/neon.cpp: armv8.2-a+dotprod) and cpu.cpp
// picks one at run time from what the CPU reports. Every path computes the same thing;
// tests run each of them.
//
// The layouts are kvformer's own (docs/architecture.md, kvformer/quantize.py):
//
// int4 weights [N, K], N % 16 == 0, K % 32 == 0: rows in tiles of 16, columns in blocks
// of 32, one fp16 pair (d, m) per row and block, w = d * q + m with q in 0..15.
//   q:  uint8 [N/16][K/32][4][16][4]: for tile t, block b, sub-block s, row r, byte j:
//       low nibble = column 32b + 8s + j, high nibble = column 32b + 8s + 4 + j, of row
//       16t + r. So the 64 bytes of a sub-block hold 4 consecutive bytes per row: one
//       32-bit lane per row, the shape of an integer dot-product instruction.
//   dm: fp16 [N/16][K/32][2][16]: d of the tile's 16 rows, then their m.
// int8 weights [N, K]: row-major int8 in -127..127, one fp32 scale per row.
//
// Quantized KV-cache rows (kvformer/kvquant.py), one row per (token, KV head), read by
// attend_q; scales are bf16:
//   int8: hd int8 numbers q and one scale s, x = s q.
//   int4: hd / 2 bytes, groups of 32 numbers (16 bytes: byte i holds number i in its low
//         nibble and number i + 16 in its high one), and a (d, m) pair per group,
//         x = d q + m with q in 0..15; the row's scales are d0, m0, d1, m1, ...
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvf {

constexpr int64_t kTile = 16;   // int4 rows per tile
constexpr int64_t kBlock = 32;  // int4 columns per block (one d, m pair)
constexpr int64_t kTileBytes = kTile * kBlock / 2;  // 256

// Activations made ready for integer dot products: two int8 levels per element,
// x ~= scale * (128 q1 + q2) per block of `block` columns (scale already holds the 1/128),
// and the exact sum of each block (for the m of int4 weights): the second level brings x's
// error below bf16's rounding.
//
// levels = 1 ("int8" activations, for int4 layers: llama.cpp's Q8_1 precision,
// docs/architecture.md): q2 is all zero and `sum` is the sum of q1's x (the caller sets
// both); gemm_q4 may skip q2, and its result is the two-level computation with q2 = 0 bit
// for bit, so a path that does not skip is right too.
struct Acts {
  int64_t m = 0, k = 0, block = 0;
  int levels = 2;
  const int8_t* q1 = nullptr;   // [m, k]
  const int8_t* q2 = nullptr;   // [m, k]
  const float* scale = nullptr; // [m, k / block]
  const float* sum = nullptr;   // [m, k / block]

  void point_at(const int8_t* q1_, const int8_t* q2_, const float* scale_, const float* sum_) {
    q1 = q1_;
    q2 = q2_;
    scale = scale_;
    sum = sum_;
  }
};

// One element's two levels, v = x * 127 / max|x| of its block: q1 = round(v), q2 = the
// rest in 1/128ths. The scalar form every path uses (the SIMD ones for their tails).
inline void quantize_one(float v, int8_t* q1, int8_t* q2) {
  const float r = std::nearbyint(v);
  *q1 = int8_t(r);
  *q2 = int8_t(std::nearbyint((v - r) * 128.f));
}

// softmax(q K^T) V of `group` query heads over the slots [s0, s1) of one KV head, as a
// partial result (running max, sum of exponentials, unnormalised output) so that a long
// cache can be split between threads and the parts combined. Slot s is row s of k / v (and
// of the scales), or, paged (table set), row table[s / block] * block + s % block: blocks of
// `block` consecutive rows, anywhere, in the order the table lists them.
struct AttendArgs {
  const float* q = nullptr;     // [group, hd], already scaled by 1/sqrt(d_k)
  int64_t group = 0, hd = 0;
  const void* k = nullptr;      // rows [*, hd], fp32 or bf16 (row s at s * hd)
  const void* v = nullptr;
  bool bf16 = false;
  int64_t s0 = 0, s1 = 0;
  const bool* allowed = nullptr;  // per slot (at s * allowed_stride) or null: all
  int64_t allowed_stride = 0;
  int64_t own = -1;             // the new token's slot: always allowed
  float* scores = nullptr;      // scratch [group, s1 - s0]
  float* max = nullptr;         // out [group]
  float* sum = nullptr;         // out [group]
  float* out = nullptr;         // out [group, hd], not yet divided by sum
  // attend_q only: k and v are quantized rows of `bits` (8 or 4) per number, row s at
  // s * hd (int8) or s * hd / 2 (int4) bytes, its scales at s * (1 or hd / 16)
  int bits = 0;
  const uint16_t* k_scale = nullptr;
  const uint16_t* v_scale = nullptr;
  const int64_t* table = nullptr;  // paged: the block of each `block` slots, or null
  int64_t block = 0;
};

// The slots [s0, s1) of a as runs of consecutive rows: f(s, n, row) for slots s .. s + n - 1
// in rows row .. row + n - 1. A contiguous cache is one run; a paged one a run per block, or
// per stretch of blocks that the table lists one after another.
template <typename F>
inline void for_runs(const AttendArgs& a, const F& f) {
  if (!a.table) {
    if (a.s1 > a.s0) f(a.s0, a.s1 - a.s0, a.s0);
    return;
  }
  for (int64_t s = a.s0; s < a.s1;) {
    int64_t b = s / a.block;
    const int64_t row = a.table[b] * a.block + s % a.block;
    int64_t e = std::min(a.s1, (b + 1) * a.block);
    while (e < a.s1 && a.table[b + 1] == a.table[b] + 1) e = std::min(a.s1, (++b + 1) * a.block);
    f(s, e - s, row);
    s = e;
  }
}

// for_runs's runs, each cut into pieces of at most `most` slots: out = (s, n, row) each
struct Run {
  int64_t s, n, row;
};
template <typename Vec>
inline void runs_of(const AttendArgs& a, int64_t most, Vec& out) {
  out.clear();
  for_runs(a, [&](int64_t s, int64_t n, int64_t row) {
    for (int64_t i = 0; i < n; i += most) out.push_back({s + i, std::min(most, n - i), row + i});
  });
}

// Each slot of a with its row: f(s, row), in order.
template <typename F>
inline void each_slot(const AttendArgs& a, const F& f) {
  for_runs(a, [&](int64_t s, int64_t n, int64_t row) {
    for (int64_t i = 0; i < n; ++i) f(s + i, row + i);
  });
}

struct Kernels {
  const char* name;
  // a's arrays from x [m, k] (the caller owns them; a.m, a.k, a.block are set)
  void (*quantize)(const float* x, Acts& a, int8_t* q1, int8_t* q2, float* scale,
                   float* sum);
  // y[i * ldy + n] = sum_k x[i, k] w[n, k] for n in [n0, n1) (multiples of kTile)
  void (*gemm_q4)(const Acts& a, const uint8_t* q, const uint16_t* dm, int64_t n0,
                  int64_t n1, float* y, int64_t ldy);
  // the same for int8 rows; rowsum[n] = sum_k q[n, k]
  void (*gemm_q8)(const Acts& a, const int8_t* q, const float* scale, const int32_t* rowsum,
                  int64_t n0, int64_t n1, float* y, int64_t ldy);
  // rows [n0, n1) of an int4 weight as numbers, row-major with row stride ldo, into
  // out_f32 or (if it is null) out_bf16
  void (*dequant_q4)(const uint8_t* q, const uint16_t* dm, int64_t k, int64_t n0,
                     int64_t n1, float* out_f32, uint16_t* out_bf16, int64_t ldo);
  void (*attend)(const AttendArgs& a);
  // the same over int8 or int4 K/V rows (a.bits), dequantized inside: no fp copy of the cache
  void (*attend_q)(const AttendArgs& a);
  void (*exp)(float* v, int64_t n);  // v = exp(v) in place, exp(-inf) = 0
};

const Kernels& scalar_kernels();
void attend_generic(const AttendArgs& a);    // the portable attention, for any head_dim
void attend_q_generic(const AttendArgs& a);  // the same over quantized rows
#if defined(__x86_64__) || defined(_M_X64)
const Kernels& avx2_kernels();
const Kernels& avxvnni_kernels();       // kernels/avx2.cpp with VEX vpdpbusd (AVX-VNNI)
const Kernels& avxvnni_evex_kernels();  // the same code, EVEX vpdpbusd (AVX-512 VNNI + VL)
const Kernels& avx512_kernels();
#endif
#if defined(__aarch64__)
const Kernels& neon_kernels();  // needs the dot-product extension (FEAT_DotProd)
#endif

// ---------------------------------------------------------------- number formats
inline float bf16_to_f32(uint16_t u) {
  const uint32_t x = uint32_t(u) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while (!(mant & 0x400u));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 112) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace kvf
