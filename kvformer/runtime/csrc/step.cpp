// kvformer's decode step as one torch operator (see kvformer/native.py), and the kernels of
// kernels.h exposed one by one for tests and for the quantized layers of the model.
//
// The step reads a named plan (kvformer/plan.py: StepPlan.named()): tensors, integers and
// reals under names such as "layers.3.qkv.weight", the same description the Python step
// reads. Activations are fp32 throughout; the matmuls, attention and exp go through the
// kernel path chosen for the plan ("avx512", "avxvnni", "avx2", "neon" or "scalar", from what
// the CPU reports).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include "kernels.h"
#include "pool.h"

namespace {

using at::Tensor;
using kvf::Kernels;

// ------------------------------------------------------------------ which paths this CPU runs
#if defined(__x86_64__)
struct X86 {
  // avxvnni: the kernels with 256-bit vpdpbusd run here, in the VEX form (AVX-VNNI,
  // vex_vnni) or in the EVEX form (any CPU with the AVX-512 path)
  bool avx2 = false, vex_vnni = false, avxvnni = false, avx512 = false;
  X86() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const bool fma = c & (1u << 12), osxsave = c & (1u << 27), f16c = c & (1u << 29);
    if (!osxsave) return;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    const bool ymm = (lo & 0x6u) == 0x6u, zmm = (lo & 0xe6u) == 0xe6u;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    avx2 = ymm && fma && f16c && (b & (1u << 5));
    const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30),
               vl = b & (1u << 31), vnni = c & (1u << 11);
    avx512 = avx2 && zmm && f && dq && bw && vl && vnni;
    unsigned a1 = 0, b1, c1, d1;
    const bool leaf1 = a >= 1 && __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    vex_vnni = avx2 && leaf1 && (a1 & (1u << 4));  // AVX-VNNI
    avxvnni = vex_vnni || avx512;
  }
};
const X86& x86() {
  static const X86 cpu;
  return cpu;
}
#endif

#if defined(__aarch64__)
bool arm_dotprod() {  // FEAT_DotProd: sdot/udot
#if defined(__linux__)
  return getauxval(AT_HWCAP) & (1ul << 20);  // HWCAP_ASIMDDP
#elif defined(__APPLE__)
  return true;  // every Apple silicon CPU has it
#else
  return false;
#endif
}
#endif

std::vector<std::string> isas() {  // best first
  std::vector<std::string> out;
#if defined(__x86_64__)
  const X86& cpu = x86();
  if (cpu.avx512) out.push_back("avx512");
  if (cpu.avxvnni) out.push_back("avxvnni");
  if (cpu.avx2) out.push_back("avx2");
#endif
#if defined(__aarch64__)
  static const bool dotprod = arm_dotprod();
  if (dotprod) out.push_back("neon");
#endif
  out.push_back("scalar");
  return out;
}

const Kernels& kernels_for(const std::string& isa) {
  const auto ok = isas();
  const std::string want = isa.empty() ? ok.front() : isa;
  if (std::find(ok.begin(), ok.end(), want) == ok.end()) {
    std::string have;
    for (const auto& s : ok) have += (have.empty() ? "" : ", ") + s;
    TORCH_CHECK(false, "kvformer_native: this CPU cannot run the '", want,
                "' kernels (it can run: ", have, ")");
  }
#if defined(__x86_64__)
  if (want == "avx512") return kvf::avx512_kernels();
  if (want == "avxvnni")
    return x86().vex_vnni ? kvf::avxvnni_kernels() : kvf::avxvnni_evex_kernels();
  if (want == "avx2") return kvf::avx2_kernels();
#endif
#if defined(__aarch64__)
  if (want == "neon") return kvf::neon_kernels();
#endif
  return kvf::scalar_kernels();
}

// ------------------------------------------------------------------ sharing work
// Who runs the pieces of a matmul or of attention: kvformer's own pool (pool.h) or torch's
// OpenMP team (at::parallel_for). The pool only pays when torch's OpenMP threads sleep soon
// after their own work: with libgomp's default (spin ~300,000 times at every barrier) they
// keep the cores for a while after each torch op, and two teams spinning on two cores made
// a batch-1 step 1.6x slower. kvformer sets GOMP_SPINCOUNT=20000 (and KMP_BLOCKTIME=0) when
// it is imported before torch (kvformer/__init__.py); then the pool runs. KVFORMER_THREADS=
// pool|openmp overrides; the op `threads` reads or sets it.
enum class Threads { kPool, kOpenMP };

