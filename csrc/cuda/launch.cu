// Run-time dispatch from (dtype, head dim) to the compiled kernel templates.
#include <algorithm>
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
  // The caller (cext.py) asked supports() with the device; the launch re-checks the shapes.
  const std::string reason = supports(p.head_dim, static_cast<int>(p.dtype), p.mem_hidden,
                                      p.gate_hidden, -1);
  if (!reason.empty()) throw std::invalid_argument(reason);
  if (p.hq > 65535 || p.batch > 65535 || p.hkv > 65535)
    throw std::invalid_argument("the CUDA kernels take at most 65535 heads and batch entries");
}

}  // namespace

std::pair<int64_t, int64_t> smem_bytes(int64_t head_dim, int dtype) {
#define LIFT_MATCH(T, D)                                                          \
  if (head_dim == D && dtype == static_cast<int>(dtype_of<T>()))                  \
    return {forward_smem_bytes<T, D>(), backward_smem_bytes<T, D>()};
  LIFT_CUDA_CONFIGS(LIFT_MATCH)
#undef LIFT_MATCH
  return {-1, -1};
}

std::string supports(int64_t head_dim, int dtype, int64_t mem_hidden, int64_t gate_hidden,
                     int device) {
  const auto [forward_smem, backward_smem] = smem_bytes(head_dim, dtype);
  const int64_t smem = std::max(forward_smem, backward_smem);
  if (smem < 0)
    return "the CUDA kernels are compiled for float16/bfloat16 with head dim 64 or 128, got "
           "head_dim=" + std::to_string(head_dim) + ", dtype code " + std::to_string(dtype);
  if (mem_hidden % kChunk != 0)
    return "the CUDA kernels need the memory hidden size M to be a multiple of " +
           std::to_string(kChunk) + ", got M=" + std::to_string(mem_hidden);
  if (gate_hidden > kGateCols)
    return "the CUDA kernels compute the gate's hidden layer as one " +
           std::to_string(kGateCols) + "-column MMA tile, got R=" + std::to_string(gate_hidden);
  if (device >= 0) {
    // sm_86/89 cards have 99 KB per block, sm_80 163 KB, sm_90 227 KB.
    int optin = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
        cudaSuccess) {
      cudaGetLastError();
      return "the CUDA runtime cannot query device " + std::to_string(device);
    }
    if (smem > optin)
      return "the CUDA kernels for head dim " + std::to_string(head_dim) + " need " +
             std::to_string(smem) + " bytes of shared memory per block, device " +
             std::to_string(device) + " allows " + std::to_string(optin);
  }
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
