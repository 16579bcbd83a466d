#include "build_info.h"

namespace lift {

#ifndef LIFT_KERNELS_WITH_CUDA
int cuda_device_count() { return 0; }
#endif

BuildInfo build_info() {
  BuildInfo info;
  info.version = LIFT_KERNELS_VERSION;
#if defined(__clang__)
  info.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info.compiler = std::string("gcc ") + __VERSION__;
#else
  info.compiler = "unknown";
#endif
#ifdef LIFT_KERNELS_WITH_OPENMP
  info.openmp = true;
#else
  info.openmp = false;
#endif
#ifdef LIFT_KERNELS_WITH_CUDA
  info.cuda = true;
  info.cuda_archs = LIFT_KERNELS_CUDA_ARCHS;
  info.cuda_version = LIFT_KERNELS_CUDA_VERSION;
#else
  info.cuda = false;
#endif
  return info;
}

}  // namespace lift
