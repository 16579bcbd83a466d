// The CuTe forward for head dim 128, fp16 (one translation unit per instantiation).
#include "cuda/fwd_kernel.cuh"

namespace lift {
namespace cuda {
LIFT_INSTANTIATE_CUTE_FORWARD(__half, 128)
}  // namespace cuda
}  // namespace lift
