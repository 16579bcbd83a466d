// pybind11 bindings of lift_kernels._C: a handful of functions, nothing else.
#include <pybind11/pybind11.h>

#include <string>

#include "build_info.h"

namespace py = pybind11;

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
}
