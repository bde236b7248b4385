// csrc/chain/denominator.h
//
// Denominator forward-backward of LF-MMI ("chain") training on the CPU.
//
// Notation. The denominator graph is an HMM with states i, j = 0 .. N-1 and arcs
// a = (i -> j, pdf p_a, probability q_a). A minibatch has S sequences of T frames;
// x[s][t][p] is the network output (a pseudo log-likelihood) and
//   e[t][p] = exp(clamp(x[t][p], -30, 30))
// for one sequence (the sequence index s is dropped below: the sequences are
// independent and run side by side). pi_i are the initial probabilities.
//
// 1) Plain forward-backward. Every state is final with probability one:
//      alpha(0)_i   = pi_i
//      alpha(t+1)_j = sum_{a: i->j} alpha(t)_i q_a e[t][p_a]
//      P            = sum_i alpha(T)_i
//      beta(T)_i    = 1
//      beta(t)_i    = sum_{a: i->j} q_a e[t][p_a] beta(t+1)_j
//    and the derivative of log P w.r.t. x[t][p] is the occupation posterior
//      gamma[t][p]  = sum_{a with p_a = p} alpha(t)_i q_a e[t][p] beta(t+1)_j / P.
//
// 2) Arbitrary scaling. The recursion runs in probability space (that is why x is
//    clamped: exp must neither overflow nor underflow), so alpha would shrink or
//    grow geometrically over T frames. On every frame we divide by the alpha sum
//      c(t) = sum_i alpha(t)_i ,
//    i.e. the arc probabilities from frame t to t+1 are multiplied by 1/c(t), in
//    the forward and in the backward direction alike. Posteriors are unchanged,
//    and the log-likelihood becomes
//      log P = log(sum_i alpha(T)_i) + sum_{t<T} log c(t).
//    In the kernels, e[t][.] itself is divided by c(t) once c(t) is known, so the
//    forward and backward passes read the same scaled likelihoods.
//
// 3) Leaky HMM (coefficient l). From each state an epsilon transition goes to a
//    special state with probability one, and from there to every state j with
//    probability l * pi_j (taken at most once per frame). On each frame, after the
//    arcs, we form
//      alpha'(t)_i = alpha(t)_i + l * pi_i * c(t),      c(t) = sum_i alpha(t)_i
//    and the next frame reads alpha'(t) instead of alpha(t):
//      alpha(t+1)_j = sum_{a: i->j} alpha'(t)_i q_a e[t][p_a] / c(t)
//      log P        = log(sum_i alpha'(T)_i) + sum_{t<T} log c(t).
//    The backward pass mirrors it. beta'(T)_i = 1 / sum_i alpha'(T)_i (the 1/P
//    factor is folded in so the products below are posteriors directly), and
//      beta(t)_i  = beta'(t)_i + l * sum_j pi_j beta'(t)_j           (leak, transposed)
//      beta'(t)_i = sum_{a: i->j} q_a e[t][p_a] beta(t+1)_j / c(t)
//      gamma[t][p] = sum_{a with p_a = p} alpha'(t)_i q_a e[t][p] beta(t+1)_j / c(t).
//    Each frame's gamma sums to one, and sum_i alpha'(t)_i beta'(t)_i = 1. On frame
//    0 both sums are checked (summed over sequences), as Kaldi does; an error above
//    2 marks the minibatch as failed.
//
// Layout and parallelism. For one thread's block of w consecutive sequences the
// kernel keeps e as [t][pdf][w] and alpha as [t][state][w] (beta as [state][w]), so
// every arc is a contiguous multiply-add over w sequences (SIMD). Forward visits
// the arcs grouped by destination state (one accumulator per state), backward
// grouped by source state. Sequences are split into blocks, one per OpenMP thread;
// blocks never share data, so there is no synchronization inside the recursion.
// Arithmetic is float32 (Kaldi's BaseFloat), log-likelihood sums in double.
// Blocks hold at most 32 sequences (padded to a multiple of 8 with dummy
// sequences); the environment variable PKWRAP_DEN_BLOCK lowers that cap (for
// tuning). Each thread keeps its buffers (e, alpha, beta: about
// (T+1) * (N + P) * 32 floats) between calls, so repeated minibatches of the same
// size allocate nothing.
#ifndef PKWRAP_CHAIN_DENOMINATOR_H_
#define PKWRAP_CHAIN_DENOMINATOR_H_

#include <cstdint>
#include <vector>

namespace pkwrap {
namespace chain {

// The denominator HMM in two arc groupings (see den_graph.py for how it is built).
struct DenGraph {
  int32_t num_states = 0;  // N
  int32_t num_pdfs = 0;    // P
  // Arcs grouped by source state: arcs of i are [fwd_offsets[i], fwd_offsets[i+1]).
  std::vector<int32_t> fwd_offsets;  // [N+1]
  std::vector<int32_t> fwd_dst;      // [A] destination state
  std::vector<int32_t> fwd_pdf;      // [A] pdf id in [0, P)
  std::vector<float> fwd_prob;       // [A] transition probability q_a
  // The same arcs grouped by destination state.
  std::vector<int32_t> bwd_offsets;  // [N+1]
  std::vector<int32_t> bwd_src;      // [A] source state
  std::vector<int32_t> bwd_pdf;      // [A]
  std::vector<float> bwd_prob;       // [A]
  std::vector<float> initial_probs;  // [N] pi

  // Throws std::invalid_argument if the arrays are inconsistent.
  void Check() const;
};

// Result of DenominatorForwardBackward.
struct DenResult {
  std::vector<double> logprob;  // [S] log P of each sequence
  double alpha_beta_product = 0;  // sum over s, i of alpha'(0)_i beta'(0)_i (should be S)
  double frame0_post_sum = 0;     // sum over s, p of gamma[0][p] (should be S)
  bool ok = true;                 // Kaldi's check: both within 2 of S, and finite
};

// Forward (and optionally backward) over a minibatch.
//   x:          [S][T][P] float32, batch-first, contiguous (row (s, t) at (s*T + t)*P).
//   leaky:      leaky-HMM coefficient l, 0 < l < 1.
//   post:       nullptr for the forward only; else [S][T][P] float32, overwritten
//               with post_scale * gamma (same layout as x).
//   num_threads: OpenMP threads (<= 0: the OpenMP default); sequences are split
//               into that many blocks.
DenResult DenominatorForwardBackward(const DenGraph &g, const float *x, int S, int T,
                                     int P, float leaky, float *post, float post_scale,
                                     int num_threads);

// e[k] = exp(clamp(in[k], -30, 30)) for k < n; a vectorizable polynomial exp with
// about 2e-7 relative error (NaN stays NaN).
void ExpClamped30(const float *in, float *out, int64_t n);

}  // namespace chain
}  // namespace pkwrap

#endif  // PKWRAP_CHAIN_DENOMINATOR_H_