Threads default_threads() {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    std::string s = v ? v : "";
    for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  const std::string mode = env("KVFORMER_THREADS");
  if (mode == "pool") return Threads::kPool;
  if (mode == "openmp") return Threads::kOpenMP;
  if (env("OMP_WAIT_POLICY") == "passive") return Threads::kPool;
  const std::string spin = env("GOMP_SPINCOUNT");
  if (!spin.empty() && spin.find_first_not_of("0123456789") == std::string::npos &&
      spin.size() <= 6 && std::stol(spin) <= 100000)
    return Threads::kPool;
  return Threads::kOpenMP;
}

std::atomic<Threads>& threads_mode() {
  static std::atomic<Threads> mode{default_threads()};
  return mode;
}

// [0, n) in pieces of `piece` (rounded up to a multiple of `align`). On the pool each piece
// goes to whichever thread is free, and a thread the OS takes away for a while holds back
// at most the piece it is in (pool.h); on OpenMP the same pieces are handed out inside one
// parallel region, whose closing barrier still waits for every thread of the team.
template <typename F>
void parallel_pieces(int64_t n, int64_t piece, int64_t align, const F& fn) {
  piece = std::max<int64_t>(align, (piece + align - 1) / align * align);
  const int64_t pieces = (n + piece - 1) / piece;
  const int threads = at::get_num_threads();
  auto one = [&](int64_t i) { fn(i * piece, std::min(n, (i + 1) * piece)); };
  if (threads_mode().load(std::memory_order_relaxed) == Threads::kPool) {
    kvf::Pool::get().run(pieces, threads, one);
    return;
  }
  if (pieces <= 1 || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < pieces; ++i) one(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, pieces), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < pieces; i = next.fetch_add(1)) one(i);
  });
}

// "pool" or "openmp": set the step's threads to it; "": leave them. Returns the mode now.
std::string threads_op(std::string mode) {
  if (mode == "pool") {
    threads_mode() = Threads::kPool;
  } else if (mode == "openmp") {
    threads_mode() = Threads::kOpenMP;
  } else {
    TORCH_CHECK(mode.empty(), "kvformer_native: threads must be 'pool' or 'openmp', not '",
                mode, "'");
  }
  return threads_mode().load() == Threads::kPool ? "pool" : "openmp";
}

// The piece for n items of `work` each (bytes of weight times rows of x, or any like
// measure): about 8 pieces per thread, to even out a stolen time slice, but not below
// 64 KB of work (handing a piece out costs a shared atomic) nor above an equal share.
int64_t piece_of(int64_t n, int64_t work = 1 << 16) {
  const int64_t threads = at::get_num_threads();
  const int64_t fine = n / (8 * threads), least = ((1 << 16) + work - 1) / work;
  return std::min(std::max({int64_t(1), fine, least}), (n + threads - 1) / threads);
}

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

std::vector<float> floats(const Tensor& t) {
  Tensor f = t.to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// ------------------------------------------------------------------ activation levels
// How many int8 levels activations enter the int4 kernels with (kernels.h, Acts): 2
// ("int16", the default: x's error below bf16's rounding) or 1 ("int8", llama.cpp's Q8_1
// precision: half the integer products, which is what a batch of rows is bound by).
// KVFORMER_ACTIVATIONS=int8|int16 sets it for the process; the op `activations` reads or
// sets it. int8 layers always take two (see Work::prepare).
int default_levels() {
  const char* v = std::getenv("KVFORMER_ACTIVATIONS");
  return v && std::string(v) == "int8" ? 1 : 2;
}

std::atomic<int>& act_levels() {
  static std::atomic<int> levels{default_levels()};
  return levels;
}

// "int8" or "int16": set the activations' levels to it; "": leave them. Returns them now.
std::string activations_op(std::string mode) {
  if (mode == "int8") {
    act_levels() = 1;
  } else if (mode == "int16") {
    act_levels() = 2;
  } else {
    TORCH_CHECK(mode.empty(), "kvformer_native: activations must be 'int8' or 'int16', not '",
                mode, "'");
  }
  return act_levels().load() == 1 ? "int8" : "int16";
}

// Reusable scratch for the quantized activations of one matmul.
struct Work {
  std::vector<int8_t> q1, q2;
  std::vector<float> scale, sum;
  kvf::Acts prepare(const Kernels& K, const float* x, int64_t m, int64_t k, int64_t block) {
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
      const int64_t nb = k / block;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t b = 0; b < nb; ++b) {
          const int8_t* p = q1.data() + i * k + b * block;
          int32_t t = 0;
          for (int64_t j = 0; j < block; ++j) t += p[j];
          sum[i * nb + b] = float(t) * (scale[i * nb + b] * 128.f);
        }
    }
    return a;
  }
};

