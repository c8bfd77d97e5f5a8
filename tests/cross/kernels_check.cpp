// A stand-alone driver of kvformer's kernels with no torch: the portable ones
// (kernels/scalar.cpp) and, built with -DKVF_CHECK_NEON, the NEON ones (kernels/neon.cpp),
// so that tests/test_cross.py can build them for another architecture (aarch64), run them
// under user-mode emulation and compare what they compute with torch on this machine.
//
//   kernels_check OP DIR [PATH]   reads DIR/meta.txt (integers) and DIR/*.bin, writes
//                                 DIR/y.bin; PATH is scalar (the default) or neon
//
// OP and its inputs (raw little-endian arrays):
//   int4    meta: m k n        x.bin f32 [m,k], q.bin u8 (kvformer int4 layout), dm.bin fp16
//   int8    meta: m k n        x.bin f32 [m,k], q.bin s8 [n,k], scale.bin f32 [n]
//   unpack  meta: k n          q.bin, dm.bin                 -> y.bin f32 [n,k]
//   attend  meta: group hd len q.bin f32 [group,hd] (scaled), k.bin, v.bin f32 [len,hd]
//                              -> y.bin f32 [group,hd] = softmax(q k^T) v
//   attend_q meta: group hd len bits   q.bin f32 [group,hd] (scaled); k.bin, v.bin: int8
//                              [len,hd] (bits 8) or uint8 [len,hd/2] (bits 4) rows;
//                              ks.bin, vs.bin: bf16 scales [len,1] or [len,hd/16]
//                              -> y.bin f32 [group,hd] = softmax(q k^T) v (kernels.h layouts)
//   kb      meta: m k n bits scales has_lut zero [levels]   x.bin f32 [m,k], q.bin u8 records,
//                              s.bin u8 scales, lut.bin u8 [16] (has_lut) (kernels.h's kb
//                              layout) -> y.bin f32 [m,n]; x enters with `levels` (2, the
//                              default, or 1) int8 levels, prepared as Work::prepare (step.h)
//                              prepares it for kb weights
//   exp     meta: n            x.bin f32 [n]                 -> y.bin f32 [n]
// attend and attend_q take three more integers for a paged row: rows block n_table, with
// k, v (and the scales) of `rows` rows and table.bin int64 [n_table]: slot s of the len is
// row table[s / block] * block + s % block
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "../../kvformer/runtime/csrc/kernels.h"

namespace {

std::string dir;

template <typename T>
std::vector<T> load(const char* name, size_t count) {
  std::vector<T> out(count);
  std::ifstream in(dir + "/" + name, std::ios::binary);
  in.read(reinterpret_cast<char*>(out.data()), std::streamsize(count * sizeof(T)));
  if (!in) {
    std::fprintf(stderr, "kernels_check: cannot read %zu items from %s\n", count, name);
    std::exit(2);
  }
  return out;
}

void save(const std::vector<float>& y) {
  std::ofstream out(dir + "/y.bin", std::ios::binary);
  out.write(reinterpret_cast<const char*>(y.data()), std::streamsize(y.size() * sizeof(float)));
}

// The activations of one matmul as every kernel path prepares them.
struct Prepared {
  std::vector<int8_t> q1, q2;
  std::vector<float> scale, sum;
  kvf::Acts acts;
  Prepared(const kvf::Kernels& K, const std::vector<float>& x, int64_t m, int64_t k,
           int64_t block)
      : q1(m * k), q2(m * k), scale(m * (k / block)), sum(m * (k / block)) {
    acts.m = m;
    acts.k = k;
    acts.block = block;
    K.quantize(x.data(), acts, q1.data(), q2.data(), scale.data(), sum.data());
  }

