// csrc/chain/numerator.h
//
// Numerator forward-backward of LF-MMI: log-space, over the supervision FST.
//
// The supervision is an epsilon-free acceptor whose arcs carry label pdf+1 and a
// weight w_a read as -log(prob) in the log semiring; every arc consumes one frame.
// With x[tau][p] the (unclamped) network output at FST frame tau,
//   log alpha(start) = 0
//   log alpha(j)     = logsum_{a: i->j} log alpha(i) - w_a + x[tau(i)][p_a]
//   log Z            = logsum_{final i at the last frame} log alpha(i) - final(i)
//   log beta(i)      = logsum( -final(i) [if i is final at the last frame],
//                               logsum_{a: i->j} -w_a + x[tau(i)][p_a] + log beta(j) )
//   gamma[tau][p]    = sum_{a leaving a state at frame tau, p_a = p}
//                        exp(log alpha(i) - w_a + x[tau][p] + log beta(j) - log Z),
// and d log Z / d x[tau][p] = gamma[tau][p]. All in double, as Kaldi's
// NumeratorComputation does.
//
// Two ways of assigning frames to states:
//  * NumeratorForwardBackward (regular supervision, Kaldi's NumeratorComputation):
//    the FST is time-synchronous, every path to a state has the same length, so
//    each state has one frame tau(i) (found by breadth-first search) and each arc
//    is visited once. Kaldi merges the S sequences of a minibatch into one FST of
//    S*T frames (sequence 0 first); its frame tau is row tau of a batch-first
//    [S][T][P] output, so x is read at x + tau*P.
//  * NumeratorE2eForwardBackward (end-to-end supervision, Kaldi's
//    GenericNumeratorComputation): states may be revisited (self-loops), so the
//    recursion is frame-synchronous: alpha(t) and beta(t) are kept for every frame
//    t = 0..T and all arcs are visited on each frame.
#ifndef PKWRAP_CHAIN_NUMERATOR_H_
#define PKWRAP_CHAIN_NUMERATOR_H_

#include <cstdint>
#include <vector>

namespace pkwrap {
namespace chain {

// A borrowed view of an FST in the layout of pkwrap.kaldi.fst.Fst.
struct FstView {
  int64_t num_states = 0;
  int64_t start = -1;
  const float *final = nullptr;          // [num_states], +inf = not final
  const int64_t *state_offsets = nullptr;  // [num_states + 1]
  const int32_t *ilabel = nullptr;       // [num_arcs], pdf + 1
  const float *weight = nullptr;         // [num_arcs]
  const int32_t *nextstate = nullptr;    // [num_arcs]
};

// Regular (time-synchronous) supervision.
//   x:          [num_frames][P] float32 (frame tau at x + tau*P)
//   post:       nullptr, or [num_frames][P]: post_scale * gamma is ADDED to it
//   *ok:        false if log Z is not finite (no path, or NaN/inf in x)
// Returns log Z (not scaled). Throws std::invalid_argument (message names the
// problem) if the FST is not time-synchronous, is longer than num_frames, or has a
// label outside [1, P].
double NumeratorForwardBackward(const FstView &fst, const float *x, int64_t num_frames,
                                int P, float *post, float post_scale, bool *ok);

// The same on per-arc log-likelihoods (arc_loglike[a] = x[frame of a's source][pdf
// of a], as gathered on a device by the caller); arc_post[a] (if not nullptr,
// zeroed by the caller) receives each arc's posterior. Labels are not used.
double NumeratorArcsForwardBackward(const FstView &fst, const float *arc_loglike,
                                    int64_t num_frames, float *arc_post, bool *ok);

// Frame of every reachable state (-1: unreachable) and the reachable states in
// breadth-first order (sorted by frame). Throws std::invalid_argument if the FST
// is not time-synchronous or has paths longer than num_frames.
void StateTimes(const FstView &fst, int64_t num_frames, std::vector<int64_t> *time,
                std::vector<int64_t> *order);

// End-to-end supervision of one sequence of T frames (x and post as above).
double NumeratorE2eForwardBackward(const FstView &fst, const float *x, int T, int P,
                                   float *post, float post_scale, bool *ok);

}  // namespace chain
}  // namespace pkwrap

#endif  // PKWRAP_CHAIN_NUMERATOR_H_
