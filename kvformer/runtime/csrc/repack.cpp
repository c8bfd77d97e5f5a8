// GGUF blocks -> kb weights (kernels.h's layout), in one pass over the file's bytes: what
// kvformer/formats/gguf/blocks.py does with numpy (and the tests compare the two), done here
// so that loading a model costs about a copy of its bytes. Only bits move: each type's
// integers become u and its fp16 scales are copied; the offsets ggml implies (-8 d, -16 d,
// -128 d) stay implied (the kScale / kSuperZ kinds' zero).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace kvf {
namespace {

enum Type : int64_t {
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14,
  IQ4_NL = 20, IQ4_XS = 23
};

struct Form {
  int per, size, bits, scales;
};

Form form_of(int64_t type) {  // blocks.py's _FORM
  switch (type) {
    case Q4_0: return {32, 18, 4, kScale};
    case Q4_1: return {32, 20, 4, kPair};
    case Q5_0: return {32, 22, 5, kScale};
    case Q5_1: return {32, 24, 5, kPair};
    case Q8_0: return {32, 34, 8, kScale};
    case IQ4_NL: return {32, 18, 4, kScale};
    case Q4_K: return {256, 144, 4, kSuper};
    case Q5_K: return {256, 176, 5, kSuper};
    case Q6_K: return {256, 210, 6, kSuper16};
    case IQ4_XS: return {256, 136, 4, kSuperZ};
    default: TORCH_CHECK(false, "kvformer_native.kb_repack: ggml type ", type, " has no kb form");
  }
}

inline uint16_t rd16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and mins
inline void k_scales(const uint8_t* s, int8_t* sc, int8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = int8_t(s[j] & 63);
    mn[j] = int8_t(s[4 + j] & 63);
    sc[4 + j] = int8_t((s[8 + j] & 15) | ((s[j] >> 2) & 48));
    mn[4 + j] = int8_t((s[8 + j] >> 4) | ((s[4 + j] >> 2) & 48));
  }
}

// One row's stored blocks -> its u [k] and scale fields:
//   pair: D, M per 32 (fp16 bits); scale: D per 32; super: d, dmin per 256, sc, mn per 32;
//   superZ: d per 256, sc per 32; super16: d per 256, sc per 16.
struct RowOut {
  uint8_t* u;
  uint16_t *D, *M, *d, *dmin;
  int8_t *sc, *mn;
};

void decode_row(int64_t type, const uint8_t* row, int64_t k, const RowOut& o) {
  const Form f = form_of(type);
  const int64_t nb = k / f.per;
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = row + i * f.size;
    uint8_t* u = o.u + i * f.per;
    switch (type) {
      case Q4_0: case Q4_1: case IQ4_NL: {
        const uint8_t* qs = b + (type == Q4_1 ? 4 : 2);
        for (int j = 0; j < 16; ++j) {
          u[j] = qs[j] & 15;
          u[16 + j] = qs[j] >> 4;
        }
        o.D[i] = rd16(b);
        if (type == Q4_1) o.M[i] = rd16(b + 2);
        break;
      }
      case Q5_0: case Q5_1: {
        const int o5 = type == Q5_1 ? 4 : 2;
        uint32_t qh;
        std::memcpy(&qh, b + o5, 4);
        const uint8_t* qs = b + o5 + 4;
        for (int j = 0; j < 16; ++j) {
          u[j] = uint8_t((qs[j] & 15) | (((qh >> j) & 1) << 4));
          u[16 + j] = uint8_t((qs[j] >> 4) | (((qh >> (16 + j)) & 1) << 4));
        }
        o.D[i] = rd16(b);
        if (type == Q5_1) o.M[i] = rd16(b + 2);
        break;
      }
      case Q8_0:
        for (int j = 0; j < 32; ++j) u[j] = uint8_t(b[2 + j] ^ 0x80);
        o.D[i] = rd16(b);
        break;
      case Q4_K: case Q5_K: {
        o.d[i] = rd16(b);
        o.dmin[i] = rd16(b + 2);
        k_scales(b + 4, o.sc + 8 * i, o.mn + 8 * i);
        const uint8_t* qh = b + 16;
        const uint8_t* qs = b + (type == Q5_K ? 48 : 16);
        for (int c = 0; c < 4; ++c)  // 32 bytes: sub-block 2c (low nibbles), 2c + 1 (high)
          for (int j = 0; j < 32; ++j) {
            uint8_t lo = qs[32 * c + j] & 15, hi = qs[32 * c + j] >> 4;
            if (type == Q5_K) {
              lo |= ((qh[j] >> (2 * c)) & 1) << 4;
              hi |= ((qh[j] >> (2 * c + 1)) & 1) << 4;
            }
            u[64 * c + j] = lo;
            u[64 * c + 32 + j] = hi;
          }
        break;
      }
      case Q6_K: {
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        for (int half = 0; half < 2; ++half)  // 128 values per half
          for (int j = 0; j < 32; ++j) {
            const uint8_t* l = ql + 64 * half;
            const uint8_t h = qh[32 * half + j];
            uint8_t* v = u + 128 * half;
            v[j] = uint8_t((l[j] & 15) | ((h & 3) << 4));
            v[32 + j] = uint8_t((l[32 + j] & 15) | (((h >> 2) & 3) << 4));
            v[64 + j] = uint8_t((l[j] >> 4) | (((h >> 4) & 3) << 4));
            v[96 + j] = uint8_t((l[32 + j] >> 4) | (((h >> 6) & 3) << 4));
          }
        std::memcpy(o.sc + 16 * i, b + 192, 16);
        o.d[i] = rd16(b + 208);
        break;
      }
      case IQ4_XS: {
        o.d[i] = rd16(b);
        const uint16_t sh = rd16(b + 2);
        for (int j = 0; j < 8; ++j) {
          const int lo = (b[4 + j / 2] >> (4 * (j % 2))) & 15, hi = (sh >> (2 * j)) & 3;
          o.sc[8 * i + j] = int8_t((lo | (hi << 4)) - 32);
        }
        const uint8_t* qs = b + 8;
        for (int j = 0; j < 8; ++j)
          for (int t = 0; t < 16; ++t) {
            u[32 * j + t] = qs[16 * j + t] & 15;
            u[32 * j + 16 + t] = qs[16 * j + t] >> 4;
          }
        break;
      }
      default: break;
    }
  }
}

