// The decode step (step.cpp): what ops.cpp needs of it to make it and the single kernels
// torch operators.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "plan.h"

namespace kvf {

// How many int8 levels activations enter the int4 kernels with: 2 or 1 (step.cpp)
std::atomic<int>& act_levels();
std::string activations_op(std::string mode);

// Reusable scratch for the quantized activations of one matmul.
struct Work {
  std::vector<int8_t> q1, q2;
  std::vector<float> scale, sum, hsum;
  // kb: the sums are those of the x the products see (scale * (128 q1 + q2) summed: a
  // weight's offset M then meets x's rounding only through D u + M, which is centred; with
  // x's own sums, Q8_0's M = -128 D multiplied that rounding error ~2x), and with halves
  // also per 16 columns (Acts::hsum)
  kvf::Acts prepare(const Kernels& K, const float* x, int64_t m, int64_t k, int64_t block,
                    bool kb = false, bool halves = false) {
    const size_t nb = size_t(m * (k / block));
    if (q1.size() < size_t(m * k)) q1.resize(m * k), q2.resize(m * k);
    if (scale.size() < nb) scale.resize(nb), sum.resize(nb);
    kvf::Acts a;
    a.m = m;
    a.k = k;
    a.block = block;
    // one level only for blocks of 32 (int4 layers): int8 layers scale x once per row, and
    // one level over a whole row costs SmolLM2 int8 3.9 % perplexity
    a.levels = block < k ? act_levels().load(std::memory_order_relaxed) : 2;
    K.quantize(x, a, q1.data(), q2.data(), scale.data(), sum.data());
    if (a.levels == 1) {
      // x's second level is zero; each block's sum becomes the sum of its one level (the
      // x the products see): m * sum(x) would leave the weights' offset m, not centred,
      // multiplying x's rounding error (+1.6 % perplexity on SmolLM2 against +0.4 %)
      std::memset(q2.data(), 0, size_t(m * k));
    }
    if (a.levels == 1 || kb) {
      const int64_t per = halves ? 16 : block, np_ = k / per;
      if (halves && hsum.size() < size_t(m * np_)) hsum.resize(m * np_);
      float* out = halves ? hsum.data() : sum.data();
      for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < np_; ++g) {
          const int64_t o = i * k + g * per;
          int32_t t = 0;
          for (int64_t j = 0; j < per; ++j) t += 128 * q1[o + j] + q2[o + j];
          out[i * np_ + g] = float(t) * scale[i * (k / block) + g * per / block];
        }
      if (halves) a.hsum = hsum.data();
    }
    return a;
  }
};

// ------------------------------------------------------------------ attention
struct StepArgs {
  int64_t B, slot, pos0, pos_stride, ms0, ms1;
  const int64_t* pos;
  const bool* mask;
  // Paged: K/V live in a pool [nkv, nblk, bs, hd] per layer; row b's slot s is in block
  // table[b * table_stride + s / bs] at offset s % bs, and its new token goes to slot
  // lens[b]. With table null, the cache is contiguous [B, nkv, max_len, hd] and every row's
  // new token goes to `slot`.
  const int64_t* table = nullptr;
  int64_t table_stride = 0, nblk = 0, bs = 0;
  const int64_t* lens = nullptr;
  // select: the step returns the logits of rows out_rows[0 .. n_out) only, in that order
  // (none when n_out is 0); else every row's
  bool select = false;
  const int64_t* out_rows = nullptr;
  int64_t n_out = 0;

  bool paged() const { return table != nullptr; }
  int64_t new_slot(int64_t b) const { return paged() ? lens[b] : slot; }
  int64_t position(int64_t b) const {
    if (pos) return pos[b * pos_stride];
    return paged() ? lens[b] : pos0;
  }
  // the element offset of row b's slot s of KV head j
  int64_t at(int64_t b, int64_t j, int64_t s, int64_t nkv, int64_t max_len, int64_t hd) const {
    if (!paged()) return ((b * nkv + j) * max_len + s) * hd;
    return ((j * nblk + table[b * table_stride + s / bs]) * bs + s % bs) * hd;
  }
};

// ------------------------------------------------------------------ the cache's rows
// What a K/V row is stored as (kvformer/kvquant.py): fp32, bf16, or int8 / int4 numbers
// with bf16 scales in a tensor beside them.
struct Rows {
  int bits = 32;           // 32 (fp32), 16 (bf16), 8 (int8), 4 (int4)
  int64_t bytes = 0;       // of one row's numbers
  int64_t n_scales = 0;    // bf16 scales per row
  char* k = nullptr;
  char* v = nullptr;
  uint16_t* ks = nullptr;
  uint16_t* vs = nullptr;
};

// The form of a layer's K/V, read off its tensors: numbers [..., hd] fp32 / bf16, or
// int8 [..., hd] / uint8 [..., hd / 2] with bf16 scales [..., 1] / [..., hd / 16].
Rows rows_of(const Tensor& kc, const Tensor& vc, const Tensor& ks, const Tensor& vs,
             int64_t hd);

// Point a kernel's arguments at r's rows from `row` on.
void point_at(kvf::AttendArgs& at, const Rows& r, int64_t row);

// K.attend or K.attend_q, as the rows are numbers or quantized
void attend_rows(const Kernels& K, const kvf::AttendArgs& at);

Tensor run_step(const Plan& p, const Tensor& tokens, const std::vector<Tensor>& kcs,
                const std::vector<Tensor>& vcs, const std::vector<Tensor>& kss,
                const std::vector<Tensor>& vss, const StepArgs& a);

// The time the step spent in each part since the last call, and the steps timed; `enable`
// turns the timing on or off.
std::vector<double> profile(bool enable);

}  // namespace kvf
