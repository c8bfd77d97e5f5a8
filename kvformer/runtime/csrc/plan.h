// The step's structures, built from a named plan (kvformer/runtime/plan.py:
// StepPlan.named()): tensors, integers and reals under names such as
// "layers.3.qkv.weight", the same description the Python step reads. plan.cpp reads them
// (Lin::set / read, Norm::read, plan_new) and keeps the plans by handle; step.cpp runs them
// (Lin::run, Norm::apply, run_step).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels.h"

namespace kvf {

using at::Tensor;

struct Named;  // a plan's tables by name (plan.cpp)
struct Work;   // a matmul's scratch (step.h)

enum Kind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2, kKb = 3 };

struct Lin {
  int64_t kind = kDense, n = 0, k = 0;
  Tensor w, s;  // dense: weight [n, k] in the activations' dtype; int8: q, scale; int4: q, dm;
                // kb: records, scales (kernels.h)
  Tensor lut_t;  // kb: the 16 u of a 4-bit index, or undefined
  KbWeights kb;  // kb: the pointers and form the kernels see
  Tensor bias_t;
  std::vector<float> bias;
  std::vector<int32_t> rowsum;

  // rowsums: precompute sum_k q[n, k] for the kernels that want it (a plan does, once; a
  // single call does not: it would read the weight twice)
  void set(int64_t kind_, Tensor w_, Tensor s_, Tensor bias_, at::ScalarType act,
           bool rowsums = true);
  // kb weights: w uint8 [N/16, K/32, kb_record(bits)], s uint8 (the scales of `scales`),
  // lut uint8 [16] or undefined
  void set_kb(Tensor w_, Tensor s_, int64_t bits, int64_t scales, int64_t zero, Tensor lut,
              Tensor bias_, at::ScalarType act);
  void read(Named& p, const std::string& name, at::ScalarType act);  // plan.cpp

  // y [M, n] = x [M, k] W^T (+ bias), fp32  (step.cpp)
  void run(const Kernels& K, const float* x, int64_t M, float* y, Work& wk,
           at::ScalarType act) const;
};

struct Norm {
  bool rms = true;
  float eps = 1e-5f;
  std::vector<float> w, b;

  void read(Named& p, const std::string& name);  // plan.cpp

  // one row xm [n] -> om [n]  (step.cpp)
  void apply(const float* xm, int64_t n, float* om) const;
};

struct Layer {
  Norm attn_norm, mlp_norm;
  bool fused_qkv = false, fused_gate_up = false;
  Lin qkv, q, k, v, wo, gate_up, gate, up, down;
};

struct Plan {
  int64_t n_layer = 0, d = 0, hd = 0, nq = 0, nkv = 0, dff = 0, vocab = 0;
  bool rope = false, swiglu = true;
  at::ScalarType act = at::kFloat;
  int64_t embed_kind = kDense;
  Tensor embed_w, embed_s, cos, sin;
  Lin embed;  // embed_kind kKb: the table as kb weights (a row is dequantized per token)
  float q_scale = 1.0f;
  std::vector<Layer> layers;
  Norm final_norm;
  Lin head;
  const Kernels* K = nullptr;
};

// A new plan from its tables (names and values side by side), on kernel path `isa` ("": the
// best this CPU runs); returns its handle. Every entry must be read, or it refuses.
int64_t plan_new(std::vector<std::string> tnames, std::vector<Tensor> ts,
                 std::vector<std::string> inames, std::vector<int64_t> is,
                 std::vector<std::string> rnames, std::vector<double> rs, std::string isa);
void plan_free(int64_t handle);
std::string plan_isa(int64_t handle);
std::shared_ptr<Plan> plan_of(int64_t handle);

}  // namespace kvf
