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
// kb ("blocks") weights [N, K], N % 16 == 0, K % 32 == 0 (K % 256 for the kSuper kinds): a
// GGUF file's own block types repacked without rounding (kvformer/formats/gguf/blocks.py
// maps each type). Every weight is an unsigned integer u of `bits` bits (4, 5, 6 or 8),
// or, with a lut, a 4-bit index i whose u is lut[i]; row r's weight in column c is
//     w = D * u + M,
// D and M constant over each block of 32 columns (kPair, kSuper) or, for kSuper16, D over
// each 16 columns and M = -32 D.
//   q: one record per (tile t, block b) at (t * K/32 + b) * kb_record(bits) bytes:
//     bits 4, 5, 6: the int4 layout's 256 bytes of low nibbles (u & 15), then bits - 4
//       planes of 64 bytes: plane p is 8 uint64 words, word 2s + h for sub-block s (0..3)
//       and half h (0: columns 8s .. 8s+3, the low nibbles; 1: columns 8s+4 .. 8s+7, the
//       high ones); bit 4r + j of that word is bit 4 + p of u at row 16t + r, column
//       32b + 8s + 4h + j.
//     bits 8: 512 bytes, u itself: byte 128s + 64h + 4r + j is u at row 16t + r, column
//       32b + 8s + 4h + j (the nibbles' order, unpacked).
//   s: the scales, by kind:
//     kPair: per (tile, block) fp16 D[16], then fp16 M[16] (64 bytes: the int4 layout's dm)
//     kScale: per (tile, block) fp16 D[16] (32 bytes); M = -zero D (zero: a power of two
//       of the weights: the offset ggml implies, e.g. Q8_0's u = q + 128 has zero 128)
//     kSuper: per (tile, 256 columns) 320 bytes: fp16 d[16], fp16 dmin[16], then per block
//       of the 8: int8 sc[16], int8 mn[16]; D = d sc, M = -dmin mn (fp32 products: exact)
//     kSuperZ: per (tile, 256 columns) 160 bytes: fp16 d[16], then per block of the 8: int8
//       sc[16]; D = d sc, M = -zero D
//     kSuper16: per (tile, 256 columns) 288 bytes: fp16 d[16], then per block of the 8:
//       int8 sc[2][16] (its two halves of 16 columns); D = d sc, M = -32 D
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
  // the same sums per 16 columns [m, k / 16]: set for kSuper16 weights (their M changes
  // every 16 columns), null otherwise
  const float* hsum = nullptr;

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

// kb weights (the layout above) as the kernels see them
enum KbScales : int { kPair = 0, kSuper = 1, kSuper16 = 2, kScale = 3, kSuperZ = 4 };
struct KbWeights {
  const uint8_t* q = nullptr;
  const uint8_t* s = nullptr;
  int bits = 4;                   // 4, 5, 6 or 8
  int scales = kPair;             // KbScales
  const uint8_t* lut = nullptr;   // 16 entries (bits 4 only), or null: u is the integer
  int64_t k = 0;                  // columns
  int zero = 0;                   // kScale, kSuperZ: M = -zero D
};

constexpr int64_t kb_record(int bits) { return bits == 8 ? 512 : 256 + 64 * (bits - 4); }
// bytes of scales per (tile, block of 32 columns), on average
constexpr int64_t kb_scale_bytes(int scales) {
  return scales == kPair ? 64 : scales == kSuper ? 40 : scales == kSuper16 ? 36
         : scales == kScale ? 32 : 20;
}
// bytes of scales per (tile, 256 columns) of the super-block kinds
constexpr int64_t kb_super_bytes(int scales) {
  return scales == kSuper ? 320 : scales == kSuper16 ? 288 : 160;
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
  // y[i * ldy + n] = sum_k x[i, k] w[n, k] for n in [n0, n1) (multiples of kTile), kb
  // weights (a.block is 32; a.hsum is set for kSuper16)
  void (*gemm_kb)(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
                  int64_t ldy);
  void (*attend)(const AttendArgs& a);
  // the same over int8 or int4 K/V rows (a.bits), dequantized inside: no fp copy of the cache
  void (*attend_q)(const AttendArgs& a);
  void (*exp)(float* v, int64_t n);  // v = exp(v) in place, exp(-inf) = 0
};