enum Kind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2 };

struct Lin {
  int64_t kind = kDense, n = 0, k = 0;
  Tensor w, s;  // dense: weight [n, k] in the activations' dtype; int8: q, scale; int4: q, dm
  Tensor bias_t;
  std::vector<float> bias;
  std::vector<int32_t> rowsum;

  // rowsums: precompute sum_k q[n, k] for the kernels that want it (a plan does, once; a
  // single call does not: it would read the weight twice)
  void set(int64_t kind_, Tensor w_, Tensor s_, Tensor bias_, at::ScalarType act,
           bool rowsums = true) {
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

  void read(Named& p, const std::string& name, at::ScalarType act) {
    const int64_t kd = p.integer(name + ".kind");
    Tensor sc = kd == kDense ? Tensor() : p.tensor(name + ".scales");
    Tensor b = p.has(name + ".bias") ? p.tensor(name + ".bias") : Tensor();
    set(kd, p.tensor(name + ".weight"), sc, b, act);
  }

  // y [M, n] = x [M, k] W^T (+ bias), fp32
  void run(const Kernels& K, const float* x, int64_t M, float* y, Work& wk,
           at::ScalarType act) const {
    if (kind == kDense) {
      Tensor xt = at::from_blob(const_cast<float*>(x), {M, k}, at::kFloat).to(act);
      Tensor yt = bias_t.defined() ? at::linear(xt, w, bias_t) : at::linear(xt, w);
      yt = yt.to(at::kFloat).contiguous();
      std::memcpy(y, yt.data_ptr<float>(), M * n * sizeof(float));
      return;
    }
    const kvf::Acts a = wk.prepare(K, x, M, k, kind == kInt4 ? kvf::kBlock : k);
    if (kind == kInt4) {
      const uint8_t* q = w.data_ptr<uint8_t>();
      const uint16_t* dm = reinterpret_cast<const uint16_t*>(s.data_ptr());
      // pieces of an even number of tiles: the kernel takes two tiles per pass
      const int64_t tiles = n / kvf::kTile;
      const int64_t tile_work = M * kvf::kTileBytes * (k / kvf::kBlock);
      parallel_pieces(tiles, piece_of(tiles, tile_work), 2, [&](int64_t t0, int64_t t1) {
        K.gemm_q4(a, q, dm, t0 * kvf::kTile, t1 * kvf::kTile, y, n);
      });
    } else {
      const int8_t* q = w.data_ptr<int8_t>();
      const float* sc = s.data_ptr<float>();
      parallel_pieces(n, piece_of(n, M * k), 64, [&](int64_t n0, int64_t n1) {
        K.gemm_q8(a, q, sc, rowsum.empty() ? nullptr : rowsum.data(), n0, n1, y, n);
      });
    }
    if (!bias.empty())
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < n; ++i) y[m * n + i] += bias[i];
  }
};

struct Norm {
  bool rms = true;
  float eps = 1e-5f;
  std::vector<float> w, b;

  void read(Named& p, const std::string& name) {
    rms = p.integer(name + ".rms") != 0;
    eps = float(p.real(name + ".eps"));
    w = floats(p.tensor(name + ".weight"));
    if (p.has(name + ".bias")) b = floats(p.tensor(name + ".bias"));
  }

  // one row xm [n] -> om [n]
  void apply(const float* xm, int64_t n, float* om) const {
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
      for (int64_t i = 0; i < n; ++i) om[i] = (xm[i] - mu) * inv * w[i] + (b.empty() ? 0.f : b[i]);
    }
  }
};

