// csrc/chain/denominator.cc: see denominator.h for the recursion and the layout.
#include "chain/denominator.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
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
    // round to nearest by the 1.5 * 2^23 trick (|x * log2e| <= 44; no libm call, so
    // the loop vectorizes)
    const float kf = (x * kLog2e + 12582912.0f) - 12582912.0f;
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

// Sequences per block: one frame of alpha, beta and e for a block stays in L2.
constexpr int kMaxBlock = 32;

// 8 floats (one AVX register, two SSE registers); blocks are padded to a multiple of 8
// sequences so that every row of a block buffer is NV such vectors.
typedef float v8f __attribute__((vector_size(32)));

// Buffers of one thread, kept between calls (they only grow): a fresh allocation of
// the ~40 MB per block would cost more in page faults than the recursion itself.
struct Workspace {
  std::vector<v8f> E, alpha, csum, beta_next, beta_cur, gam;
  std::vector<float> tmp;
};

template <class V>
void Grow(V *v, size_t n) {
  if (v->size() < n) {
    V().swap(*v);
    v->resize(n);
  }
}

Workspace &ThreadWorkspace() {
  thread_local Workspace ws;
  return ws;
}

struct BlockOut {
  double alpha_beta_product = 0;
  double frame0_post_sum = 0;
};

// One block of w <= 8*NV consecutive sequences [s0, s0 + w), run start to end by one
// thread. Padding sequences (j >= w) see x = 0; they are never written out.
template <int NV>
void RunBlock(const DenGraph &g, const float *x, int T, int P, float leaky, int s0, int w,
              float *post, float post_scale, double *logprob, BlockOut *res) {
  constexpr int W = 8 * NV;
  const int N = g.num_states;
  const float *init = g.initial_probs.data();
  // e[t][p][j], later scaled by 1/c(t); row (t, p) is E[(t*P + p)*NV + k].
  Workspace &ws = ThreadWorkspace();
  Grow(&ws.E, static_cast<size_t>(T) * P * NV);
  v8f *const E = ws.E.data();
  {
    float *Ef = reinterpret_cast<float *>(E);
    Grow(&ws.tmp, 256);
    float *tmp = ws.tmp.data();
    // Tiles of kTile rows of (t, p) so that the transposed tile stays in L1/L2.
    constexpr size_t kTile = 256;
    const size_t TP = static_cast<size_t>(T) * P;
    for (size_t r0 = 0; r0 < TP; r0 += kTile) {
      const size_t nr = std::min(kTile, TP - r0);
      float *Et = Ef + r0 * W;
      for (int j = 0; j < W; ++j) {
        if (j < w)
          ExpClamped30(x + static_cast<size_t>(s0 + j) * TP + r0, tmp, nr);
        else if (j == w)
          std::fill(tmp, tmp + nr, 1.0f);
        for (size_t r = 0; r < nr; ++r) Et[r * W + j] = tmp[r];
      }
    }
  }
  // alpha'(t), t = 0..T: row (t, i) is alpha[(t*N + i)*NV + k]; c(t) is csum[t*NV + k].
  Grow(&ws.alpha, static_cast<size_t>(T + 1) * N * NV);
  Grow(&ws.csum, static_cast<size_t>(T + 1) * NV);
  v8f *const alpha = ws.alpha.data();
  v8f *const csum = ws.csum.data();
  double log_scale[W] = {0};
  v8f tot[NV];

  for (int i = 0; i < N; ++i)
    for (int k = 0; k < NV; ++k) alpha[i * NV + k] = init[i] + v8f{};

  const int32_t *bo = g.bwd_offsets.data(), *bs = g.bwd_src.data(), *bp = g.bwd_pdf.data();
  const float *bq = g.bwd_prob.data();
  for (int t = 0;; ++t) {
    v8f *__restrict at = alpha + static_cast<size_t>(t) * N * NV;
    v8f c[NV] = {};
    for (int i = 0; i < N; ++i)
      for (int k = 0; k < NV; ++k) c[k] += at[i * NV + k];
    for (int k = 0; k < NV; ++k) csum[t * NV + k] = c[k];
    for (int i = 0; i < N; ++i) {
      const float li = leaky * init[i];
      for (int k = 0; k < NV; ++k) at[i * NV + k] += li * c[k];
    }
    if (t == T) break;
    v8f inv[NV];
    for (int k = 0; k < NV; ++k) {
      inv[k] = 1.0f / c[k];
      for (int l = 0; l < 8; ++l) log_scale[k * 8 + l] += std::log(static_cast<double>(c[k][l]));
    }
    v8f *__restrict Et = E + static_cast<size_t>(t) * P * NV;
    for (int p = 0; p < P; ++p)
      for (int k = 0; k < NV; ++k) Et[p * NV + k] *= inv[k];
    v8f *__restrict an = at + static_cast<size_t>(N) * NV;
    for (int n = 0; n < N; ++n) {
      v8f acc[NV] = {};
      for (int32_t a = bo[n], end = bo[n + 1]; a < end; ++a) {
        const float q = bq[a];
        const v8f *ai = at + static_cast<size_t>(bs[a]) * NV;
        const v8f *ep = Et + static_cast<size_t>(bp[a]) * NV;
        for (int k = 0; k < NV; ++k) acc[k] += q * ai[k] * ep[k];
      }
      for (int k = 0; k < NV; ++k) an[n * NV + k] = acc[k];
    }
  }
  {
    const v8f *aT = alpha + static_cast<size_t>(T) * N * NV;
    double s[W] = {0};
    for (int i = 0; i < N; ++i)
      for (int k = 0; k < NV; ++k)
        for (int l = 0; l < 8; ++l) s[k * 8 + l] += aT[i * NV + k][l];
    for (int k = 0; k < NV; ++k)
      for (int l = 0; l < 8; ++l) tot[k][l] = static_cast<float>(s[k * 8 + l]);
    for (int j = 0; j < w; ++j) logprob[s0 + j] = std::log(s[j]) + log_scale[j];
  }
  if (post == nullptr) return;

  // Backward.
  Grow(&ws.beta_next, static_cast<size_t>(N) * NV);
  Grow(&ws.beta_cur, static_cast<size_t>(N) * NV);
  Grow(&ws.gam, static_cast<size_t>(P) * NV);
  v8f *beta_next = ws.beta_next.data(), *beta_cur = ws.beta_cur.data();
  v8f *const gam = ws.gam.data();
  auto leak = [&](v8f *b) {
    v8f bsum[NV] = {};
    for (int i = 0; i < N; ++i)
      for (int k = 0; k < NV; ++k) bsum[k] += init[i] * b[i * NV + k];
    for (int k = 0; k < NV; ++k) bsum[k] *= leaky;
    for (int i = 0; i < N; ++i)
      for (int k = 0; k < NV; ++k) b[i * NV + k] += bsum[k];
  };
  {
    v8f inv_tot[NV];
    for (int k = 0; k < NV; ++k) inv_tot[k] = 1.0f / tot[k];
    for (int i = 0; i < N; ++i)
      for (int k = 0; k < NV; ++k) beta_next[i * NV + k] = inv_tot[k];
  }
  leak(beta_next);
  const int32_t *fo = g.fwd_offsets.data(), *fd = g.fwd_dst.data(), *fp = g.fwd_pdf.data();
  const float *fq = g.fwd_prob.data();
  for (int t = T - 1; t >= 0; --t) {
    const v8f *__restrict at = alpha + static_cast<size_t>(t) * N * NV;
    const v8f *__restrict Et = E + static_cast<size_t>(t) * P * NV;
    const v8f *__restrict bn = beta_next;
    v8f *__restrict bcur = beta_cur;
    v8f *__restrict g_t = gam;
    std::fill(gam, gam + static_cast<size_t>(P) * NV, v8f{});
    for (int i = 0; i < N; ++i) {
      v8f ai[NV], bc[NV] = {};
      for (int k = 0; k < NV; ++k) ai[k] = at[i * NV + k];
      for (int32_t a = fo[i], end = fo[i + 1]; a < end; ++a) {
        const float q = fq[a];
        const v8f *bj = bn + static_cast<size_t>(fd[a]) * NV;
        const v8f *ep = Et + static_cast<size_t>(fp[a]) * NV;
        v8f *gp = g_t + static_cast<size_t>(fp[a]) * NV;
        for (int k = 0; k < NV; ++k) {
          const v8f v = q * ep[k] * bj[k];
          bc[k] += v;
          gp[k] += v * ai[k];
        }
      }
      for (int k = 0; k < NV; ++k) bcur[i * NV + k] = bc[k];
    }
    if (t == 0) {
      double ab = 0, ps = 0;
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < w; ++j)
          ab += static_cast<double>(at[i * NV + j / 8][j % 8]) * bcur[i * NV + j / 8][j % 8];
      for (int p = 0; p < P; ++p)
        for (int j = 0; j < w; ++j) ps += g_t[p * NV + j / 8][j % 8];
      res->alpha_beta_product = ab;
      res->frame0_post_sum = ps;
    }
    const float *gf = reinterpret_cast<const float *>(g_t);
    constexpr int kPTile = 64;
    for (int p0 = 0; p0 < P; p0 += kPTile) {
      const int p1 = std::min(P, p0 + kPTile);
      for (int j = 0; j < w; ++j) {
        float *dst = post + (static_cast<size_t>(s0 + j) * T + t) * P;
        for (int p = p0; p < p1; ++p) dst[p] = post_scale * gf[p * W + j];
      }
    }
    leak(bcur);
    std::swap(beta_next, beta_cur);
  }
}

