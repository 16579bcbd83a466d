// What the compiled module contains, reported by _C.build_info().
#pragma once

#include <string>

namespace lift {

struct BuildInfo {
  std::string version;
  std::string compiler;
  bool openmp;
  bool cuda;
  std::string cuda_archs;    // e.g. "80,90a"; empty without CUDA
  std::string cuda_version;  // nvcc's version; empty without CUDA
};

BuildInfo build_info();

// Devices the CUDA runtime sees; 0 when the CUDA part is not built or no driver is present.
int cuda_device_count();

}  // namespace lift
