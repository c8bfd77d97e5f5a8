// CPU feature detection: which of kernels.h's paths this CPU runs. x86-64 reads cpuid (and
// XCR0, for the OS's support of the wide registers); 64-bit ARM the kernel's hwcaps for the
// dot-product extension. Every CPU runs the portable path (kernels/scalar.cpp), the fallback.
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include "cpu.h"
#include "kernels.h"

namespace kvf {
namespace {

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
}  // namespace

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

}  // namespace kvf
