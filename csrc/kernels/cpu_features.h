// CPU feature detection and the kernel level choice (portable, AVX2, AVX-512, AMX).
#pragma once

#include <string>
#include <vector>

namespace vivace::kernels {

// Ordered from the most portable to the most specialised.
enum class CpuLevel : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

const char* LevelName(CpuLevel level);

// True when this CPU (and the OS, for wide registers and AMX tiles) supports `level`:
//   avx2   = AVX2 + FMA
//   avx512 = AVX-512 F/BW/VL + VNNI (the int8 path needs VNNI; without it, avx2 is used)
//   amx    = avx512 + AMX-TILE + AMX-INT8 with tile permission from the OS, and the AMX
//            kernel agreeing exactly with the AVX-512 one on a self-test (int8 layers)
bool CpuSupports(CpuLevel level);

// Levels this machine supports, portable first.
std::vector<CpuLevel> SupportedLevels();

// The level to run: `requested` ("portable", "avx2", "avx512", "amx"), or when empty the
// VIVACE_CPU_LEVEL environment variable, or when unset the best level this CPU has.
// Throws std::invalid_argument for an unknown name or a level the CPU lacks.
CpuLevel ResolveLevel(const std::string& requested);

}  // namespace vivace::kernels
