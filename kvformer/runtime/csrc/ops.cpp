// The library's torch operators (torch.ops.kvformer_native, see kvformer/runtime/native.py):
// the decode step over a contiguous cache or a paged pool, with its arguments checked
// (plan_step, plan_step_paged), the plans (plan_new, plan_free, plan_isa), the settings
// (isas, threads, activations, profile), and the kernels of kernels.h exposed one by one for
// tests and for the quantized layers of the model (linear, dequant_int4, attend,
// attend_paged).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cpu.h"
#include "kernels.h"
#include "plan.h"
#include "step.h"
#include "threads.h"

namespace kvf {
namespace {

void check_scales(const Plan& p, const std::vector<Tensor>& kss, const std::vector<Tensor>& vss) {
  TORCH_CHECK(kss.size() == vss.size() && (kss.empty() || int64_t(kss.size()) == p.n_layer),
              "kvformer_native: give the K and V scales of every layer, or none (a float "
              "cache)");
}

// One token per row through a contiguous cache [B, nkv, max_len, hd] per layer (or its
// quantized rows, with their scales kss/vss: see Rows): each row's new K/V goes to `slot`;
// positions are pos (per row) or pos0; mask [B, slot + 1] or empty.
Tensor plan_step(int64_t handle, Tensor tokens, std::vector<Tensor> kcs, std::vector<Tensor> vcs,
                 std::vector<Tensor> kss, std::vector<Tensor> vss, int64_t slot, int64_t pos0,
                 Tensor pos, Tensor mask) {
  std::shared_ptr<Plan> pp = plan_of(handle);
  const Plan& p = *pp;
  const int64_t B = tokens.size(0);
  TORCH_CHECK(int64_t(kcs.size()) == p.n_layer && int64_t(vcs.size()) == p.n_layer,
              "kvformer_native: the cache has the wrong number of layers");
  check_scales(p, kss, vss);
  for (int64_t l = 0; l < p.n_layer; ++l)
    TORCH_CHECK(kcs[l].is_contiguous() && vcs[l].is_contiguous() && kcs[l].dim() == 4 &&
                    kcs[l].size(0) == B && kcs[l].size(1) == p.nkv && slot < kcs[l].size(2),
                "kvformer_native: the cache does not have the plan's shape");
  StepArgs a{B, slot, pos0, pos.numel() ? pos.stride(0) : 0, mask.numel() ? mask.stride(0) : 0,
             mask.numel() ? mask.stride(1) : 0, pos.numel() ? pos.data_ptr<int64_t>() : nullptr,
             mask.numel() ? mask.data_ptr<bool>() : nullptr};
  return run_step(p, tokens, kcs, vcs, kss, vss, a);
}

// One token per row through a paged pool [nkv, nblk, bs, hd] per layer: row b has
// lens[b] tokens cached, in the blocks tables[b, :]; its new token is at position and slot
// lens[b]. The K/V are read and written in the pool, in place. Every row's K/V is written
// before any row attends, so rows may be consecutive tokens of one sequence (the same
// table, lens p, p+1, ...: a prompt's prefill, causal by each row's length), as long as no
// two rows write the same slot. `logit_rows` picks the rows whose logits come back (int64
// indices, in that order; empty: none; not given: every row): the LM head runs on those
// rows only.
Tensor plan_step_paged(int64_t handle, Tensor tokens, std::vector<Tensor> kcs,
                       std::vector<Tensor> vcs, std::vector<Tensor> kss,
                       std::vector<Tensor> vss, Tensor tables, Tensor lens,
                       std::optional<Tensor> logit_rows) {
  std::shared_ptr<Plan> pp = plan_of(handle);
  const Plan& p = *pp;
  const int64_t B = tokens.size(0);
  TORCH_CHECK(int64_t(kcs.size()) == p.n_layer && int64_t(vcs.size()) == p.n_layer,
              "kvformer_native: the pool has the wrong number of layers");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && tables.scalar_type() == at::kLong &&
                  tables.stride(1) == 1 && lens.dim() == 1 && lens.size(0) == B &&
                  lens.scalar_type() == at::kLong && lens.is_contiguous(),
              "kvformer_native: tables must be int64 [B, blocks] and lens int64 [B]");
  check_scales(p, kss, vss);
  const int64_t nblk = kcs[0].size(1), bs = kcs[0].size(2);
  for (int64_t l = 0; l < p.n_layer; ++l)
    TORCH_CHECK(kcs[l].is_contiguous() && vcs[l].is_contiguous() && kcs[l].dim() == 4 &&
                    kcs[l].size(0) == p.nkv && kcs[l].size(1) == nblk && kcs[l].size(2) == bs,
                "kvformer_native: the pool does not have the plan's shape");
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] / bs < tables.size(1), "kvformer_native: row ", b,
                "'s block table has no room for slot ", lp[b]);
    // block 0 is a pool's padding block, unless the pool is one block (a contiguous cache
    // of one row, as NativeDecodeStep.prefill passes it)
    for (int64_t i = 0; i <= lp[b] / bs; ++i)
      TORCH_CHECK(tp[b * tables.stride(0) + i] >= (nblk > 1) && tp[b * tables.stride(0) + i] < nblk,
                  "kvformer_native: row ", b, " names block ", tp[b * tables.stride(0) + i],
                  ", not a block of this pool");
    if (p.rope)
      TORCH_CHECK(lp[b] < p.cos.size(0), "kvformer_native: position ", lp[b],
                  " is past the rotary table");
  }
  StepArgs a{B, 0, 0, 0, 0, 0, nullptr, nullptr};
  if (logit_rows.has_value()) {
    const Tensor& logits = *logit_rows;
    TORCH_CHECK(logits.dim() == 1 && logits.scalar_type() == at::kLong &&
                    logits.is_contiguous() && logits.numel() <= B,
                "kvformer_native: the rows wanting logits must be int64 [n], n <= rows");
    const int64_t* r = logits.data_ptr<int64_t>();
    for (int64_t i = 0; i < logits.numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < B, "kvformer_native: no row ", r[i], " in a step of ", B);
    a.select = true;
    a.out_rows = r;
    a.n_out = logits.numel();
  }
  a.table = tp;
  a.table_stride = tables.stride(0);
  a.nblk = nblk;
  a.bs = bs;
  a.lens = lp;
  return run_step(p, tokens, kcs, vcs, kss, vss, a);
}