// f(b) for each row b of a batch, the rows shared between threads (pieces of 2) from 5
// rows up (a norm's serial sum of squares is ~1 us a row: below that, handing out the
// pieces costs more than it saves). Each row's arithmetic is the same either way.
template <typename F>
void each_row(int64_t B, const F& f) {
  if (B <= 4) {
    for (int64_t b = 0; b < B; ++b) f(b);
    return;
  }
  parallel_pieces(B, 2, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

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
  float q_scale = 1.0f;
  std::vector<Layer> layers;
  Norm final_norm;
  Lin head;
  const Kernels* K = nullptr;
};

// ------------------------------------------------------------------ optional timing
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
  P.embed_w = p.tensor("embed.weight").contiguous();
  if (P.embed_kind == kInt8) P.embed_s = p.tensor("embed.scales").to(at::kFloat).contiguous();
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

// rotate-half rotary positions of one head x [hd] (cos/sin rows of its position), times mul
inline void rotate(const float* x, const float* c, const float* s, int64_t hd, float mul,
                   float* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = (x[i] * c[i] - x[i + half] * s[i]) * mul;
  for (int64_t i = half; i < hd; ++i) out[i] = (x[i] * c[i] + x[i - half] * s[i]) * mul;
}

constexpr int64_t kChunk = 256;  // cached slots per attention task

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
             int64_t hd) {
  Rows r;
  const auto t = kc.scalar_type();
  TORCH_CHECK(vc.scalar_type() == t && vc.sizes() == kc.sizes(),
              "kvformer_native: K and V of a layer differ in form");
  if (t == at::kFloat || t == at::kBFloat16) {
    TORCH_CHECK(!ks.defined() && kc.size(-1) == hd,
                "kvformer_native: a float cache has no scales and rows of head_dim numbers");
    r.bits = t == at::kFloat ? 32 : 16;
    r.bytes = hd * (r.bits / 8);
  } else {
    TORCH_CHECK(t == at::kChar || t == at::kByte, "kvformer_native: a KV cache holds fp32, "
                "bf16, int8 or int4 (uint8) rows, not ", t);
    r.bits = t == at::kChar ? 8 : 4;
    r.bytes = r.bits == 8 ? hd : hd / 2;
    r.n_scales = r.bits == 8 ? 1 : hd / 16;
    TORCH_CHECK(r.bits == 8 || hd % 32 == 0, "kvformer_native: int4 rows need head_dim % 32");
    TORCH_CHECK(kc.size(-1) == r.bytes && ks.defined() && vs.defined() &&
                    ks.scalar_type() == at::kBFloat16 && vs.scalar_type() == at::kBFloat16 &&
                    ks.is_contiguous() && vs.is_contiguous() && ks.size(-1) == r.n_scales &&
                    vs.sizes() == ks.sizes() && ks.numel() / r.n_scales == kc.numel() / r.bytes,
                "kvformer_native: int", r.bits, " rows need bf16 scales [..., ", r.n_scales,
                "] beside them, one row each");
    r.ks = reinterpret_cast<uint16_t*>(ks.data_ptr());
    r.vs = reinterpret_cast<uint16_t*>(vs.data_ptr());
  }
  r.k = static_cast<char*>(kc.data_ptr());
  r.v = static_cast<char*>(vc.data_ptr());
  return r;
}

// kvformer/kvquant.py's rounding of scales: the bf16 at or above x >= 0, at or below x
uint16_t bf16_up(float x) {
  uint16_t b = kvf::f32_to_bf16(x);
  if (kvf::bf16_to_f32(b) < x) ++b;
  return b;
}
uint16_t bf16_down(float x) {
  uint16_t b = kvf::f32_to_bf16(x);
  if (kvf::bf16_to_f32(b) > x) b = (b & 0x8000u) ? uint16_t(b + 1) : uint16_t(b - 1);
  return b;
}

