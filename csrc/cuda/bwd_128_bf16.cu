// The CuTe backward for head dim 128, bf16 (one translation unit per instantiation).
#include "cuda/bwd_kernel.cuh"

namespace lift {
namespace cuda {
LIFT_INSTANTIATE_CUTE_BACKWARD(__nv_bfloat16, 128)
}  // namespace cuda
}  // namespace lift