// ------------------------------------------------------------------ single kernels
int64_t kind_of(const std::string& kind) {
  if (kind == "int8") return kInt8;
  if (kind == "int4") return kInt4;
  TORCH_CHECK(false, "kvformer_native: kind must be 'int8' or 'int4', got '", kind, "'");
}

// x [M, K] (any float dtype) -> x W^T [M, N] fp32 through lin's kernel on path K
Tensor run_one(const Kernels& K, const Lin& lin, Tensor x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == lin.k, "kvformer_native.", op, ": x must be [M, ",
              lin.k, "], got ", x.sizes());
  x = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  Tensor y = at::empty({M, lin.n}, x.options());
  Work wk;
  lin.run(K, x.data_ptr<float>(), M, y.data_ptr<float>(), wk, at::kFloat);
  return y;
}

// x [M, K] (any float dtype) -> x W^T [M, N] fp32 through one quantized layer's kernel
Tensor linear(Tensor x, std::string kind, Tensor w, Tensor s, std::string isa) {
  const Kernels& K = kernels_for(isa);
  Lin lin;
  lin.set(kind_of(kind), w, s, Tensor(), at::kFloat, /*rowsums=*/false);
  return run_one(K, lin, x, "linear");
}

// The weight an int4 layer stands for, [N, K], in fp32 or bf16 (prefill multiplies by it)
Tensor dequant_int4(Tensor q, Tensor dm, bool bf16, std::string isa) {
  const Kernels& K = kernels_for(isa);
  Lin lin;
  lin.set(kInt4, q, dm, Tensor(), at::kFloat, /*rowsums=*/false);
  Tensor out = at::empty({lin.n, lin.k}, q.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* qp = lin.w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(lin.s.data_ptr());
  at::parallel_for(0, lin.n / kvf::kTile, 1, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * kvf::kTile, n1 = t1 * kvf::kTile;
    if (bf16) {
      K.dequant_q4(qp, dp, lin.k, n0, n1, nullptr,
                   reinterpret_cast<uint16_t*>(out.data_ptr()) + n0 * lin.k, lin.k);
    } else {
      K.dequant_q4(qp, dp, lin.k, n0, n1, out.data_ptr<float>() + n0 * lin.k, nullptr, lin.k);
    }
  });
  return out;
}

// x [M, K] -> x W^T [M, N] fp32 through the kb kernel of path `isa` (kernels.h: kb weights
// of `bits` bits, scales kind `scales`, lut uint8 [16] or empty)
Tensor linear_kb(Tensor x, Tensor q, Tensor s, int64_t bits, int64_t scales, int64_t zero,
                 Tensor lut, std::string isa) {
  const Kernels& K = kernels_for(isa);
  Lin lin;
  lin.set_kb(q, s, bits, scales, zero, lut, Tensor(), at::kFloat);
  return run_one(K, lin, x, "linear_kb");
}

