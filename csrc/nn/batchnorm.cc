#include "nn/batchnorm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace pkwrap {
namespace nn {

namespace {

constexpr int64_t kBlockRows = 256;

int Threads(int num_threads, int64_t work_items) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, work_items)));
}

// Sums over the blocks' partial sums [nb][D] in block order -> out [D].
void ReduceBlocks(const std::vector<double> &part, int64_t nb, int64_t D, double *out) {
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    const double *p = part.data() + b * D;
    for (int64_t d = 0; d < D; ++d) out[d] += p[d];
  }
}

// Two column sums over the rows, formed per fixed block of rows and added in block order
// (so independent of the thread count): row_fn(i, acc1, acc2) adds row i into the block's
// two [D] accumulators; the totals go to out1, out2 [D].
template <typename RowFn>
void TwoBlockSums(int64_t N, int64_t D, int nt, RowFn row_fn, double *out1, double *out2) {
  const int64_t nb = (N + kBlockRows - 1) / kBlockRows;
  std::vector<double> p1(nb * D), p2(nb * D);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t i1 = std::min(N, (blk + 1) * kBlockRows);
    for (int64_t i = blk * kBlockRows; i < i1; ++i)
      row_fn(i, p1.data() + blk * D, p2.data() + blk * D);
  }
  ReduceBlocks(p1, nb, D, out1);
  ReduceBlocks(p2, nb, D, out2);
}

inline const float *BypassRow(const float *x, const BypassMap &m, int64_t i, int64_t D) {
  const int64_t b = i / m.J, j = i - b * m.J;
  return x + (b * m.Tx + m.offset + j * m.step) * D;
}

void CheckMap(const BypassMap &m, int64_t N) {
  if (m.B <= 0 || m.J <= 0 || m.B * m.J != N || m.step <= 0 || m.offset < 0 ||
      m.offset + (m.J - 1) * m.step >= m.Tx)
    throw std::invalid_argument("relu_batchnorm: the bypass map does not fit the inputs");
}


// Row kernels on restrict-qualified pointers, so that the compiler vectorizes them.
inline void ReluSums(float *__restrict row, int64_t D, bool relu, double *__restrict s,
                     double *__restrict q) {
  if (relu)
    for (int64_t d = 0; d < D; ++d) row[d] = row[d] > 0.0f ? row[d] : 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const double v = row[d];
    s[d] += v;
    q[d] += v * v;
  }
}

inline void Normalize(const float *__restrict r, const float *__restrict x, float xs,
                      const float *__restrict mean, const float *__restrict scale,
                      float *__restrict o, int64_t D) {
  if (x)
    for (int64_t d = 0; d < D; ++d) o[d] = (r[d] - mean[d]) * scale[d] + xs * x[d];
  else
    for (int64_t d = 0; d < D; ++d) o[d] = (r[d] - mean[d]) * scale[d];
}

// Squared norm of a row, summed in double (a fixed vectorized order: deterministic).
inline double SquaredNorm(const float *__restrict v, int64_t D) {
  double q = 0.0;
#pragma omp simd reduction(+ : q)
  for (int64_t d = 0; d < D; ++d) q += static_cast<double>(v[d]) * v[d];
  return q;
}

inline void AddRow(const float *__restrict v, double *__restrict s, int64_t D) {
  for (int64_t d = 0; d < D; ++d) s[d] += v[d];
}

inline void GradSums(const float *__restrict g, const float *__restrict r,
                     const float *__restrict mean, double *__restrict sg,
                     double *__restrict sgr, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    sg[d] += g[d];
    sgr[d] += static_cast<double>(g[d]) * static_cast<double>(r[d] - mean[d]);
  }
}

inline void GradRow(const float *__restrict g, const float *__restrict r,
                    const float *__restrict scale, const float *__restrict c1,
                    const float *__restrict c2, float *__restrict gy, int64_t D, bool relu) {
  if (relu) {
    for (int64_t d = 0; d < D; ++d) {
      // times the 0/1 mask (a select does not vectorize here); NaN propagates as in Kaldi
      const float mask = r[d] > 0.0f ? 1.0f : 0.0f;
      gy[d] = mask * (scale[d] * g[d] + c2[d] * r[d] + c1[d]);
    }
  } else {
    for (int64_t d = 0; d < D; ++d) gy[d] = scale[d] * g[d] + c2[d] * r[d] + c1[d];
  }
}

inline void ScaleRow(const float *__restrict g, float a, float *__restrict o, int64_t D) {
  for (int64_t d = 0; d < D; ++d) o[d] = a * g[d];
}

}  // namespace

