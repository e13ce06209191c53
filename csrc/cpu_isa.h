// The instruction sets of gptfast's CPU kernels (csrc/cpu_linear.cpp, csrc/cpu_attention.cpp),
// chosen at run time: each kernel is written once over a small vector struct and compiled
// for AVX-512F, AVX2+FMA (function target attributes) and one lane (plain floats); the ops
// take an `isa` argument (kIsaAuto = the best this CPU has) so the tests can run every path
// the CPU supports against the twins.
#pragma once

#include <cstdint>

namespace gptfast_cpu {

constexpr int64_t kIsaAuto = -1, kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPTFAST_CPU_X86 1
inline bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
inline bool has_avx512() { return __builtin_cpu_supports("avx512f"); }
#else
inline bool has_avx2() { return false; }
inline bool has_avx512() { return false; }
#endif

// The best instruction set of this CPU (looked up once).
inline int64_t best_isa() {
  static const int64_t isa = has_avx512() ? kIsaAvx512 : has_avx2() ? kIsaAvx2 : kIsaScalar;
  return isa;
}

}  // namespace gptfast_cpu
