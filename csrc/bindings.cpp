// The compiled core, `vivace._core`. Each subsystem registers its own bindings; CMake
// defines VIVACE_WITH_<NAME> for each subsystem folder present under csrc/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace vivace {
void BindBatcher(py::module_& m);
#ifdef VIVACE_WITH_FEATCACHE
void BindFeatcache(py::module_& m);
#endif
#ifdef VIVACE_WITH_KERNELS
void BindKernels(py::module_& m);
#endif
#ifdef VIVACE_WITH_SKETCH
void BindSketch(py::module_& m);
#endif
#ifdef VIVACE_WITH_FRONTEND
void BindFrontend(py::module_& m);
#endif
}  // namespace vivace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Vivace native core: dynamic batcher, HTTP front end, kernels, feature cache, drift sketches";
#ifdef VIVACE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  vivace::BindBatcher(m);
#ifdef VIVACE_WITH_FEATCACHE
  vivace::BindFeatcache(m);
#endif
#ifdef VIVACE_WITH_KERNELS
  vivace::BindKernels(m);
#endif
#ifdef VIVACE_WITH_SKETCH
  vivace::BindSketch(m);
#endif
#ifdef VIVACE_WITH_FRONTEND
  vivace::BindFrontend(m);
#endif
}