void ReluBatchNormForward(float *y, int64_t N, int64_t D, bool relu, double epsilon,
                          double target_rms, const float *bypass, const BypassMap &map,
                          float bypass_scale, float *out, double *sum, double *sumsq,
                          float *mean, float *scale, double *out_sq, int num_threads) {
  if (N < 1 || D < 1) throw std::invalid_argument("relu_batchnorm: empty input");
  if (bypass) CheckMap(map, N);
  const int64_t nb = (N + kBlockRows - 1) / kBlockRows;
  const int nt = Threads(num_threads, nb);
  // pass 1: ReLU in place, row sums of r and r^2
  TwoBlockSums(
      N, D, nt, [&](int64_t i, double *s, double *q) { ReluSums(y + i * D, D, relu, s, q); },
      sum, sumsq);
  for (int64_t d = 0; d < D; ++d) {
    const double m = sum[d] / N;
    const double v = std::max(0.0, sumsq[d] / N - m * m);
    mean[d] = static_cast<float>(m);
    scale[d] = static_cast<float>(target_rms / std::sqrt(v + epsilon));
  }
  // pass 2: normalize and add the bypass
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t i1 = std::min(N, (blk + 1) * kBlockRows);
    for (int64_t i = blk * kBlockRows; i < i1; ++i) {
      Normalize(y + i * D, bypass ? BypassRow(bypass, map, i, D) : nullptr, bypass_scale, mean,
                scale, out + i * D, D);
      if (out_sq) out_sq[i] = SquaredNorm(out + i * D, D);
    }
  }
}

void ReluBatchNormBackward(const float *g, const float *r, int64_t N, int64_t D, bool relu,
                           const float *mean, const float *scale, double epsilon,
                           double target_rms, float *grad_y, float *grad_bypass,
                           const BypassMap &map, float bypass_scale, double *grad_y_sum,
                           double *grad_y_sq, int num_threads) {
  (void)epsilon;  // 1 / (var + epsilon) = scale^2 / target_rms^2
  if (N < 1 || D < 1) throw std::invalid_argument("relu_batchnorm: empty input");
  if (grad_bypass) CheckMap(map, N);
  const int64_t nb = (N + kBlockRows - 1) / kBlockRows;
  const int nt = Threads(num_threads, nb);
  // pass 1: row sums of g and of g * (r - mean)
  std::vector<double> A(D), Bs(D);
  TwoBlockSums(
      N, D, nt,
      [&](int64_t i, double *sg, double *sgr) { GradSums(g + i * D, r + i * D, mean, sg, sgr, D); },
      A.data(), Bs.data());
  // dL/dr = s g + c2 r + c1, with c2 = -s^3 / rms^2 * B / N and c1 = -s A / N - mean c2
  std::vector<float> c1(D), c2(D);
  const double inv_rms2 = 1.0 / (target_rms * target_rms);
  for (int64_t d = 0; d < D; ++d) {
    const double s = scale[d];
    const double k2 = -s * s * s * inv_rms2 * Bs[d] / N;
    c2[d] = static_cast<float>(k2);
    c1[d] = static_cast<float>(-s * A[d] / N - mean[d] * k2);
  }
  // pass 2: input gradient (masked by the ReLU), the bypass gradient, and (if wanted)
  // per-block column sums and squared norms of the input gradient
  const bool stats = grad_y_sum != nullptr;
  std::vector<double> ps(stats ? nb * D : 0), pq(stats ? nb : 0);
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t i1 = std::min(N, (blk + 1) * kBlockRows);
      double q = 0.0;
      for (int64_t i = blk * kBlockRows; i < i1; ++i) {
        if (grad_bypass)
          ScaleRow(g + i * D, bypass_scale,
                   const_cast<float *>(BypassRow(grad_bypass, map, i, D)), D);
        float *gy = grad_y + i * D;
        GradRow(g + i * D, r + i * D, scale, c1.data(), c2.data(), gy, D, relu);
        if (stats) {
          AddRow(gy, ps.data() + blk * D, D);
          q += SquaredNorm(gy, D);
        }
      }
      if (stats) pq[blk] = q;
    }
    if (grad_bypass) {  // zero the rows of x the bypass does not read
      const int64_t rows = map.B * map.Tx;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < rows; ++t) {
        const int64_t k = t % map.Tx - map.offset;
        if (k >= 0 && k % map.step == 0 && k / map.step < map.J) continue;
        std::memset(grad_bypass + t * D, 0, sizeof(float) * D);
      }
    }
  }
  if (stats) {
    ReduceBlocks(ps, nb, D, grad_y_sum);
    double q = 0.0;
    for (int64_t b = 0; b < nb; ++b) q += pq[b];
    *grad_y_sq = q;
  }
}

}  // namespace nn
}  // namespace pkwrap
