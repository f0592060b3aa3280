// The compiled core, `vivace._core`. Each subsystem registers its own bindings.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace vivace {
void BindBatcher(py::module_& m);
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "Vivace native core: dynamic batcher (and, as they land, kernels and feature cache)";
#ifdef VIVACE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  vivace::BindBatcher(m);
}
