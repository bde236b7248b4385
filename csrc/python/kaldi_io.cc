// Bindings for csrc/kaldi/ (Kaldi binary formats). Buffers cross as numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include "kaldi/compressed_matrix.h"

namespace py = pybind11;

namespace pkwrap {

// decompress_matrix(data) -> float32 [R][C]
//   data: bytes-like, the 20-byte GlobalHeader (format first) + payload.
static py::array_t<float> DecompressMatrixPy(py::buffer data) {
  py::buffer_info info = data.request();
  if (info.ndim != 1 || info.itemsize != 1)
    throw std::invalid_argument("decompress_matrix: expected a 1-D byte buffer");
  const size_t size = static_cast<size_t>(info.size);
  kaldi::CompressedMatrixHeader h;
  if (size < sizeof(h))
    throw std::invalid_argument("decompress_matrix: fewer than 20 header bytes");
  std::memcpy(&h, info.ptr, sizeof(h));
  kaldi::CompressedPayloadSize(h);  // validates the header
  py::array_t<float> out({static_cast<py::ssize_t>(h.num_rows),
                          static_cast<py::ssize_t>(h.num_cols)});
  float *dst = out.mutable_data();
  const uint8_t *src = static_cast<const uint8_t *>(info.ptr);
  {
    py::gil_scoped_release release;
    kaldi::DecompressMatrix(src, size, dst);
  }
  return out;
}

void PybindKaldiIo(py::module &m) {
  m.def("decompress_matrix", &DecompressMatrixPy, py::arg("data"),
        "Decode a Kaldi CompressedMatrix (20-byte header incl. format, then payload)\n"
        "to float32 [num_rows][num_cols], bit-exact with Kaldi's CopyToMat.");
}

}  // namespace pkwrap
