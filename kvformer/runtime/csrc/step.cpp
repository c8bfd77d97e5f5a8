// kvformer's decode step: one token per row through every layer (the matmuls, norms, rotary
// positions, the new K/V rows written into the cache, attention, the MLP) and the LM head,
// on the structures plan.cpp reads from a named plan. Activations are fp32 throughout; the
// matmuls, attention and exp go through the kernel path chosen for the plan ("avx512",
// "avxvnni", "avx2", "neon" or "scalar", from what the CPU reports: cpu.cpp), their pieces
// shared between threads as threads.h does. ops.cpp makes it a torch operator.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "plan.h"
#include "step.h"
#include "threads.h"

namespace kvf {
namespace {

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

}  // namespace

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

// y [M, n] = x [M, k] W^T (+ bias), fp32
void Lin::run(const Kernels& K, const float* x, int64_t M, float* y, Work& wk,
              at::ScalarType act) const {
  if (kind == kDense) {
    Tensor xt = at::from_blob(const_cast<float*>(x), {M, k}, at::kFloat).to(act);
    Tensor yt = bias_t.defined() ? at::linear(xt, w, bias_t) : at::linear(xt, w);
    yt = yt.to(at::kFloat).contiguous();
    std::memcpy(y, yt.data_ptr<float>(), M * n * sizeof(float));
    return;
  }
  const kvf::Acts a = wk.prepare(K, x, M, k, kind == kInt8 ? k : kvf::kBlock, kind == kKb,
                                 kind == kKb && kb.scales == kvf::kSuper16);
  if (kind == kKb) {
    const int64_t tiles = n / kvf::kTile;
    const int64_t tile_work = M * kvf::kb_record(kb.bits) * (k / kvf::kBlock);
    parallel_pieces(tiles, piece_of(tiles, tile_work), 2, [&](int64_t t0, int64_t t1) {
      K.gemm_kb(a, kb, t0 * kvf::kTile, t1 * kvf::kTile, y, n);
    });
  } else if (kind == kInt4) {
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

// one row xm [n] -> om [n]
void Norm::apply(const float* xm, int64_t n, float* om) const {
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

namespace {

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

}  // namespace

std::vector<double> profile(bool enable) {
  std::vector<double> out(part_ns, part_ns + kParts);
  out.push_back(double(timed_steps));
  timing = enable;
  std::fill(part_ns, part_ns + kParts, 0.0);
  timed_steps = 0;
  return out;
}

namespace {

// rotate-half rotary positions of one head x [hd] (cos/sin rows of its position), times mul
inline void rotate(const float* x, const float* c, const float* s, int64_t hd, float mul,
                   float* out) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = (x[i] * c[i] - x[i + half] * s[i]) * mul;
  for (int64_t i = half; i < hd; ++i) out[i] = (x[i] * c[i] + x[i - half] * s[i]) * mul;
}

constexpr int64_t kChunk = 256;  // cached slots per attention task

}  // namespace

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

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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
    const int64_t vocab = p.embed_kind == kKb ? p.embed.n : p.embed_w.size(0);
    TORCH_CHECK(t >= 0 && t < vocab, "kvformer_native: token id ", t,
                " is outside the vocabulary");
    float* xb = x.data() + b * d;
    if (p.embed_kind == kKb) {
      kvf::dequant_kb(p.embed.kb, t, t + 1, xb, nullptr, d);
    } else if (p.embed_kind == kDense) {
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

}  // namespace kvf