bool finite16(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }

}  // namespace

at::Tensor out_or_new(const std::optional<at::Tensor>& out, at::IntArrayRef shape,
                      const at::Tensor& like, const char* what) {
  if (!out.has_value()) {
    return at::empty(shape, like.options());
  }
  TORCH_CHECK(out->scalar_type() == at::kByte && out->is_contiguous() &&
                  out->sizes() == shape,
              "kvformer_native.kb_repack: ", what, " must be a contiguous uint8 tensor of shape ",
              shape, ", got ", out->sizes());
  return *out;
}

// raw: the stored bytes of a GGUF matrix [n, k] of ggml type `type` (rows of blocks),
// n % 16 == 0 -> (records uint8 [n/16, k/32, kb_record], scales uint8 [n/16, ...]).
// Into q_out / s_out where given (a fused layer's row slices: its parts land side by side
// and are never concatenated), else into new tensors.
std::tuple<at::Tensor, at::Tensor> kb_repack(at::Tensor raw, int64_t type, int64_t n,
                                             int64_t k, std::optional<at::Tensor> q_out,
                                             std::optional<at::Tensor> s_out) {
  const Form f = form_of(type);
  TORCH_CHECK(n > 0 && n % 16 == 0 && k > 0 && k % f.per == 0,
              "kvformer_native.kb_repack: a matrix of ", n, " x ", k, " does not fit the kb "
              "layout (rows in tiles of 16, columns in blocks of ", f.per, ")");
  raw = raw.contiguous();
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.numel() == n * (k / f.per) * f.size,
              "kvformer_native.kb_repack: ", raw.numel(), " bytes for a ", n, " x ", k,
              " matrix of type ", type, ", which has ", n * (k / f.per) * f.size);
  const int64_t T = n / 16, KB = k / 32, rec = kb_record(f.bits);
  at::Tensor q = out_or_new(q_out, {T, KB, rec}, raw, "q_out");
  at::Tensor s = out_or_new(s_out, {T, KB * kb_scale_bytes(f.scales)}, raw, "s_out");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  uint8_t* sp = s.data_ptr<uint8_t>();
  const int64_t row_bytes = (k / f.per) * f.size, ns = k / 256;
  std::atomic<int64_t> bad{-1};
  // Tiles are handed out a few at a time, not split in equal halves up front: on a shared
  // machine one thread may be descheduled, and the others then take its share instead of
  // waiting for it at the end.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(1, T / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<uint8_t> u(16 * k);
    std::vector<uint16_t> D(16 * KB), M(16 * KB), d(16 * (ns + 1)), dm(16 * (ns + 1));
    std::vector<int8_t> sc(16 * (k / 16)), mn(16 * KB);
    for (int64_t c0 = next.fetch_add(chunk); c0 < T; c0 = next.fetch_add(chunk))
    for (int64_t t = c0; t < std::min(T, c0 + chunk); ++t) {
      for (int r = 0; r < 16; ++r) {
        RowOut o{u.data() + r * k, D.data() + r * KB, M.data() + r * KB,
                 d.data() + r * (ns + 1), dm.data() + r * (ns + 1),
                 sc.data() + r * (k / 16), mn.data() + r * KB};
        decode_row(type, src + (t * 16 + r) * row_bytes, k, o);
      }
      for (int64_t b = 0; b < KB; ++b) {  // the records (kernels.h)
        uint8_t* out = qp + (t * KB + b) * rec;
        auto at_ = [&](int r, int c) { return u[r * k + 32 * b + c]; };
        if (f.bits == 8) {
          for (int s_ = 0; s_ < 4; ++s_)
            for (int h = 0; h < 2; ++h)
              for (int r = 0; r < 16; ++r)
                for (int j = 0; j < 4; ++j)
                  out[128 * s_ + 64 * h + 4 * r + j] = at_(r, 8 * s_ + 4 * h + j);
          continue;
        }
        for (int s_ = 0; s_ < 4; ++s_)
          for (int r = 0; r < 16; ++r)
            for (int j = 0; j < 4; ++j)
              out[64 * s_ + 4 * r + j] =
                  uint8_t((at_(r, 8 * s_ + j) & 15) | ((at_(r, 8 * s_ + 4 + j) & 15) << 4));
        for (int p = 0; p < f.bits - 4; ++p) {
          // bit 4 + p of row r's 32 columns as one mask; word 2s + h (columns 8s + 4h ..
          // + 3) takes its nibble 2s + h at bits 4r .. 4r + 3
          uint32_t row_bits[16];
          for (int r = 0; r < 16; ++r) {
            const uint8_t* ur = u.data() + r * k + 32 * b;
            uint32_t m = 0;
            for (int g = 0; g < 4; ++g) {  // 8 columns: their bits gathered by one multiply
              uint64_t x;
              std::memcpy(&x, ur + 8 * g, 8);
              x = (x >> (4 + p)) & 0x0101010101010101ull;  // bit 8i = column 8g + i's bit
              m |= uint32_t((x * 0x0102040810204080ull) >> 56) << (8 * g);  // bit i at 56 + i
            }
            row_bits[r] = m;
          }
          for (int w = 0; w < 8; ++w) {
            uint64_t word = 0;
            for (int r = 0; r < 16; ++r) word |= uint64_t((row_bits[r] >> (4 * w)) & 15) << (4 * r);
            std::memcpy(out + 256 + 64 * p + 8 * w, &word, 8);
          }
        }
      }
      uint8_t* so = sp + t * KB * kb_scale_bytes(f.scales);
      if (f.scales == kPair || f.scales == kScale) {
        const int64_t per = f.scales == kPair ? 64 : 32;
        for (int64_t b = 0; b < KB; ++b) {
          uint16_t* o16 = reinterpret_cast<uint16_t*>(so + per * b);
          for (int r = 0; r < 16; ++r) {
            o16[r] = D[r * KB + b];
            if (f.scales == kPair) o16[16 + r] = M[r * KB + b];
          }
        }
      } else {
        const int64_t recs = kb_super_bytes(f.scales), head = f.scales == kSuper ? 64 : 32;
        for (int64_t g = 0; g < ns; ++g) {
          uint8_t* o = so + g * recs;
          uint16_t* o16 = reinterpret_cast<uint16_t*>(o);
          for (int r = 0; r < 16; ++r) {
            o16[r] = d[r * (ns + 1) + g];
            if (f.scales == kSuper) o16[16 + r] = dm[r * (ns + 1) + g];
          }
          int8_t* body = reinterpret_cast<int8_t*>(o + head);
          for (int j = 0; j < 8; ++j)
            for (int r = 0; r < 16; ++r) {
              if (f.scales == kSuper) {
                body[32 * j + r] = sc[r * (k / 16) + 8 * g + j];
                body[32 * j + 16 + r] = mn[r * KB + 8 * g + j];
              } else if (f.scales == kSuperZ) {
                body[16 * j + r] = sc[r * (k / 16) + 8 * g + j];
              } else {
                body[32 * j + r] = sc[r * (k / 16) + 16 * g + 2 * j];
                body[32 * j + 16 + r] = sc[r * (k / 16) + 16 * g + 2 * j + 1];
              }
            }
        }
      }
      // the fp16 scales must be numbers (a corrupt file's inf or NaN is refused)
      const int64_t nsb = KB * kb_scale_bytes(f.scales);
      for (int64_t i = 0; i + 1 < nsb; i += 2) {
        if (f.scales != kPair && f.scales != kScale) {
          const int64_t off = i % kb_super_bytes(f.scales);
          if (off >= (f.scales == kSuper ? 64 : 32)) continue;  // int8 fields
        }
        if (!finite16(rd16(so + i))) {
          bad = t * 16;
          return;
        }
      }
    }
  });
  TORCH_CHECK(bad.load() < 0, "kvformer_native.kb_repack: scales that are not finite near "
              "row ", bad.load(), "; the file is corrupt");
  return {q, s};
}

}  // namespace kvf

TORCH_LIBRARY_FRAGMENT(kvformer_native, m) {
  m.def("kb_repack(Tensor raw, int type, int n, int k, Tensor? q_out=None, Tensor? s_out=None) "
        "-> (Tensor, Tensor)", &kvf::kb_repack);
}
