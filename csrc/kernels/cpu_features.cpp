#include "kernels/cpu_features.h"

#include "kernels/mlp_kernels.h"

#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define VIVACE_X86 1
#endif

namespace vivace::kernels {
namespace {

#ifdef VIVACE_X86
bool HasAmxInt8() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return ((edx >> 24) & 1u) != 0 && ((edx >> 25) & 1u) != 0;  // AMX-TILE, AMX-INT8
}
#endif

bool Detect(CpuLevel level) {
#ifdef VIVACE_X86
  __builtin_cpu_init();
  switch (level) {
    case CpuLevel::kPortable:
      return true;
    case CpuLevel::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuLevel::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case CpuLevel::kAmx: {
      // Once per process: CPUID, then the OS tile permission and a check of the kernel.
      static const bool usable = Detect(CpuLevel::kAvx512) && HasAmxInt8() && AmxSelfTest();
      return usable;
    }
  }
  return false;
#else
  return level == CpuLevel::kPortable;
#endif
}

}  // namespace

const char* LevelName(CpuLevel level) {
  switch (level) {
    case CpuLevel::kPortable: return "portable";
    case CpuLevel::kAvx2: return "avx2";
    case CpuLevel::kAvx512: return "avx512";
    case CpuLevel::kAmx: return "amx";
  }
  return "unknown";
}

bool CpuSupports(CpuLevel level) { return Detect(level); }

std::vector<CpuLevel> SupportedLevels() {
  std::vector<CpuLevel> levels;
  for (CpuLevel l : {CpuLevel::kPortable, CpuLevel::kAvx2, CpuLevel::kAvx512, CpuLevel::kAmx})
    if (CpuSupports(l)) levels.push_back(l);
  return levels;
}

CpuLevel ResolveLevel(const std::string& requested) {
  std::string name = requested;
  if (name.empty()) {
    const char* env = std::getenv("VIVACE_CPU_LEVEL");
    if (env != nullptr) name = env;
  }
  if (name.empty()) return SupportedLevels().back();
  for (CpuLevel l : {CpuLevel::kPortable, CpuLevel::kAvx2, CpuLevel::kAvx512, CpuLevel::kAmx}) {
    if (name != LevelName(l)) continue;
    if (!CpuSupports(l))
      throw std::invalid_argument("CPU level '" + name + "' is not supported by this CPU" +
                                  (l == CpuLevel::kAmx ? " (needs AMX-TILE/AMX-INT8, OS tile permission, and a passing self-test)" : "") +
                                  "; the best it has is '" + LevelName(SupportedLevels().back()) + "'");
    return l;
  }
  throw std::invalid_argument("unknown CPU level '" + name + "' (expected portable, avx2, avx512 or amx)");
}

}  // namespace vivace::kernels
