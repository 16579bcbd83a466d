// pybind11 bindings of lift_kernels._C: a handful of functions, nothing else.
//
// The kernels take an AttnParams (gated_attention.h).  Python (lift_kernels/ops/cext.py)
// fills it as a dict: tensors as integer data pointers (0 for an absent one), strides as
// (batch, row, head) tuples in elements, the rest as numbers; the packed-sequence and slot
// fields (cu_seqlens_q/k with total_q/k, memory_index with num_slots) only when used.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "build_info.h"
#include "cpu/cpu_common.h"
#include "gated_attention.h"
#ifdef LIFT_KERNELS_WITH_CUDA
#include "cuda/launch.h"
#endif

namespace py = pybind11;

namespace {

template <class T>
T* pointer(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::invalid_argument(std::string("missing field ") + key);
  return reinterpret_cast<T*>(d[key].cast<uintptr_t>());
}

lift::Strides strides(const py::dict& d, const char* key) {
  if (!d.contains(key)) return {};
  const auto s = d[key].cast<std::tuple<int64_t, int64_t, int64_t>>();
  return {std::get<0>(s), std::get<1>(s), std::get<2>(s)};
}

lift::AttnParams params_from(const py::dict& d, bool backward) {
  lift::AttnParams p;
  p.batch = d["batch"].cast<int64_t>();
  p.nq = d["nq"].cast<int64_t>();
  p.nk = d["nk"].cast<int64_t>();
  p.hq = d["hq"].cast<int64_t>();
  p.hkv = d["hkv"].cast<int64_t>();
  p.head_dim = d["head_dim"].cast<int64_t>();
  p.mem_hidden = d["mem_hidden"].cast<int64_t>();
  p.gate_hidden = d["gate_hidden"].cast<int64_t>();
  const int dtype = d["dtype"].cast<int>();
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype must be 0 (f32), 1 (f16) or 2 (bf16)");
  p.dtype = static_cast<lift::DType>(dtype);
  if (p.batch < 1 || p.nq < 1 || p.nk < 1 || p.hq < 1 || p.hkv < 1 || p.hq % p.hkv != 0 ||
      p.head_dim < 1 || p.mem_hidden < 1 || p.gate_hidden < 1)
    throw std::invalid_argument("sizes must be positive and hq a multiple of hkv");
  p.q = pointer<const void>(d, "q");
  p.k = pointer<const void>(d, "k");
  p.v = pointer<const void>(d, "v");
  p.q_stride = strides(d, "q_stride");
  p.k_stride = strides(d, "k_stride");
  p.v_stride = strides(d, "v_stride");
  p.w1 = pointer<const float>(d, "w1");
  p.b1 = pointer<const float>(d, "b1");
  p.w2 = pointer<const float>(d, "w2");
  p.b2 = pointer<const float>(d, "b2");
  p.g1 = pointer<const float>(d, "g1");
  p.c1 = pointer<const float>(d, "c1");
  p.g2 = pointer<const float>(d, "g2");
  // The CUDA forward's tensor-core copies of the weights (absent for the CPU kernels).
  p.w1t_mma = d.contains("w1t_mma") ? pointer<const void>(d, "w1t_mma") : nullptr;
  p.w2_mma = d.contains("w2_mma") ? pointer<const void>(d, "w2_mma") : nullptr;
  p.g1t_mma = d.contains("g1t_mma") ? pointer<const void>(d, "g1t_mma") : nullptr;
  p.cos = pointer<const float>(d, "cos");
  p.sin = pointer<const float>(d, "sin");
  if (p.cos && p.head_dim % 2) throw std::invalid_argument("RoPE needs an even head dim");
  p.rope_batch_stride = d["rope_batch_stride"].cast<int64_t>();
  p.rope_row_stride = d["rope_row_stride"].cast<int64_t>();
  p.out = pointer<void>(d, "out");
  p.attn = pointer<void>(d, "attn");
  p.gate = pointer<float>(d, "gate");
  p.lse = pointer<float>(d, "lse");
  p.scale = d["scale"].cast<float>();
  p.gate_scale = d["gate_scale"].cast<float>();
  p.gate_shift = d["gate_shift"].cast<float>();
  p.causal = d["causal"].cast<bool>();
  if (d.contains("window_left")) p.window_left = d["window_left"].cast<int64_t>();
  if (d.contains("window_right")) p.window_right = d["window_right"].cast<int64_t>();
  if (d.contains("softcap")) p.softcap = d["softcap"].cast<float>();
  p.stream = d.contains("stream") ? d["stream"].cast<int64_t>() : 0;
  // Packed sequences and memory slots (absent: the [B, N, H, D] layout, one memory).
  p.cu_seqlens_q = d.contains("cu_seqlens_q") ? pointer<const int32_t>(d, "cu_seqlens_q") : nullptr;
  p.cu_seqlens_k = d.contains("cu_seqlens_k") ? pointer<const int32_t>(d, "cu_seqlens_k") : nullptr;
  if (!p.cu_seqlens_q != !p.cu_seqlens_k)
    throw std::invalid_argument("cu_seqlens_q and cu_seqlens_k must be given together");
  if (p.cu_seqlens_q) {
    p.total_q = d["total_q"].cast<int64_t>();
    p.total_k = d["total_k"].cast<int64_t>();
  }
  p.memory_index = d.contains("memory_index") ? pointer<const int64_t>(d, "memory_index") : nullptr;
  if (p.memory_index) p.num_slots = d["num_slots"].cast<int64_t>();
  if (backward) {
    p.dout = pointer<const void>(d, "dout");
    p.dout_stride = strides(d, "dout_stride");
    p.dgate = pointer<const float>(d, "dgate");
    p.dq = pointer<void>(d, "dq");
    p.dk = pointer<void>(d, "dk");
    p.dv = pointer<void>(d, "dv");
    p.dw1 = pointer<float>(d, "dw1");
    p.db1 = pointer<float>(d, "db1");
    p.dw2 = pointer<float>(d, "dw2");
    p.db2 = pointer<float>(d, "db2");
    p.dg1 = pointer<float>(d, "dg1");
    p.dc1 = pointer<float>(d, "dc1");
    p.dg2 = pointer<float>(d, "dg2");
    p.workspace = d.contains("workspace") ? pointer<void>(d, "workspace") : nullptr;
  }
  return p;
}

// Host-side checks of the sequence bounds and slots before a CPU kernel reads through them
// (dispatch.py checks them too, but not under torch.compile, where it cannot read values).
void check_sequences(const lift::AttnParams& p) {
  if (p.cu_seqlens_q) {
    const int32_t* cu[2] = {p.cu_seqlens_q, p.cu_seqlens_k};
    const int64_t totals[2] = {p.total_q, p.total_k}, longest[2] = {p.nq, p.nk};
    const char* names[2] = {"cu_seqlens_q", "cu_seqlens_k"};
    for (int side = 0; side < 2; ++side) {
      if (cu[side][0] != 0 || cu[side][p.batch] != totals[side])
        throw std::invalid_argument(std::string(names[side]) +
                                    " must start at 0 and end at the packed row count");
      for (int64_t s = 0; s < p.batch; ++s) {
        const int64_t length = static_cast<int64_t>(cu[side][s + 1]) - cu[side][s];
        if (length < 0 || length > longest[side])
          throw std::invalid_argument(std::string(names[side]) +
                                      " must never decrease, nor step by more than max_seqlen");
      }
    }
  }
  if (p.memory_index) {
    if (p.num_slots < 1) throw std::invalid_argument("num_slots must be positive");
    for (int64_t s = 0; s < p.batch; ++s)
      if (p.memory_index[s] < 0 || p.memory_index[s] >= p.num_slots)
        throw std::invalid_argument("memory_index must hold slots in [0, num_slots)");
  }
}

// The CUDA kernels read neither packed sequences nor memory slots (yet).
void reject_sequences(const lift::AttnParams& p) {
  if (p.cu_seqlens_q || p.memory_index)
    throw std::invalid_argument("the cuda kernels take no packed sequences or memory slots");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lift_kernels compiled kernels (CPU always; CUDA when built with nvcc)";
  m.def("build_info", []() {
    const lift::BuildInfo info = lift::build_info();
    py::dict d;
    d["version"] = info.version;
    d["compiler"] = info.compiler;
    d["openmp"] = info.openmp;
    d["cuda"] = info.cuda;
    d["cuda_archs"] = info.cuda_archs;
    d["cuda_version"] = info.cuda_version;
    return d;
  }, "What this build contains: version, compiler, OpenMP, CUDA and its architectures.");
  m.def("cuda_device_count", &lift::cuda_device_count,
        "Number of CUDA devices the runtime sees (0 without CUDA code, driver or GPU).");

  m.def("cpu_forward", [](const py::dict& fields) {
    const lift::AttnParams p = params_from(fields, false);
    check_sequences(p);
    py::gil_scoped_release release;
    lift::cpu::forward(p);
  }, "CPU forward: writes out, attn, gate, lse (fields: see gated_attention.h).");
  m.def("cpu_backward", [](const py::dict& fields) {
    const lift::AttnParams p = params_from(fields, true);
    check_sequences(p);
    py::gil_scoped_release release;
    lift::cpu::backward(p);
  }, "CPU backward: writes dq, dk, dv and the float32 weight gradients.");
#ifdef LIFT_KERNELS_WITH_CUDA
  m.def("cuda_forward", [](const py::dict& fields) {
    const lift::AttnParams p = params_from(fields, false);
    reject_sequences(p);
    py::gil_scoped_release release;
    lift::cuda::forward(p);
  }, "CUDA forward on the given stream (same fields as cpu_forward).");
  m.def("cuda_backward", [](const py::dict& fields) {
    const lift::AttnParams p = params_from(fields, true);
    reject_sequences(p);
    py::gil_scoped_release release;
    lift::cuda::backward(p);
  }, "CUDA backward on the given stream (same fields as cpu_backward).");
  m.def("cuda_supports", &lift::cuda::supports,
        "Why the CUDA kernels cannot serve (head_dim, dtype code, mem_hidden, gate_hidden) on "
        "device index (-1: any), or ''.");
  m.attr("CUDA_GATE_COLS") = lift::cuda::kGateCols;
  m.def("cuda_smem_bytes", &lift::cuda::smem_bytes,
        "Shared memory per block (forward, largest backward) for (head_dim, dtype code).");
  m.def("cuda_workspace_bytes", [](const py::dict& fields) {
    return lift::cuda::backward_workspace_bytes(params_from(fields, false));
  }, "Bytes of device workspace cuda_backward needs (passed as the 'workspace' field).");
  m.def("cuda_workspace_offsets", [](const py::dict& fields) {
    py::dict d;
    for (const auto& [name, offset, dtype] :
         lift::cuda::backward_workspace_regions(params_from(fields, false)))
      d[py::str(name)] = py::make_tuple(offset, static_cast<int>(dtype));
    return d;
  }, "{region: (byte offset, dtype code)} of the CUDA backward's workspace.");
#endif
}