// rows [start, end) of the weight kb weights stand for, in fp32 or bf16
Tensor dequant_kb_op(Tensor q, Tensor s, int64_t bits, int64_t scales, int64_t zero, Tensor lut,
                     int64_t start, int64_t end, bool bf16) {
  Lin lin;
  lin.set_kb(q, s, bits, scales, zero, lut, Tensor(), at::kFloat);
  TORCH_CHECK(0 <= start && start <= end && end <= lin.n,
              "kvformer_native.dequant_kb: rows ", start, ":", end, " are not within ", lin.n);
  Tensor out = at::empty({end - start, lin.k},
                         q.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  at::parallel_for(start, end, 16, [&](int64_t n0, int64_t n1) {
    if (bf16) {
      kvf::dequant_kb(lin.kb, n0, n1, nullptr,
                      reinterpret_cast<uint16_t*>(out.data_ptr()) + (n0 - start) * lin.k, lin.k);
    } else {
      kvf::dequant_kb(lin.kb, n0, n1, out.data_ptr<float>() + (n0 - start) * lin.k, nullptr,
                      lin.k);
    }
  });
  return out;
}

// softmax(q K^T) V of query heads q [group, hd] (already scaled) over every row of k, v
// (fp32, bf16, or quantized rows with scales = [k_scale, v_scale]), through one path's
// attention kernel: -> [group, hd]. Paged (table defined): over slots [0, length), slot s in
// row table[s / block] * block + s % block of k, v.
Tensor attend_paged_op(Tensor q, Tensor k, Tensor v, std::vector<Tensor> scales, Tensor table,
                       int64_t block, int64_t length, std::string isa) {
  const Kernels& K = kernels_for(isa);
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && k.dim() == 2 &&
                  k.is_contiguous() && v.is_contiguous() && (scales.empty() || scales.size() == 2),
              "kvformer_native.attend: q fp32 [group, hd], k and v [rows, *], scales [] or "
              "[k_scale, v_scale]");
  q = q.contiguous();
  const int64_t group = q.size(0), hd = q.size(1);
  const bool paged = table.defined();
  const int64_t len = paged ? length : k.size(0);
  if (paged) {
    table = table.to(at::kLong).contiguous();
    TORCH_CHECK(block > 0 && table.dim() == 1 && table.numel() * block >= len &&
                    (table.numel() == 0 || (table.min().item<int64_t>() >= 0 &&
                                            (table.max().item<int64_t>() + 1) * block <= k.size(0))),
                "kvformer_native.attend_paged: a table [blocks] of blocks within k, covering "
                "the length");
  }
  const Rows r = rows_of(k, v, scales.empty() ? Tensor() : scales[0],
                         scales.empty() ? Tensor() : scales[1], hd);
  std::vector<float> scores(group * len), mx(group), sum(group);
  Tensor out = at::empty({group, hd}, q.options());
  kvf::AttendArgs at_;
  at_.q = q.data_ptr<float>();
  at_.group = group;
  at_.hd = hd;
  point_at(at_, r, 0);
  at_.s0 = 0;
  at_.s1 = len;
  if (paged) {
    at_.table = table.data_ptr<int64_t>();
    at_.block = block;
  }
  at_.scores = scores.data();
  at_.max = mx.data();
  at_.sum = sum.data();
  at_.out = out.data_ptr<float>();
  attend_rows(K, at_);
  for (int64_t g = 0; g < group; ++g) out[g].div_(sum[g]);
  return out;
}

Tensor attend_op(Tensor q, Tensor k, Tensor v, std::vector<Tensor> scales, std::string isa) {
  return attend_paged_op(q, k, v, scales, Tensor(), 0, 0, isa);
}

}  // namespace
}  // namespace kvf

TORCH_LIBRARY(kvformer_native, m) {
  using namespace kvf;
  m.def("isas() -> str[]", &isas);
  m.def("threads(str mode) -> str", &threads_op);
  m.def("activations(str mode) -> str", &activations_op);
  m.def("linear(Tensor x, str kind, Tensor w, Tensor s, str isa) -> Tensor", &linear);
  m.def("dequant_int4(Tensor q, Tensor dm, bool bf16, str isa) -> Tensor", &dequant_int4);
  m.def("linear_kb(Tensor x, Tensor q, Tensor s, int bits, int scales, int zero, Tensor lut, "
        "str isa) -> Tensor", &linear_kb);
  m.def("dequant_kb(Tensor q, Tensor s, int bits, int scales, int zero, Tensor lut, int start, "
        "int end, bool bf16) -> Tensor", &dequant_kb_op);
  m.def("profile(bool enable) -> float[]", &profile);
  m.def("plan_new(str[] tensor_names, Tensor[] tensors, str[] int_names, int[] ints, "
        "str[] real_names, float[] reals, str isa) -> int", &plan_new);
  m.def("plan_free(int plan) -> ()", &plan_free);
  m.def("plan_isa(int plan) -> str", &plan_isa);
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor[] scales, str isa) -> Tensor",
        &attend_op);
  m.def("attend_paged(Tensor q, Tensor k, Tensor v, Tensor[] scales, Tensor table, int block, "
        "int length, str isa) -> Tensor", &attend_paged_op);
  m.def("plan_step(int plan, Tensor tokens, Tensor[] k, Tensor[] v, Tensor[] k_scale, "
        "Tensor[] v_scale, int slot, int pos0, Tensor pos, Tensor mask) -> Tensor", &plan_step);
  m.def("plan_step_paged(int plan, Tensor tokens, Tensor[] k, Tensor[] v, Tensor[] k_scale, "
        "Tensor[] v_scale, Tensor tables, Tensor lens, Tensor? logits=None) -> Tensor",
        &plan_step_paged);
}
