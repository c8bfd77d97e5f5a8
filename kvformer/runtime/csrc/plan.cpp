// Reading a named plan into the step's structures (plan.h): each layer's matmuls (their
// weights checked and made contiguous, the int8 ones' row sums precomputed), norms, the
// embedding, the rotary tables and the head; and the plans made, kept by handle and freed.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cpu.h"
#include "kernels.h"
#include "plan.h"

namespace kvf {

// ------------------------------------------------------------------ the named plan
struct Named {
  std::unordered_map<std::string, Tensor> tensors;
  std::unordered_map<std::string, int64_t> ints;
  std::unordered_map<std::string, double> reals;
  std::unordered_set<std::string> used;

  bool has(const std::string& n) const {
    return tensors.count(n) || ints.count(n) || reals.count(n);
  }
  Tensor tensor(const std::string& n) {
    auto it = tensors.find(n);
    TORCH_CHECK(it != tensors.end(), "kvformer_native: the plan has no tensor '", n, "'");
    used.insert(n);
    return it->second;
  }
  int64_t integer(const std::string& n) {
    auto it = ints.find(n);
    TORCH_CHECK(it != ints.end(), "kvformer_native: the plan has no integer '", n, "'");
    used.insert(n);
    return it->second;
  }
  double real(const std::string& n) {
    auto it = reals.find(n);
    TORCH_CHECK(it != reals.end(), "kvformer_native: the plan has no number '", n, "'");
    used.insert(n);
    return it->second;
  }
  void check_all_read() const {
    auto check = [&](const auto& map) {
      for (const auto& kv : map)
        TORCH_CHECK(used.count(kv.first), "kvformer_native: the plan entry '", kv.first,
                    "' is not read by the C++ step (the two sides disagree)");
    };
    check(tensors);
    check(ints);
    check(reals);
  }
};

namespace {

std::vector<float> floats(const Tensor& t) {
  Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

}  // namespace

// rowsums: precompute sum_k q[n, k] for the kernels that want it (a plan does, once; a
// single call does not: it would read the weight twice)
void Lin::set(int64_t kind_, Tensor w_, Tensor s_, Tensor bias_, at::ScalarType act,
              bool rowsums) {
  kind = kind_;
  w = w_.contiguous();
  if (kind == kInt4) {
    TORCH_CHECK(w.dim() == 3 && w.size(2) == kvf::kTileBytes && w.scalar_type() == at::kByte,
                "kvformer_native: int4 weights must be uint8 [N/16, K/32, 256]");
    s = s_.contiguous();
    TORCH_CHECK(s.scalar_type() == at::kHalf && s.numel() == w.size(0) * w.size(1) * 32,
                "kvformer_native: int4 scales must be fp16 [N/16, K/32, 2, 16]");
    n = w.size(0) * kvf::kTile;
    k = w.size(1) * kvf::kBlock;
  } else if (kind == kInt8) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar,
                "kvformer_native: int8 weights must be int8 [N, K]");
    s = s_.to(at::kFloat).contiguous();
    n = w.size(0);
    k = w.size(1);
    TORCH_CHECK(s.numel() == n, "kvformer_native: int8 scales must be [N]");
    if (rowsums) {
      rowsum.resize(n);
      const int8_t* q = w.data_ptr<int8_t>();
      at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          int32_t t = 0;
          for (int64_t j = 0; j < k; ++j) t += q[r * k + j];
          rowsum[r] = t;
        }
      });
    }
  } else {
    w = w.to(act).contiguous();
    n = w.size(0);
    k = w.size(1);
  }
  if (bias_.defined() && bias_.numel()) {
    bias_t = bias_.to(act);
    bias = floats(bias_);
  }
}

void Lin::set_kb(Tensor w_, Tensor s_, int64_t bits, int64_t scales, int64_t zero, Tensor lut,
                 Tensor bias_, at::ScalarType act) {
  kind = kKb;
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8,
              "kvformer_native: kb weights have 4, 5, 6 or 8 bits, not ", bits);
  TORCH_CHECK(scales >= kPair && scales <= kSuperZ,
              "kvformer_native: kb scales kind must be 0 to 4, not ", scales);
  TORCH_CHECK((scales == kScale || scales == kSuperZ) == (zero > 0) && zero >= 0 && zero <= 128,
              "kvformer_native: kb zero (", zero, ") is set exactly for scales kinds 3 and 4");
  w = w_.contiguous();
  s = s_.contiguous();
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == kb_record(int(bits)),
              "kvformer_native: kb weights of ", bits, " bits must be uint8 [N/16, K/32, ",
              kb_record(int(bits)), "]");
  n = w.size(0) * kvf::kTile;
  k = w.size(1) * kvf::kBlock;
  TORCH_CHECK(scales == kPair || scales == kScale || k % 256 == 0,
              "kvformer_native: kb weights with super-block scales need K % 256 == 0");
  TORCH_CHECK(s.scalar_type() == at::kByte &&
                  s.numel() == w.size(0) * w.size(1) * kb_scale_bytes(int(scales)),
              "kvformer_native: kb scales must be ", w.size(0) * w.size(1) *
              kb_scale_bytes(int(scales)), " bytes for this shape, got ", s.numel());
  if (lut.defined() && lut.numel()) {
    TORCH_CHECK(bits == 4 && lut.scalar_type() == at::kByte && lut.numel() == 16,
                "kvformer_native: a kb lut is uint8 [16], for 4-bit indices");
    lut_t = lut.contiguous();
  }
  kb.q = w.data_ptr<uint8_t>();
  kb.s = s.data_ptr<uint8_t>();
  kb.bits = int(bits);
  kb.scales = int(scales);
  kb.lut = lut_t.defined() ? lut_t.data_ptr<uint8_t>() : nullptr;
  kb.k = k;
  kb.zero = int(zero);
  if (bias_.defined() && bias_.numel()) {
    bias_t = bias_.to(act);
    bias = floats(bias_);
  }
}

