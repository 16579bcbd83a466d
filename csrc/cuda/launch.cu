// Run-time dispatch from (dtype, head dim) to the compiled kernel templates.
#include <stdexcept>

#include "cuda/common.cuh"
#include "cuda/launch.h"

namespace lift {
namespace cuda {
namespace {

// The 16-bit type behind DType (float32 has no CUDA kernel: the tensor-core tiles are 16-bit).
template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <>
constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

void check(const AttnParams& p) {
  const std::string reason = supports(p.head_dim, static_cast<int>(p.dtype), p.mem_hidden);
  if (!reason.empty()) throw std::invalid_argument(reason);
  if (p.hq > 65535 || p.batch > 65535 || p.hkv > 65535)
    throw std::invalid_argument("the CUDA kernels take at most 65535 heads and batch entries");
}

}  // namespace

std::string supports(int64_t head_dim, int dtype, int64_t mem_hidden) {
  bool found = false;
#define LIFT_MATCH(T, D) found = found || (head_dim == D && dtype == static_cast<int>(dtype_of<T>()));
  LIFT_CUDA_CONFIGS(LIFT_MATCH)
#undef LIFT_MATCH
  if (!found)
    return "the CUDA kernels are compiled for float16/bfloat16 with head dim 64 or 128, got "
           "head_dim=" + std::to_string(head_dim) + ", dtype code " + std::to_string(dtype);
  if (mem_hidden % kChunk != 0)
    return "the CUDA kernels need the memory hidden size M to be a multiple of " +
           std::to_string(kChunk) + ", got M=" + std::to_string(mem_hidden);
  return "";
}

void forward(const AttnParams& p) {
  check(p);
#define LIFT_DISPATCH(T, D)                                          \
  if (p.head_dim == D && p.dtype == dtype_of<T>()) return launch_forward<T, D>(p);
  LIFT_CUDA_CONFIGS(LIFT_DISPATCH)
#undef LIFT_DISPATCH
}

void backward(const AttnParams& p) {
  check(p);
#define LIFT_DISPATCH(T, D)                                          \
  if (p.head_dim == D && p.dtype == dtype_of<T>()) return launch_backward<T, D>(p);
  LIFT_CUDA_CONFIGS(LIFT_DISPATCH)
#undef LIFT_DISPATCH
}

}  // namespace cuda
}  // namespace lift
