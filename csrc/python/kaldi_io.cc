// Bindings for csrc/kaldi/ (fast Kaldi binary readers).
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace pkwrap {
void PybindKaldiIo(py::module &m) { (void)m; }
}  // namespace pkwrap