void Lin::read(Named& p, const std::string& name, at::ScalarType act) {
  const int64_t kd = p.integer(name + ".kind");
  if (kd == kKb) {
    Tensor b = p.has(name + ".bias") ? p.tensor(name + ".bias") : Tensor();
    Tensor lut = p.has(name + ".lut") ? p.tensor(name + ".lut") : Tensor();
    const int64_t zero = p.has(name + ".zero") ? p.integer(name + ".zero") : 0;
    set_kb(p.tensor(name + ".weight"), p.tensor(name + ".scales"), p.integer(name + ".bits"),
           p.integer(name + ".layout"), zero, lut, b, act);
    return;
  }
  Tensor sc = kd == kDense ? Tensor() : p.tensor(name + ".scales");
  Tensor b = p.has(name + ".bias") ? p.tensor(name + ".bias") : Tensor();
  set(kd, p.tensor(name + ".weight"), sc, b, act);
}

void Norm::read(Named& p, const std::string& name) {
  rms = p.integer(name + ".rms") != 0;
  eps = float(p.real(name + ".eps"));
  w = floats(p.tensor(name + ".weight"));
  if (p.has(name + ".bias")) b = floats(p.tensor(name + ".bias"));
}

namespace {

std::mutex registry_mu;
std::vector<std::shared_ptr<Plan>> registry;

}  // namespace

int64_t plan_new(std::vector<std::string> tnames, std::vector<Tensor> ts,
                 std::vector<std::string> inames, std::vector<int64_t> is,
                 std::vector<std::string> rnames, std::vector<double> rs, std::string isa) {
  TORCH_CHECK(tnames.size() == ts.size() && inames.size() == is.size() &&
                  rnames.size() == rs.size(),
              "kvformer_native: plan names and values differ in number");
  Named p;
  for (size_t i = 0; i < ts.size(); ++i) p.tensors[tnames[i]] = ts[i];
  for (size_t i = 0; i < is.size(); ++i) p.ints[inames[i]] = is[i];
  for (size_t i = 0; i < rs.size(); ++i) p.reals[rnames[i]] = rs[i];

  auto plan = std::make_shared<Plan>();
  Plan& P = *plan;
  P.K = &kernels_for(isa);
  P.n_layer = p.integer("n_layer");
  P.d = p.integer("d_model");
  P.hd = p.integer("head_dim");
  P.nq = p.integer("n_head");
  P.nkv = p.integer("n_kv_head");
  P.dff = p.integer("d_ff");
  P.act = p.integer("act_bf16") ? at::kBFloat16 : at::kFloat;
  P.rope = p.integer("rope") != 0;
  P.swiglu = p.integer("swiglu") != 0;
  P.q_scale = float(p.real("q_scale"));
  P.embed_kind = p.integer("embed.kind");
  if (P.embed_kind == kKb) {
    P.embed.read(p, "embed", P.act);
    P.embed_w = P.embed.w;
  } else {
    P.embed_w = p.tensor("embed.weight").contiguous();
    if (P.embed_kind == kInt8) P.embed_s = p.tensor("embed.scales").to(at::kFloat).contiguous();
  }
  if (P.rope) {
    P.cos = p.tensor("rope.cos").to(at::kFloat).contiguous();
    P.sin = p.tensor("rope.sin").to(at::kFloat).contiguous();
  }
  for (int64_t l = 0; l < P.n_layer; ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    Layer L;
    L.attn_norm.read(p, pre + "attn_norm");
    L.fused_qkv = p.has(pre + "qkv.kind");
    if (L.fused_qkv) {
      L.qkv.read(p, pre + "qkv", P.act);
    } else {
      L.q.read(p, pre + "q", P.act);
      L.k.read(p, pre + "k", P.act);
      L.v.read(p, pre + "v", P.act);
    }
    L.wo.read(p, pre + "wo", P.act);
    L.mlp_norm.read(p, pre + "mlp_norm");
    L.fused_gate_up = p.has(pre + "gate_up.kind");
    if (L.fused_gate_up) {
      L.gate_up.read(p, pre + "gate_up", P.act);
    } else {
      if (P.swiglu) L.gate.read(p, pre + "gate", P.act);
      L.up.read(p, pre + "up", P.act);
    }
    L.down.read(p, pre + "down", P.act);
    P.layers.push_back(std::move(L));
  }
  P.final_norm.read(p, "final_norm");
  P.head.read(p, "head", P.act);
  P.vocab = P.head.n;
  p.check_all_read();
  std::lock_guard<std::mutex> g(registry_mu);
  registry.push_back(std::move(plan));
  return int64_t(registry.size()) - 1;
}

void plan_free(int64_t handle) {
  std::lock_guard<std::mutex> g(registry_mu);
  if (handle >= 0 && handle < int64_t(registry.size())) registry[handle].reset();
}

std::string plan_isa(int64_t handle) {
  std::lock_guard<std::mutex> g(registry_mu);
  TORCH_CHECK(handle >= 0 && handle < int64_t(registry.size()) && registry[handle],
              "kvformer_native: no such plan");
  return registry[handle]->K->name;
}

std::shared_ptr<Plan> plan_of(int64_t handle) {
  std::lock_guard<std::mutex> g(registry_mu);
  TORCH_CHECK(handle >= 0 && handle < int64_t(registry.size()) && registry[handle],
              "kvformer_native: no such plan");
  return registry[handle];
}

}  // namespace kvf
