// Bindings for csrc/chain/ (denominator and numerator forward-backward).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace pkwrap {
void PybindChain(py::module &m) { (void)m; }
}  // namespace pkwrap