void RunBlockAnyWidth(const DenGraph &g, const float *x, int T, int P, float leaky, int s0,
                      int w, float *post, float post_scale, double *logprob, BlockOut *res) {
  switch ((w + 7) / 8) {
    case 1: return RunBlock<1>(g, x, T, P, leaky, s0, w, post, post_scale, logprob, res);
    case 2: return RunBlock<2>(g, x, T, P, leaky, s0, w, post, post_scale, logprob, res);
    case 3: return RunBlock<3>(g, x, T, P, leaky, s0, w, post, post_scale, logprob, res);
    case 4: return RunBlock<4>(g, x, T, P, leaky, s0, w, post, post_scale, logprob, res);
    default: throw std::logic_error("denominator: block wider than kMaxBlock");
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
  num_threads = std::max(1, std::min(num_threads, S));
  // Blocks of at most kMaxBlock sequences keep one frame's alpha, beta and e in cache.
  const char *env_block = std::getenv("PKWRAP_DEN_BLOCK");
  const int max_block = env_block ? std::max(1, std::min(kMaxBlock, std::atoi(env_block))) : kMaxBlock;
  const int nb = std::max(num_threads, (S + max_block - 1) / max_block);
  DenResult r;
  r.logprob.assign(S, 0.0);
  std::vector<BlockOut> outs(nb);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int b = 0; b < nb; ++b) {
    const int s0 = static_cast<int>(static_cast<int64_t>(S) * b / nb);
    const int s1 = static_cast<int>(static_cast<int64_t>(S) * (b + 1) / nb);
    RunBlockAnyWidth(g, x, T, P, leaky, s0, s1 - s0, post, post_scale, r.logprob.data(), &outs[b]);
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