// Row `row` of r's K (or V) := x [hd], in r's form: the numbers kvformer/kvquant.py gives
void store_row(const Rows& r, bool value, int64_t row, const float* x, int64_t hd) {
  char* base = (value ? r.v : r.k) + row * r.bytes;
  uint16_t* sc = r.n_scales ? (value ? r.vs : r.ks) + row * r.n_scales : nullptr;
  if (r.bits == 32) {
    std::memcpy(base, x, hd * 4);
  } else if (r.bits == 16) {
    uint16_t* d = reinterpret_cast<uint16_t*>(base);
    for (int64_t i = 0; i < hd; ++i) d[i] = kvf::f32_to_bf16(x[i]);
  } else if (r.bits == 8) {  // x = s q, s = max|x| / 127 rounded up
    float amax = 0.f;
    for (int64_t i = 0; i < hd; ++i) amax = std::max(amax, std::fabs(x[i]));
    sc[0] = bf16_up(amax / 127.f);
    const float s = kvf::bf16_to_f32(sc[0]);
    int8_t* q = reinterpret_cast<int8_t*>(base);
    for (int64_t i = 0; i < hd; ++i)
      q[i] = s > 0.f ? int8_t(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / s)))) : 0;
  } else {  // per group of 32: x = d q + m, m = min rounded down, d = range / 15 rounded up
    uint8_t* q = reinterpret_cast<uint8_t*>(base);
    for (int64_t g = 0; g < hd / 32; ++g) {
      const float* xg = x + 32 * g;
      float lo = xg[0], hi = xg[0];
      for (int i = 1; i < 32; ++i) lo = std::min(lo, xg[i]), hi = std::max(hi, xg[i]);
      sc[2 * g + 1] = bf16_down(lo);
      const float m = kvf::bf16_to_f32(sc[2 * g + 1]);
      sc[2 * g] = bf16_up((hi - m) / 15.f);
      const float d = kvf::bf16_to_f32(sc[2 * g]);
      auto level = [&](float v) {
        return d > 0.f ? int(std::min(15.f, std::max(0.f, std::nearbyint((v - m) / d)))) : 0;
      };
      for (int i = 0; i < 16; ++i) q[16 * g + i] = uint8_t(level(xg[i]) | level(xg[i + 16]) << 4);
    }
  }
}

// Point a kernel's arguments at r's rows from `row` on.
void point_at(kvf::AttendArgs& at, const Rows& r, int64_t row) {
  at.k = r.k + row * r.bytes;
  at.v = r.v + row * r.bytes;
  at.bf16 = r.bits == 16;
  at.bits = r.bits;
  at.k_scale = r.n_scales ? r.ks + row * r.n_scales : nullptr;
  at.v_scale = r.n_scales ? r.vs + row * r.n_scales : nullptr;
}

void attend_rows(const Kernels& K, const kvf::AttendArgs& at) {
  if (at.bits <= 8) {
    K.attend_q(at);
  } else {
    K.attend(at);
  }
}

