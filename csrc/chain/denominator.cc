// csrc/chain/denominator.cc: see denominator.h for the recursion and the layout.
#include "chain/denominator.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pkwrap {
namespace chain {

void DenGraph::Check() const {
  const int64_t N = num_states;
  if (N <= 0 || num_pdfs <= 0)
    throw std::invalid_argument("DenGraph: num_states and num_pdfs must be positive");
  if (static_cast<int64_t>(fwd_offsets.size()) != N + 1 ||
      static_cast<int64_t>(bwd_offsets.size()) != N + 1 ||
      static_cast<int64_t>(initial_probs.size()) != N)
    throw std::invalid_argument("DenGraph: offsets must have num_states+1 entries and "
                                "initial_probs num_states");
  const size_t A = fwd_dst.size();
  if (fwd_pdf.size() != A || fwd_prob.size() != A || bwd_src.size() != A ||
      bwd_pdf.size() != A || bwd_prob.size() != A)
    throw std::invalid_argument("DenGraph: arc arrays differ in length");
  for (const auto *off : {&fwd_offsets, &bwd_offsets}) {
    if ((*off)[0] != 0 || static_cast<size_t>((*off)[N]) != A)
      throw std::invalid_argument("DenGraph: offsets must start at 0 and end at num_arcs");
    for (int64_t i = 0; i < N; ++i)
      if ((*off)[i] > (*off)[i + 1])
        throw std::invalid_argument("DenGraph: offsets must be non-decreasing");
  }
  for (size_t a = 0; a < A; ++a) {
    if (fwd_dst[a] < 0 || fwd_dst[a] >= N || bwd_src[a] < 0 || bwd_src[a] >= N)
      throw std::invalid_argument("DenGraph: arc with a state outside [0, num_states)");
    if (fwd_pdf[a] < 0 || fwd_pdf[a] >= num_pdfs || bwd_pdf[a] < 0 || bwd_pdf[a] >= num_pdfs)
      throw std::invalid_argument("DenGraph: arc with a pdf outside [0, num_pdfs)");
  }
}

void ExpClamped30(const float *__restrict in, float *__restrict out, int64_t n) {
  // exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 in [-0.35, 0.35],
  // exp(r) by its degree-6 Taylor polynomial (error < 1.3e-7 relative).
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  for (int64_t k = 0; k < n; ++k) {
    const float x0 = in[k];
    const bool is_nan = !(x0 == x0);
    float x = is_nan ? 0.0f : x0;
    x = x < -30.0f ? -30.0f : x;
    x = x > 30.0f ? 30.0f : x;
    const float kf = std::floor(x * kLog2e + 0.5f);
    const float r = (x - kf * kLn2Hi) - kf * kLn2Lo;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t ki = static_cast<int32_t>(kf);
    const uint32_t bits = static_cast<uint32_t>(ki + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(float));
    out[k] = is_nan ? x0 : p * scale;
  }
}

namespace {

// One block of w consecutive sequences [s0, s0 + w), run start to end by one thread.
struct BlockOut {
  double alpha_beta_product = 0;
  double frame0_post_sum = 0;
};

void RunBlock(const DenGraph &g, const float *x, int T, int P, float leaky, int s0,
              int w, float *post, float post_scale, double *logprob, BlockOut *res) {
  const int N = g.num_states;
  const size_t W = w;
  const float *init = g.initial_probs.data();
  // e[t][p][j], scaled by 1/c(t) once c(t) is known.
  std::vector<float> E(static_cast<size_t>(T) * P * W);
  {
    std::vector<float> tmp(static_cast<size_t>(P));
    for (int j = 0; j < w; ++j) {
      const float *xs = x + static_cast<size_t>(s0 + j) * T * P;
      for (int t = 0; t < T; ++t) {
        ExpClamped30(xs + static_cast<size_t>(t) * P, tmp.data(), P);
        float *Et = E.data() + static_cast<size_t>(t) * P * W;
        for (int p = 0; p < P; ++p) Et[p * W + j] = tmp[p];
      }
    }
  }
  // alpha'(t) for t = 0..T, [t][state][j]; c(t) as [t][j].
  std::vector<float> alpha(static_cast<size_t>(T + 1) * N * W);
  std::vector<float> csum(static_cast<size_t>(T + 1) * W);
  std::vector<double> log_scale(W, 0.0);
  std::vector<float> inv(W), tot(W);

  for (int i = 0; i < N; ++i)
    for (size_t j = 0; j < W; ++j) alpha[i * W + j] = init[i];

  const int32_t *bo = g.bwd_offsets.data(), *bs = g.bwd_src.data(), *bp = g.bwd_pdf.data();
  const float *bq = g.bwd_prob.data();
  for (int t = 0;; ++t) {
    float *__restrict at = alpha.data() + static_cast<size_t>(t) * N * W;
    float *__restrict ct = csum.data() + static_cast<size_t>(t) * W;
    std::fill(ct, ct + W, 0.0f);
    for (int i = 0; i < N; ++i) {
      const float *ai = at + i * W;
      for (size_t j = 0; j < W; ++j) ct[j] += ai[j];
    }
    for (int i = 0; i < N; ++i) {
      const float li = leaky * init[i];
      float *ai = at + i * W;
      for (size_t j = 0; j < W; ++j) ai[j] += li * ct[j];
    }
    if (t == T) break;
    float *__restrict Et = E.data() + static_cast<size_t>(t) * P * W;
    for (size_t j = 0; j < W; ++j) {
      inv[j] = 1.0f / ct[j];
      log_scale[j] += std::log(static_cast<double>(ct[j]));
    }
    for (int p = 0; p < P; ++p) {
      float *ep = Et + p * W;
      for (size_t j = 0; j < W; ++j) ep[j] *= inv[j];
    }
    float *__restrict an = at + static_cast<size_t>(N) * W;
    for (int n = 0; n < N; ++n) {
      float *__restrict acc = an + n * W;
      for (size_t j = 0; j < W; ++j) acc[j] = 0.0f;
      for (int32_t a = bo[n], end = bo[n + 1]; a < end; ++a) {
        const float q = bq[a];
        const float *__restrict ai = at + static_cast<size_t>(bs[a]) * W;
        const float *__restrict ep = Et + static_cast<size_t>(bp[a]) * W;
        for (size_t j = 0; j < W; ++j) acc[j] += q * ai[j] * ep[j];
      }
    }
  }
  {
    const float *aT = alpha.data() + static_cast<size_t>(T) * N * W;
    std::vector<double> s(W, 0.0);
    for (int i = 0; i < N; ++i)
      for (size_t j = 0; j < W; ++j) s[j] += aT[i * W + j];
    for (size_t j = 0; j < W; ++j) {
      tot[j] = static_cast<float>(s[j]);
      logprob[s0 + j] = std::log(s[j]) + log_scale[j];
    }
  }
  if (post == nullptr) return;

  // Backward.
  std::vector<float> beta_next(static_cast<size_t>(N) * W), beta_cur(static_cast<size_t>(N) * W);
  std::vector<float> gam(static_cast<size_t>(P) * W), bsum(W);
  auto leak = [&](float *b) {
    std::fill(bsum.begin(), bsum.end(), 0.0f);
    for (int i = 0; i < N; ++i)
      for (size_t j = 0; j < W; ++j) bsum[j] += init[i] * b[i * W + j];
    for (size_t j = 0; j < W; ++j) bsum[j] *= leaky;
    for (int i = 0; i < N; ++i)
      for (size_t j = 0; j < W; ++j) b[i * W + j] += bsum[j];
  };
  for (int i = 0; i < N; ++i)
    for (size_t j = 0; j < W; ++j) beta_next[i * W + j] = 1.0f / tot[j];
  leak(beta_next.data());
  const int32_t *fo = g.fwd_offsets.data(), *fd = g.fwd_dst.data(), *fp = g.fwd_pdf.data();
  const float *fq = g.fwd_prob.data();
  for (int t = T - 1; t >= 0; --t) {
    const float *__restrict at = alpha.data() + static_cast<size_t>(t) * N * W;
    const float *__restrict Et = E.data() + static_cast<size_t>(t) * P * W;
    const float *__restrict bn = beta_next.data();
    float *__restrict g_t = gam.data();
    std::fill(gam.begin(), gam.end(), 0.0f);
    for (int i = 0; i < N; ++i) {
      float *__restrict bc = beta_cur.data() + static_cast<size_t>(i) * W;
      const float *__restrict ai = at + static_cast<size_t>(i) * W;
      for (size_t j = 0; j < W; ++j) bc[j] = 0.0f;
      for (int32_t a = fo[i], end = fo[i + 1]; a < end; ++a) {
        const float q = fq[a];
        const float *__restrict bj = bn + static_cast<size_t>(fd[a]) * W;
        const float *__restrict ep = Et + static_cast<size_t>(fp[a]) * W;
        float *__restrict gp = g_t + static_cast<size_t>(fp[a]) * W;
        for (size_t j = 0; j < W; ++j) {
          const float v = q * ep[j] * bj[j];
          bc[j] += v;
          gp[j] += v * ai[j];
        }
      }
    }
    if (t == 0) {
      double ab = 0, ps = 0;
      for (size_t k = 0; k < static_cast<size_t>(N) * W; ++k)
        ab += static_cast<double>(at[k]) * beta_cur[k];
      for (size_t k = 0; k < static_cast<size_t>(P) * W; ++k) ps += g_t[k];
      res->alpha_beta_product = ab;
      res->frame0_post_sum = ps;
    }
    for (int j = 0; j < w; ++j) {
      float *dst = post + (static_cast<size_t>(s0 + j) * T + t) * P;
      for (int p = 0; p < P; ++p) dst[p] = post_scale * g_t[p * W + j];
    }
    leak(beta_cur.data());
    std::swap(beta_next, beta_cur);
  }
}

}  // namespace

DenResult DenominatorForwardBackward(const DenGraph &g, const float *x, int S, int T,
                                     int P, float leaky, float *post, float post_scale,
                                     int num_threads) {
  if (S <= 0 || T <= 0)
    throw std::invalid_argument("denominator: need at least one sequence and one frame");
  if (P != g.num_pdfs)
    throw std::invalid_argument("denominator: output has " + std::to_string(P) +
                                " columns but the graph has " + std::to_string(g.num_pdfs) +
                                " pdfs");
  if (!(leaky > 0.0f && leaky < 1.0f))
    throw std::invalid_argument("denominator: leaky_hmm_coefficient must be in (0, 1)");
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  const int nb = std::max(1, std::min(num_threads, S));
  DenResult r;
  r.logprob.assign(S, 0.0);
  std::vector<BlockOut> outs(nb);
#pragma omp parallel for num_threads(nb) schedule(static, 1)
  for (int b = 0; b < nb; ++b) {
    const int s0 = static_cast<int>(static_cast<int64_t>(S) * b / nb);
    const int s1 = static_cast<int>(static_cast<int64_t>(S) * (b + 1) / nb);
    RunBlock(g, x, T, P, leaky, s0, s1 - s0, post, post_scale, r.logprob.data(), &outs[b]);
  }
  bool finite = true;
  for (double v : r.logprob) finite = finite && std::isfinite(v);
  if (post != nullptr) {
    for (const auto &o : outs) {
      r.alpha_beta_product += o.alpha_beta_product;
      r.frame0_post_sum += o.frame0_post_sum;
    }
    r.ok = finite && std::fabs(r.alpha_beta_product - S) <= 2.0 &&
           std::fabs(r.frame0_post_sum - S) <= 2.0;
  } else {
    r.alpha_beta_product = r.frame0_post_sum = S;
    r.ok = finite;
  }
  return r;
}

}  // namespace chain
}  // namespace pkwrap
