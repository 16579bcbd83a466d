// Host entry points of the CUDA kernels (compiled by nvcc, called from bindings.cpp).
//
// The kernels are templates over the 16-bit type T and the head dim D; LIFT_CUDA_CONFIGS
// lists the instantiations once for the run-time dispatch (launch.cu); the forward and the
// backward have one translation unit per entry (fwd_<D>_<dtype>.cu, bwd_<D>_<dtype>.cu), so
// adding a head dim is one line here and two small files.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gated_attention.h"

#define LIFT_CUDA_CONFIGS(X) \
  X(__half, 64)              \
  X(__half, 128)             \
  X(__nv_bfloat16, 64)       \
  X(__nv_bfloat16, 128)

namespace lift {
namespace cuda {

// The forward computes the gate's hidden layer as one MMA tile of this many columns: R must
// not exceed it, and AttnParams::g1t_mma is zero-padded to it.
constexpr int kGateCols = 16;

// Why the kernels cannot serve (head_dim, dtype, mem_hidden, gate_hidden) on CUDA device
// `device` (its shared memory per block must hold the largest kernel's tiles; device < 0
// skips that check), or "" when they can.
std::string supports(int64_t head_dim, int dtype, int64_t mem_hidden, int64_t gate_hidden,
                     int device);

// Dynamic shared memory per block (forward kernel, largest backward kernel) of a compiled
// (head_dim, dtype) configuration; (-1, -1) for one that is not compiled.
std::pair<int64_t, int64_t> smem_bytes(int64_t head_dim, int dtype);

// The same, per instantiation.
template <class T, int D>
int64_t forward_smem_bytes();
template <class T, int D>
int64_t backward_smem_bytes();

// Bytes of the backward's workspace (the caller allocates it on the device and sets
// p.workspace).
int64_t backward_workspace_bytes(const AttnParams& p);

// Its regions, (name, byte offset, dtype): the per-row tensors the weight gradients read
// (a1, dh1, dmem: dtype; ag, dhg, dlogit: float32; see bwd_preprocess.cuh).
std::vector<std::tuple<std::string, int64_t, DType>> backward_workspace_regions(
    const AttnParams& p);

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