// RoPE the new token's q and k, write k and v into the cache (contiguous or paged: see
// StepArgs) in the cache's form, attend: q/k/v rows of the B tokens at row strides
// sq/sk/sv -> out [B, nq * hd]
void attention(const Plan& p, const StepArgs& a, const Rows& r, int64_t max_len,
               const float* qs, const float* ks, const float* vs, int64_t sq, int64_t sk,
               int64_t sv, float* out, std::vector<float>& qf) {
  const int64_t hd = p.hd, nq = p.nq, nkv = p.nkv, group = nq / nkv;
  qf.resize(a.B * nq * hd);
  each_row(a.B, [&](int64_t b) {  // rotary positions; the new K/V rows into the cache
    std::vector<float> rot(p.rope ? hd : 0);
    const float *c = nullptr, *s = nullptr;
    if (p.rope) {
      const int64_t ps = a.position(b);
      c = p.cos.data_ptr<float>() + ps * hd;
      s = p.sin.data_ptr<float>() + ps * hd;
    }
    for (int64_t h = 0; h < nq; ++h) {
      const float* x = qs + b * sq + h * hd;
      float* dst = qf.data() + (b * nq + h) * hd;
      if (p.rope) {
        rotate(x, c, s, hd, p.q_scale, dst);
      } else {
        for (int64_t i = 0; i < hd; ++i) dst[i] = x[i] * p.q_scale;
      }
    }
    for (int64_t j = 0; j < nkv; ++j) {
      const int64_t row = a.at(b, j, a.new_slot(b), nkv, max_len, hd) / hd;
      const float* kx = ks + b * sk + j * hd;
      if (p.rope) {
        rotate(kx, c, s, hd, 1.0f, rot.data());
        kx = rot.data();
      }
      store_row(r, false, row, kx, hd);
      store_row(r, true, row, vs + b * sv + j * hd, hd);
    }
  });
  // tasks: (row and KV head, a range of slots), each one kernel call over every slot of
  // its range (a paged row's blocks gathered by its table inside the kernel), giving a
  // partial softmax; a (row, KV head) of one task writes its output at once, those of
  // several are combined after. A row's ranges are kChunk slots, or an eighth of the row
  // when that is more (fewer parts to combine): a function of the row's own length only,
  // so a row's bits are the same on any number of threads and beside any other rows.
  auto chunk_of = [](int64_t len) {
    return std::max(kChunk, ((len + 7) / 8 + 63) / 64 * 64);
  };
  int64_t work = 0, chunk = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    work += a.new_slot(b) + 1;
    chunk = std::max(chunk, chunk_of(a.new_slot(b) + 1));
  }
  struct Task {
    int64_t h, s0, s1;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> first(a.B * nkv + 1);  // tasks of (row, head) h: first[h] .. first[h+1]
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t len = a.new_slot(b) + 1, row_chunk = chunk_of(len);
    for (int64_t j = 0; j < nkv; ++j) {
      first[b * nkv + j] = int64_t(tasks.size());
      for (int64_t s0 = 0; s0 < len; s0 += row_chunk)
        tasks.push_back({b * nkv + j, s0, std::min(len, s0 + row_chunk)});
    }
  }
  first[a.B * nkv] = int64_t(tasks.size());
  const int64_t n_tasks = int64_t(tasks.size()), part = group * (hd + 2);
  std::vector<float> parts(n_tasks * part);
  // a short cache is not worth a second thread
  const int64_t piece = work * nkv * group * hd > (1 << 15) ? piece_of(n_tasks) : n_tasks;
  const Kernels& Kn = *p.K;
  parallel_pieces(n_tasks, piece, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(group * chunk);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const int64_t b = task.h / nkv, j = task.h % nkv;
      const bool whole = first[task.h + 1] - first[task.h] == 1;
      float* pt = parts.data() + t * part;
      kvf::AttendArgs at_;
      at_.q = qf.data() + task.h * group * hd;  // heads of KV head j: j*group .. j*group+group-1
      at_.group = group;
      at_.hd = hd;
      at_.scores = scores.data();
      at_.s0 = task.s0;
      at_.s1 = task.s1;
      if (a.paged()) {  // slot s: row (j * nblk + table[s / bs]) * bs + s % bs of the pool
        point_at(at_, r, j * a.nblk * a.bs);
        at_.table = a.table + b * a.table_stride;
        at_.block = a.bs;
      } else {
        point_at(at_, r, a.at(b, j, 0, nkv, max_len, hd) / hd);
        at_.allowed = a.mask ? a.mask + b * a.ms0 : nullptr;
        at_.allowed_stride = a.ms1;
        at_.own = a.slot;
      }
      at_.max = pt;
      at_.sum = pt + group;
      at_.out = whole ? out + task.h * group * hd : pt + 2 * group;
      attend_rows(Kn, at_);
      if (whole)  // the row's own slot is always attended to: sum > 0
        for (int64_t g = 0; g < group; ++g) {
          const float inv = 1.0f / at_.sum[g];
          for (int64_t i = 0; i < hd; ++i) at_.out[g * hd + i] *= inv;
        }
    }
  });
  for (int64_t h = 0; h < a.B * nkv; ++h) {
    if (first[h + 1] - first[h] == 1) continue;  // written by its task
    for (int64_t g = 0; g < group; ++g) {
      float mx = -INFINITY;
      for (int64_t t = first[h]; t < first[h + 1]; ++t)
        if (parts[t * part + group + g] != 0.f) mx = std::max(mx, parts[t * part + g]);
      float* o = out + (h * group + g) * hd;
      std::fill(o, o + hd, 0.f);
      float den = 0.f;
      for (int64_t t = first[h]; t < first[h + 1]; ++t) {
        const float* pt = parts.data() + t * part;
        if (pt[group + g] == 0.f) continue;
        const float w = std::exp(pt[g] - mx);
        den += w * pt[group + g];
        const float* po = pt + 2 * group + g * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] += w * po[i];
      }
      const float inv = 1.0f / den;
      for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
    }
  }
}

