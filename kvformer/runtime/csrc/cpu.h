// Which kernel paths this CPU runs (cpuid and XCR0 on x86-64, the hwcaps on 64-bit ARM), and
// the kernels of one of them by name: "avx512", "avxvnni", "avx2", "neon" or "scalar". Read
// from the CPU that runs the library, not the one that built it.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace kvf {

// The paths this CPU can run, best first; "scalar" (kernels/scalar.cpp) is always last.
std::vector<std::string> isas();

// The kernels of path `isa` ("": the best this CPU runs); refuses a path it cannot run.
const Kernels& kernels_for(const std::string& isa);

}  // namespace kvf
