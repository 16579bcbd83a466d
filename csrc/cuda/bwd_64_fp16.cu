// The CuTe backward for head dim 64, fp16 (one translation unit per instantiation).
#include "cuda/bwd_kernel.cuh"

namespace lift {
namespace cuda {
LIFT_INSTANTIATE_CUTE_BACKWARD(__half, 64)
}  // namespace cuda
}  // namespace lift