std::shared_ptr<Plan> plan_of(int64_t handle) {
  std::lock_guard<std::mutex> g(registry_mu);
  TORCH_CHECK(handle >= 0 && handle < int64_t(registry.size()) && registry[handle],
              "kvformer_native: no such plan");
  return registry[handle];
}

Tensor run_step(const Plan& p, const Tensor& tokens, const std::vector<Tensor>& kcs,
                const std::vector<Tensor>& vcs, const std::vector<Tensor>& kss,
                const std::vector<Tensor>& vss, const StepArgs& a);

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

Tensor run_step(const Plan& p, const Tensor& tokens, const std::vector<Tensor>& kcs,
                const std::vector<Tensor>& vcs, const std::vector<Tensor>& kss,
                const std::vector<Tensor>& vss, const StepArgs& a) {
  const Kernels& K = *p.K;
  const int64_t B = tokens.size(0), d = p.d, hd = p.hd, nq = p.nq, nkv = p.nkv, f = p.dff;
  const int64_t nqkv = (nq + 2 * nkv) * hd;
  std::vector<float> x(B * d), h(B * d), o(B * d), qkv(B * nqkv), att(B * nq * hd),
      gu(B * 2 * f), act(B * f), qf;
  Work wk;

  const int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = tok[b * tokens.stride(0)];
    TORCH_CHECK(t >= 0 && t < p.embed_w.size(0), "kvformer_native: token id ", t,
                " is outside the vocabulary");
    float* xb = x.data() + b * d;
    if (p.embed_kind == kDense) {
      if (p.embed_w.scalar_type() == at::kBFloat16) {
        const uint16_t* e = reinterpret_cast<const uint16_t*>(p.embed_w.data_ptr()) + t * d;
        for (int64_t i = 0; i < d; ++i) xb[i] = kvf::bf16_to_f32(e[i]);
      } else {
        std::memcpy(xb, p.embed_w.data_ptr<float>() + t * d, d * sizeof(float));
      }
    } else {
      const int8_t* q = p.embed_w.data_ptr<int8_t>() + t * d;
      const float sc = p.embed_s.data_ptr<float>()[t];
      for (int64_t i = 0; i < d; ++i) xb[i] = float(q[i]) * sc;
    }
  }

  // x += o, then norm(x) -> h, row by row (o: the last layer's output, or nothing yet)
  auto residual_norm = [&](const Norm& norm, bool add) {
    each_row(B, [&](int64_t b) {
      float* xb = x.data() + b * d;
      if (add)
        for (int64_t i = 0; i < d; ++i) xb[i] += o[b * d + i];
      norm.apply(xb, d, h.data() + b * d);
    });
  };
  Clock clock;
  for (const Layer& L : p.layers) {
    const int64_t l = &L - p.layers.data();
    residual_norm(L.attn_norm, l > 0);  // the previous layer's MLP output is added here
    clock.lap(kOther);
    const float *qs, *ks, *vs;
    int64_t sq, sk, sv;
    if (L.fused_qkv) {
      L.qkv.run(K, h.data(), B, qkv.data(), wk, p.act);
      qs = qkv.data();
      ks = qs + nq * hd;
      vs = ks + nkv * hd;
      sq = sk = sv = nqkv;
    } else {
      float* base = qkv.data();  // q [B, nq*hd] | k [B, nkv*hd] | v [B, nkv*hd]
      L.q.run(K, h.data(), B, base, wk, p.act);
      L.k.run(K, h.data(), B, base + B * nq * hd, wk, p.act);
      L.v.run(K, h.data(), B, base + B * (nq + nkv) * hd, wk, p.act);
      qs = base;
      ks = base + B * nq * hd;
      vs = base + B * (nq + nkv) * hd;
      sq = nq * hd;
      sk = sv = nkv * hd;
    }
    clock.lap(kMatmul);
    const Rows rows = rows_of(kcs[l], vcs[l], kss.empty() ? Tensor() : kss[l],
                              vss.empty() ? Tensor() : vss[l], hd);
    attention(p, a, rows, a.paged() ? 0 : kcs[l].size(2), qs, ks, vs, sq, sk, sv, att.data(),
              qf);
    clock.lap(kAttention);
    L.wo.run(K, att.data(), B, o.data(), wk, p.act);
    clock.lap(kMatmul);
    residual_norm(L.mlp_norm, true);
    clock.lap(kOther);
    if (p.swiglu) {
      const float *g, *u;
      int64_t gs;
      if (L.fused_gate_up) {
        L.gate_up.run(K, h.data(), B, gu.data(), wk, p.act);
        g = gu.data();
        u = g + f;
        gs = 2 * f;
      } else {
        L.gate.run(K, h.data(), B, gu.data(), wk, p.act);
        L.up.run(K, h.data(), B, gu.data() + B * f, wk, p.act);
        g = gu.data();
        u = g + B * f;
        gs = f;
      }
      clock.lap(kMatmul);
      each_row(B, [&](int64_t b) {  // silu(g) * u = g / (1 + exp(-g)) * u
        float* ab = act.data() + b * f;
        for (int64_t i = 0; i < f; ++i) ab[i] = -g[b * gs + i];
        K.exp(ab, f);
        for (int64_t i = 0; i < f; ++i) ab[i] = g[b * gs + i] / (1.0f + ab[i]) * u[b * gs + i];
      });
    } else {
      L.up.run(K, h.data(), B, gu.data(), wk, p.act);
      clock.lap(kMatmul);
      const float k0 = 0.7978845608028654f;  // sqrt(2 / pi): GELU, tanh approximation
      each_row(B, [&](int64_t b) {
        for (int64_t i = b * f; i < (b + 1) * f; ++i) {
          const float v = gu[i];
          act[i] = 0.5f * v * (1.0f + std::tanh(k0 * (v + 0.044715f * v * v * v)));
        }
      });
    }
    clock.lap(kOther);
    L.down.run(K, act.data(), B, o.data(), wk, p.act);
    clock.lap(kMatmul);
  }
  residual_norm(p.final_norm, !p.layers.empty());
  const float* hf = h.data();
  int64_t R = B;
  if (a.select) {  // the LM head on the rows that want logits only
    R = a.n_out;
    for (int64_t i = 0; i < R; ++i)
      std::memcpy(o.data() + i * d, h.data() + a.out_rows[i] * d, d * sizeof(float));
    hf = o.data();
  }
  clock.lap(kOther);
  // the logits stay fp32 whatever the activations' dtype: rounded to bf16 (a step of 0.125
  // at 25) the best two tokens often tie, and greedy decoding then takes the lower id
  Tensor out = at::empty({R, 1, p.vocab}, at::kFloat);
  if (R > 0) p.head.run(K, hf, R, out.data_ptr<float>(), wk, p.act);
  clock.lap(kHead);
  if (timing) ++timed_steps;
  return out;
}