  // What Work::prepare (step.h) does after quantizing for kb weights: with one level, q2 is
  // zeroed; the sums become those of the x the products see, scale * (128 q1 + q2), per
  // block of 32, or for kSuper16 (halves) per 16 columns into hsum.
  std::vector<float> hsum;
  void for_kb(int levels, bool halves) {
    const int64_t m = acts.m, k = acts.k, block = acts.block;
    acts.levels = levels;
    if (levels == 1) std::fill(q2.begin(), q2.end(), int8_t(0));
    const int64_t per = halves ? 16 : block, np_ = k / per;
    if (halves) hsum.resize(m * np_);
    float* out = halves ? hsum.data() : sum.data();
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < np_; ++g) {
        const int64_t o = i * k + g * per;
        int32_t t = 0;
        for (int64_t j = 0; j < per; ++j) t += 128 * q1[o + j] + q2[o + j];
        out[i * np_ + g] = float(t) * scale[i * (k / block) + g * per / block];
      }
    if (halves) acts.hsum = hsum.data();
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 && argc != 4) {
    std::fprintf(stderr,
                 "usage: kernels_check int4|int8|unpack|attend|attend_q|kb|exp DIR [PATH]\n");
    return 2;
  }
  const std::string op = argv[1], path = argc == 4 ? argv[3] : "scalar";
  dir = argv[2];
  std::ifstream meta(dir + "/meta.txt");
  std::vector<int64_t> v;
  for (int64_t i; meta >> i;) v.push_back(i);
  const kvf::Kernels* kernels = path == "scalar" ? &kvf::scalar_kernels() : nullptr;
#if defined(KVF_CHECK_NEON)
  if (path == "neon") kernels = &kvf::neon_kernels();
#endif
  if (!kernels) {
    std::fprintf(stderr, "kernels_check: this build has no %s kernels\n", path.c_str());
    return 2;
  }
  const kvf::Kernels& K = *kernels;

