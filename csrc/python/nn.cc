// Bindings for csrc/nn/ (fused layer kernels). Buffers are numpy arrays (float32,
// C-contiguous) that pkwrap.nn passes as tensor.numpy() views; the GIL is released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "nn/batchnorm.h"

namespace py = pybind11;

namespace pkwrap {

namespace {

// The data of a C-contiguous float32 array of `n` elements (writable if asked), or throws.
float *FloatBuffer(const py::array &a, py::ssize_t n, bool writable, const char *what) {
  if (!py::isinstance<py::array_t<float>>(a) || !(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(what) + " must be a C-contiguous float32 array");
  if (writable && !a.writeable())
    throw std::invalid_argument(std::string(what) + " must be writable");
  if (a.size() != n)
    throw std::invalid_argument(std::string(what) + " has " + std::to_string(a.size()) +
                                " elements, expected " + std::to_string(n));
  return static_cast<float *>(const_cast<void *>(a.data()));
}

nn::BypassMap MakeMap(const py::tuple &t) {
  if (t.size() != 5)
    throw std::invalid_argument("bypass map must be (B, J, Tx, offset, step)");
  nn::BypassMap m;
  m.B = t[0].cast<int64_t>();
  m.J = t[1].cast<int64_t>();
  m.Tx = t[2].cast<int64_t>();
  m.offset = t[3].cast<int64_t>();
  m.step = t[4].cast<int64_t>();
  return m;
}

// The optional bypass buffer: None (nullptr), or a [B][Tx][D] float32 array with B and Tx
// from `map`, kept alive in `holder`; `m` receives the map.
float *OptionalBypass(const py::object &obj, const py::tuple &map, int64_t D, bool writable,
                      const char *what, py::array &holder, nn::BypassMap &m) {
  if (obj.is_none()) return nullptr;
  holder = obj.cast<py::array>();
  m = MakeMap(map);
  return FloatBuffer(holder, m.B * m.Tx * D, writable, what);
}

// relu_batchnorm_forward(y [N][D], out [N][D], bypass or None, map, bypass_scale, relu,
//                        epsilon, target_rms, num_threads, row_norms)
//   -> (sum, sumsq, mean, scale, out_sq [N] float64 or None)
py::tuple ForwardPy(py::array y, py::array out, py::object bypass, py::tuple map,
                    float bypass_scale, bool relu, double epsilon, double target_rms,
                    int num_threads, bool row_norms) {
  if (y.ndim() != 2) throw std::invalid_argument("relu_batchnorm: y must be [N][D]");
  const int64_t N = y.shape(0), D = y.shape(1);
  float *yp = FloatBuffer(y, N * D, true, "y");
  float *op = FloatBuffer(out, N * D, true, "out");
  nn::BypassMap m;
  py::array x;
  const float *xp = OptionalBypass(bypass, map, D, false, "bypass", x, m);
  py::array_t<double> sum(D), sumsq(D);
  py::array_t<float> mean(D), scale(D);
  py::array_t<double> out_sq(row_norms ? N : 0);
  {
    py::gil_scoped_release release;
    nn::ReluBatchNormForward(yp, N, D, relu, epsilon, target_rms, xp, m, bypass_scale, op,
                             sum.mutable_data(), sumsq.mutable_data(), mean.mutable_data(),
                             scale.mutable_data(), row_norms ? out_sq.mutable_data() : nullptr,
                             num_threads);
  }
  return py::make_tuple(sum, sumsq, mean, scale,
                        row_norms ? py::object(out_sq) : py::object(py::none()));
}

// relu_batchnorm_backward(g, r, mean, scale, grad_y, grad_bypass or None, map,
//                         bypass_scale, relu, epsilon, target_rms, num_threads, stats)
//   -> (column sums of grad_y [D] float64, its squared norm) when stats, else None
py::object BackwardPy(py::array g, py::array r, py::array mean, py::array scale,
                      py::array grad_y, py::object grad_bypass, py::tuple map,
                      float bypass_scale, bool relu, double epsilon, double target_rms,
                      int num_threads, bool stats) {
  if (g.ndim() != 2) throw std::invalid_argument("relu_batchnorm: g must be [N][D]");
  const int64_t N = g.shape(0), D = g.shape(1);
  const float *gp = FloatBuffer(g, N * D, false, "g");
  const float *rp = FloatBuffer(r, N * D, false, "r");
  const float *mp = FloatBuffer(mean, D, false, "mean");
  const float *sp = FloatBuffer(scale, D, false, "scale");
  float *gyp = FloatBuffer(grad_y, N * D, true, "grad_y");
  nn::BypassMap m;
  py::array gx;
  float *gxp = OptionalBypass(grad_bypass, map, D, true, "grad_bypass", gx, m);
  py::array_t<double> gsum(stats ? D : 0);
  double gsq = 0.0;
  {
    py::gil_scoped_release release;
    nn::ReluBatchNormBackward(gp, rp, N, D, relu, mp, sp, epsilon, target_rms, gyp, gxp, m,
                              bypass_scale, stats ? gsum.mutable_data() : nullptr,
                              stats ? &gsq : nullptr, num_threads);
  }
  if (!stats) return py::none();
  return py::make_tuple(gsum, gsq);
}

}  // namespace

void PybindNn(py::module &m) {
  m.def("relu_batchnorm_forward", &ForwardPy, py::arg("y"), py::arg("out"), py::arg("bypass"),
        py::arg("map"), py::arg("bypass_scale"), py::arg("relu"), py::arg("epsilon"),
        py::arg("target_rms"), py::arg("num_threads") = 0, py::arg("row_norms") = false,
        "Training-mode ReLU + batchnorm + bypass add (csrc/nn/batchnorm.h); y is "
        "overwritten by the ReLU. Returns (sum, sumsq, mean, scale, out_sq), out_sq the "
        "squared norms of the output rows (float64) if row_norms, else None.");
  m.def("relu_batchnorm_backward", &BackwardPy, py::arg("g"), py::arg("r"), py::arg("mean"),
        py::arg("scale"), py::arg("grad_y"), py::arg("grad_bypass"), py::arg("map"),
        py::arg("bypass_scale"), py::arg("relu"), py::arg("epsilon"), py::arg("target_rms"),
        py::arg("num_threads") = 0, py::arg("stats") = false,
        "Backward of relu_batchnorm_forward: writes grad_y and the bypass gradient; with "
        "stats, returns (column sums of grad_y, its squared norm) in float64, else None.");
}

}  // namespace pkwrap
