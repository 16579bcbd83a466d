// Host entry points of the CUDA kernels (compiled by nvcc, called from bindings.cpp).
//
// The kernels are templates over the 16-bit type T and the head dim D; LIFT_CUDA_CONFIGS
// lists the instantiations once, and both the explicit instantiations (fwd.cu, bwd.cu) and
// the run-time dispatch (launch.cu) expand it, so adding a head dim is one line here.
#pragma once

#include <cstdint>
#include <string>

#include "gated_attention.h"

#define LIFT_CUDA_CONFIGS(X) \
  X(__half, 64)              \
  X(__half, 128)             \
  X(__nv_bfloat16, 64)       \
  X(__nv_bfloat16, 128)

namespace lift {
namespace cuda {

// Why the kernels cannot serve (head_dim, dtype, mem_hidden), or "" when they can.
std::string supports(int64_t head_dim, int dtype, int64_t mem_hidden);

// Bytes of the backward's workspace (the caller allocates it on the device and sets
// p.workspace).
int64_t backward_workspace_bytes(const AttnParams& p);

// Launch on p.stream; throw std::runtime_error on any CUDA error, std::invalid_argument on
// an unsupported configuration.
void forward(const AttnParams& p);
void backward(const AttnParams& p);

template <class T, int D>
void launch_forward(const AttnParams& p);
template <class T, int D>
void launch_backward(const AttnParams& p);

}  // namespace cuda
}  // namespace lift