const Kernels& scalar_kernels();
void attend_generic(const AttendArgs& a);    // the portable attention, for any head_dim
void attend_q_generic(const AttendArgs& a);  // the same over quantized rows
void gemm_kb_generic(const Acts& a, const KbWeights& w, int64_t n0, int64_t n1, float* y,
                     int64_t ldy);  // the portable kb matmul
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

// ---------------------------------------------------------------- kb weights
// D and M of the 16 rows of tile t, block b (for kSuper16, M of each half): the portable
// decoding every path may use (its float work is per block, not per weight).
inline void kb_scales(const KbWeights& w, int64_t t, int64_t b, float D[2][16],
                      float M[2][16]) {
  const int64_t kb = w.k / 32;
  if (w.scales == kPair) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w.s) + (t * kb + b) * 32;
    for (int r = 0; r < 16; ++r) {
      D[0][r] = D[1][r] = f16_to_f32(p[r]);
      M[0][r] = M[1][r] = f16_to_f32(p[16 + r]);
    }
    return;
  }
  if (w.scales == kScale) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w.s) + (t * kb + b) * 16;
    for (int r = 0; r < 16; ++r) {
      D[0][r] = D[1][r] = f16_to_f32(p[r]);
      M[0][r] = M[1][r] = -float(w.zero) * D[0][r];
    }
    return;
  }
  const int64_t nsup = w.k / 256, sup = b / 8, j = b % 8;
  if (w.scales == kSuperZ) {
    const uint8_t* rec = w.s + (t * nsup + sup) * 160;
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rec);
    const int8_t* sc = reinterpret_cast<const int8_t*>(rec + 32 + 16 * j);
    for (int r = 0; r < 16; ++r) {
      D[0][r] = D[1][r] = f16_to_f32(d[r]) * float(sc[r]);
      M[0][r] = M[1][r] = -float(w.zero) * D[0][r];
    }
    return;
  }
  if (w.scales == kSuper) {
    const uint8_t* rec = w.s + (t * nsup + sup) * 320;
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rec);
    const int8_t* sc = reinterpret_cast<const int8_t*>(rec + 64 + 32 * j);
    for (int r = 0; r < 16; ++r) {
      D[0][r] = D[1][r] = f16_to_f32(d[r]) * float(sc[r]);
      M[0][r] = M[1][r] = -(f16_to_f32(d[16 + r]) * float(sc[16 + r]));
    }
    return;
  }
  const uint8_t* rec = w.s + (t * nsup + sup) * 288;
  const uint16_t* d = reinterpret_cast<const uint16_t*>(rec);
  const int8_t* sc = reinterpret_cast<const int8_t*>(rec + 32 + 32 * j);
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 16; ++r) {
      D[h][r] = f16_to_f32(d[r]) * float(sc[16 * h + r]);
      M[h][r] = -32.f * D[h][r];
    }
}

// u of row r (0..15), column c (0..31) of one record (the layout above)
inline int kb_u(const KbWeights& w, const uint8_t* rec, int r, int c) {
  const int s = c / 8, h = (c % 8) / 4, j = c % 4;
  if (w.bits == 8) return rec[128 * s + 64 * h + 4 * r + j];
  int u = (rec[64 * s + 4 * r + j] >> (4 * h)) & 15;
  if (w.lut) return w.lut[u];
  for (int p = 0; p < w.bits - 4; ++p) {
    uint64_t word;
    std::memcpy(&word, rec + 256 + 64 * p + 8 * (2 * s + h), 8);
    u |= int((word >> (4 * r + j)) & 1u) << (4 + p);
  }
  return u;
}

// rows [n0, n1) (any rows) of kb weights as numbers, row-major with row stride ldo, into
// out_f32 or (if it is null) out_bf16: portable (kernels/scalar.cpp)
void dequant_kb(const KbWeights& w, int64_t n0, int64_t n1, float* out_f32, uint16_t* out_bf16,
                int64_t ldo);

}  // namespace kvf