  if (op == "int4" && v.size() == 3) {
    const int64_t m = v[0], k = v[1], n = v[2];
    const auto x = load<float>("x.bin", m * k);
    const auto q = load<uint8_t>("q.bin", n * k / 2);
    const auto dm = load<uint16_t>("dm.bin", n / kvf::kTile * (k / kvf::kBlock) * 2 * kvf::kTile);
    Prepared p(K, x, m, k, kvf::kBlock);
    std::vector<float> y(m * n);
    K.gemm_q4(p.acts, q.data(), dm.data(), 0, n, y.data(), n);
    save(y);
  } else if (op == "int8" && v.size() == 3) {
    const int64_t m = v[0], k = v[1], n = v[2];
    const auto x = load<float>("x.bin", m * k);
    const auto q = load<int8_t>("q.bin", n * k);
    const auto scale = load<float>("scale.bin", n);
    std::vector<int32_t> rowsum(n, 0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < k; ++j) rowsum[r] += q[r * k + j];
    Prepared p(K, x, m, k, k);
    std::vector<float> y(m * n);
    K.gemm_q8(p.acts, q.data(), scale.data(), rowsum.data(), 0, n, y.data(), n);
    save(y);
  } else if (op == "unpack" && v.size() == 2) {
    const int64_t k = v[0], n = v[1];
    const auto q = load<uint8_t>("q.bin", n * k / 2);
    const auto dm = load<uint16_t>("dm.bin", n / kvf::kTile * (k / kvf::kBlock) * 2 * kvf::kTile);
    std::vector<float> y(n * k);
    K.dequant_q4(q.data(), dm.data(), k, 0, n, y.data(), nullptr, k);
    save(y);
  } else if (op == "attend" && (v.size() == 3 || v.size() == 6)) {
    const int64_t group = v[0], hd = v[1], len = v[2], rows = v.size() == 6 ? v[3] : len;
    const auto q = load<float>("q.bin", group * hd);
    const auto k = load<float>("k.bin", rows * hd);
    const auto val = load<float>("v.bin", rows * hd);
    const auto table = v.size() == 6 ? load<int64_t>("table.bin", v[5]) : std::vector<int64_t>();
    std::vector<float> scores(group * len), mx(group), sum(group), out(group * hd);
    kvf::AttendArgs a;
    a.q = q.data();
    a.group = group;
    a.hd = hd;
    a.k = k.data();
    a.v = val.data();
    a.s0 = 0;
    a.s1 = len;
    if (!table.empty()) {
      a.table = table.data();
      a.block = v[4];
    }
    a.scores = scores.data();
    a.max = mx.data();
    a.sum = sum.data();
    a.out = out.data();
    K.attend(a);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < hd; ++i) out[g * hd + i] /= sum[g];
    save(out);
  } else if (op == "attend_q" && (v.size() == 4 || v.size() == 7) && (v[3] == 8 || v[3] == 4)) {
    const int64_t group = v[0], hd = v[1], len = v[2], bits = v[3];
    const int64_t rows = v.size() == 7 ? v[4] : len;
    const int64_t row = bits == 8 ? hd : hd / 2, ns = bits == 8 ? 1 : hd / 16;
    const auto q = load<float>("q.bin", group * hd);
    const auto k = load<uint8_t>("k.bin", rows * row);
    const auto val = load<uint8_t>("v.bin", rows * row);
    const auto ks = load<uint16_t>("ks.bin", rows * ns);
    const auto vs = load<uint16_t>("vs.bin", rows * ns);
    const auto table = v.size() == 7 ? load<int64_t>("table.bin", v[6]) : std::vector<int64_t>();
    std::vector<float> scores(group * len), mx(group), sum(group), out(group * hd);
    kvf::AttendArgs a;
    a.q = q.data();
    a.group = group;
    a.hd = hd;
    a.k = k.data();
    a.v = val.data();
    a.bits = int(bits);
    a.k_scale = ks.data();
    a.v_scale = vs.data();
    a.s0 = 0;
    a.s1 = len;
    if (!table.empty()) {
      a.table = table.data();
      a.block = v[5];
    }
    a.scores = scores.data();
    a.max = mx.data();
    a.sum = sum.data();
    a.out = out.data();
    K.attend_q(a);
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < hd; ++i) out[g * hd + i] /= sum[g];
    save(out);
  } else if (op == "kb" && (v.size() == 7 || v.size() == 8) &&
             (v[3] == 4 || v[3] == 5 || v[3] == 6 || v[3] == 8) && v[4] >= 0 && v[4] <= 4 &&
             (v.size() == 7 || v[7] == 1 || v[7] == 2)) {
    const int64_t m = v[0], k = v[1], n = v[2];
    const int bits = int(v[3]), scales = int(v[4]), levels = v.size() == 8 ? int(v[7]) : 2;
    const int64_t records = n / kvf::kTile * (k / kvf::kBlock);
    const auto x = load<float>("x.bin", m * k);
    const auto q = load<uint8_t>("q.bin", records * kvf::kb_record(bits));
    const auto s = load<uint8_t>("s.bin", records * kvf::kb_scale_bytes(scales));
    const auto lut = v[5] ? load<uint8_t>("lut.bin", 16) : std::vector<uint8_t>();
    kvf::KbWeights w;
    w.q = q.data();
    w.s = s.data();
    w.bits = bits;
    w.scales = scales;
    w.lut = lut.empty() ? nullptr : lut.data();
    w.k = k;
    w.zero = int(v[6]);
    Prepared p(K, x, m, k, kvf::kBlock);
    p.for_kb(levels, scales == kvf::kSuper16);
    std::vector<float> y(m * n);
    K.gemm_kb(p.acts, w, 0, n, y.data(), n);
    save(y);
  } else if (op == "exp" && v.size() == 1) {
    auto x = load<float>("x.bin", v[0]);
    K.exp(x.data(), v[0]);
    save(x);
  } else {
    std::fprintf(stderr, "kernels_check: unknown op %s or wrong meta.txt\n", op.c_str());
    return 2;
  }
  return 0;
}
