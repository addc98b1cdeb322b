// The Python module rosa_kernels._C. Loading it registers the ops (ops.cpp, ops_cuda.cpp) with
// PyTorch's dispatcher; the module itself only reports how the library was built.
#include <pybind11/pybind11.h>

#ifdef ROSA_WITH_OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "rosa_kernels native extension: registers torch.ops.rosa_kernels.*";
  module.def("cuda_built", [] {
#ifdef ROSA_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the CUDA kernels were compiled into this build.");
  module.def("openmp_built", [] {
#ifdef ROSA_WITH_OPENMP
    return true;
#else
    return false;
#endif
  }, "True when the CPU kernels were compiled with OpenMP.");
}
