// Bindings for csrc/kaldi/ (Kaldi binary formats). Buffers cross as numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include <vector>

#include "kaldi/compressed_matrix.h"
#include "kaldi/supervision_merge.h"

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
  // validate the header and check the payload against the bytes there before the
  // output (num_rows x num_cols floats) is allocated: a flipped bit in a size must not
  // become a huge allocation
  const int64_t payload = kaldi::CompressedPayloadSize(h);
  if (static_cast<int64_t>(size) != static_cast<int64_t>(sizeof(h)) + payload)
    throw std::invalid_argument("compressed matrix: " + std::to_string(size) +
                                " bytes, header wants " + std::to_string(sizeof(h) + payload) +
                                " (" + std::to_string(h.num_rows) + " x " +
                                std::to_string(h.num_cols) + ", format " +
                                std::to_string(h.format) + ")");
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

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
static py::array_t<T> ToArray(const std::vector<T> &v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

// merge_supervision_fsts(fsts) -> (start, final, state_offsets, ilabel, olabel,
//                                   weight, nextstate)
//   fsts: list of such 7-tuples (float32 final [S], int64 state_offsets [S+1],
//   int32 ilabel/olabel/nextstate [A], float32 weight [A]); see supervision_merge.h.
static py::tuple MergeSupervisionFstsPy(py::list fsts) {
  std::vector<kaldi::FstView> views;
  std::vector<py::object> keep;  // the converted arrays must outlive the views
  for (py::handle h : fsts) {
    py::tuple t = py::reinterpret_borrow<py::tuple>(h);
    if (t.size() != 7)
      throw std::invalid_argument("merge_supervision_fsts: expected 7-tuples");
    auto fin = CArray<float>::ensure(t[1]);
    auto off = CArray<int64_t>::ensure(t[2]);
    auto il = CArray<int32_t>::ensure(t[3]);
    auto ol = CArray<int32_t>::ensure(t[4]);
    auto w = CArray<float>::ensure(t[5]);
    auto nx = CArray<int32_t>::ensure(t[6]);
    if (!fin || !off || !il || !ol || !w || !nx)
      throw std::invalid_argument("merge_supervision_fsts: arrays of the wrong type");
    const int64_t S = fin.size();
    const int64_t A = il.size();
    if (off.size() != S + 1 || ol.size() != A || w.size() != A || nx.size() != A ||
        (S > 0 && (off.data()[0] != 0 || off.data()[S] != A)))
      throw std::invalid_argument("merge_supervision_fsts: inconsistent FST arrays");
    for (int64_t i = 0; i < A; i++)
      if (nx.data()[i] < 0 || nx.data()[i] >= S)
        throw std::invalid_argument("merge_supervision_fsts: arc to a state out of range");
    for (int64_t i = 0; i < S; i++)
      if (off.data()[i] > off.data()[i + 1])
        throw std::invalid_argument("merge_supervision_fsts: state offsets not ascending");
    const int64_t start = t[0].cast<int64_t>();
    if (start < 0 || start >= S)
      throw std::invalid_argument("merge_supervision_fsts: bad start state");
    views.push_back({S, start, fin.data(), off.data(), il.data(), ol.data(), w.data(),
                     nx.data()});
    for (py::object o : {py::object(fin), py::object(off), py::object(il), py::object(ol),
                         py::object(w), py::object(nx)})
      keep.push_back(o);
  }
  kaldi::FstData r;
  {
    py::gil_scoped_release release;
    r = kaldi::ConcatRmEpsilonSortBfs(views);
  }
  return py::make_tuple(r.start, ToArray(r.final), ToArray(r.state_offsets),
                        ToArray(r.ilabel), ToArray(r.olabel), ToArray(r.weight),
                        ToArray(r.nextstate));
}

void PybindKaldiIo(py::module &m) {
  m.def("merge_supervision_fsts", &MergeSupervisionFstsPy, py::arg("fsts"),
        "Kaldi's MergeSupervision FST part: Concat (last first), RmEpsilon, Connect,\n"
        "breadth-first state order. fsts: list of (start, final, state_offsets, ilabel,\n"
        "olabel, weight, nextstate); returns the same 7-tuple.");
  m.def("decompress_matrix", &DecompressMatrixPy, py::arg("data"),
        "Decode a Kaldi CompressedMatrix (20-byte header incl. format, then payload)\n"
        "to float32 [num_rows][num_cols], bit-exact with Kaldi's CopyToMat.");
}

}  // namespace pkwrap
