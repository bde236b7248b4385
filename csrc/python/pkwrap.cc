// The one PYBIND11_MODULE of pkwrap. Each binding file defines one PybindXxx(m);
// this file only calls them. No torch header is included anywhere under csrc/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace pkwrap {
void PybindKaldiIo(py::module &m);  // csrc/python/kaldi_io.cc
void PybindChain(py::module &m);    // csrc/python/chain.cc
void PybindNn(py::module &m);       // csrc/python/nn.cc
}  // namespace pkwrap

PYBIND11_MODULE(_pkwrap, m) {
  m.doc() = "pkwrap C++ core: chain forward-backward kernels, fused layer kernels and Kaldi "
          "binary readers";
#ifdef PKWRAP_VERSION
  m.attr("__version__") = PKWRAP_VERSION;
#endif
  pkwrap::PybindKaldiIo(m);
  pkwrap::PybindChain(m);
  pkwrap::PybindNn(m);
}