// ------------------------------------------------------------------ single kernels
int64_t kind_of(const std::string& kind) {
  if (kind == "int8") return kInt8;
  if (kind == "int4") return kInt4;
  TORCH_CHECK(false, "kvformer_native: kind must be 'int8' or 'int4', got '", kind, "'");
}

// x [M, K] (any float dtype) -> x W^T [M, N] fp32 through one quantized layer's kernel
Tensor linear(Tensor x, std::string kind, Tensor w, Tensor s, std::string isa) {
  const Kernels& K = kernels_for(isa);
  Lin lin;
  lin.set(kind_of(kind), w, s, Tensor(), at::kFloat, /*rowsums=*/false);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == lin.k, "kvformer_native.linear: x must be [M, ",
              lin.k, "], got ", x.sizes());
  x = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0);
  Tensor y = at::empty({M, lin.n}, x.options());
  Work wk;
  lin.run(K, x.data_ptr<float>(), M, y.data_ptr<float>(), wk, at::kFloat);
  return y;
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

TORCH_LIBRARY(kvformer_native, m) {
  m.def("isas() -> str[]", &isas);
  m.def("threads(str mode) -> str", &threads_op);
  m.def("activations(str mode) -> str", &activations_op);
  m.def("linear(Tensor x, str kind, Tensor w, Tensor s, str isa) -> Tensor", &linear);
  m.def("dequant_int4(Tensor q, Tensor dm, bool bf16, str isa) -> Tensor", &dequant_int4);
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
