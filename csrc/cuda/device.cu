// CUDA runtime queries shared by the CUDA kernels' launchers.
#include <cuda_runtime.h>

#include "build_info.h"

namespace lift {

int cuda_device_count() {
  int count = 0;
  // No driver or no GPU is an answer (zero devices), not an error for the caller.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace lift
