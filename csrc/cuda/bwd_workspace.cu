// The CUDA backward's workspace: its size and the regions cext.py reads (one translation
// unit; the layout is the Workspace struct of bwd_preprocess.cuh).
#include "cuda/bwd_preprocess.cuh"

namespace lift {
namespace cuda {

int64_t backward_workspace_bytes(const AttnParams& p) {
  return bwd::Workspace<__half>(p, nullptr).bytes;  // the layout does not depend on T's 2 bytes
}

std::vector<std::tuple<std::string, int64_t, DType>> backward_workspace_regions(
    const AttnParams& p) {
  std::vector<std::tuple<std::string, int64_t, DType>> regions;
  bwd::Workspace<__half>(p, nullptr, &regions);
  return regions;
}

}  // namespace cuda
}  // namespace lift
