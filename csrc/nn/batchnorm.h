// Training-mode batch normalization fused with the ReLU before it and the residual
// (bypass) add after it: the elementwise tail of a TDNN-F layer in two passes over the
// rows instead of five, forward and backward.
//
// Rows are [N][D] float32, row-major.  Forward (Kaldi's BatchNormComponent, no affine):
//   r = relu ? max(y, 0) : y                      (written over y)
//   mean = sum(r) / N,  var = sum(r^2) / N - mean^2   (biased; sums in double)
//   s = target_rms / sqrt(var + epsilon)
//   out = (r - mean) * s + bypass_scale * x[map(i)]
// Backward, from g = dL/dout:
//   dL/dr = s * (g - mean(g) - (r - mean) * mean(g * (r - mean)) / (var + epsilon))
//   dL/dy = dL/dr where r > 0 (relu), dL/dx[map(i)] = bypass_scale * g, 0 on other rows.
//
// The bypass map: row i = b * J + j of y (b < B, j < J, N = B * J) reads row
// b * Tx + offset + j * step of x ([B][Tx][D]).
//
// Row sums are formed over fixed blocks of rows and then added in block order, so the
// results do not depend on the number of threads.
#pragma once

#include <cstdint>

namespace pkwrap {
namespace nn {

struct BypassMap {
  int64_t B = 0, J = 0, Tx = 0, offset = 0, step = 1;
};

// y [N][D] (ReLU applied in place when relu), out [N][D]; bypass (nullptr: none) as above.
// Writes the row sums of r into sum/sumsq [D] (double) and the per-column mean and scale s
// into mean/scale [D] (float; what the backward needs).  out_sq (nullptr: not wanted)
// receives the squared norm of every output row [N] (double), which the next layer's
// natural-gradient preconditioner needs.
void ReluBatchNormForward(float *y, int64_t N, int64_t D, bool relu, double epsilon,
                          double target_rms, const float *bypass, const BypassMap &map,
                          float bypass_scale, float *out, double *sum, double *sumsq,
                          float *mean, float *scale, double *out_sq, int num_threads);

// g [N][D] (dL/dout), r [N][D] (the forward's r), mean/scale [D] from the forward.
// Writes grad_y [N][D] (not aliasing g or r) and, when grad_bypass is not null, the full
// [B][Tx][D] gradient of the bypass input.  When grad_y_sum is not null, it receives the
// column sums of grad_y [D] and *grad_y_sq its squared Frobenius norm (double; the bias
// gradient and the trace the layer's natural-gradient preconditioner needs).
void ReluBatchNormBackward(const float *g, const float *r, int64_t N, int64_t D, bool relu,
                           const float *mean, const float *scale, double epsilon,
                           double target_rms, float *grad_y, float *grad_bypass,
                           const BypassMap &map, float bypass_scale, double *grad_y_sum,
                           double *grad_y_sq, int num_threads);

}  // namespace nn
}  // namespace pkwrap
