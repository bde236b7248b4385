// Merging regular chain supervision FSTs as Kaldi's chain::MergeSupervision does
// (src/chain/chain-supervision.cc), with OpenFst 1.7 semantics:
//
//   out = fst[n-1];  for i = n-2 .. 0: fst::Concat(fst[i], &out)
//   fst::RmEpsilon(&out)            (tropical, connect = true)
//   SortBreadthFirstSearch(&out)    (BFS from the start, fst::StateSort)
//
// Concat appends the states of fst[i] after those already in `out` and links every
// final state f of fst[i] to the old start with an epsilon arc of weight final(f)
// (listed before f's own arcs); the new start is fst[i]'s start.
// RmEpsilon expands every state that has a non-epsilon incoming arc (or is the start):
// with d = tropical epsilon distances from it, it visits the epsilon closure depth
// first (a stack), collects each visited state's non-epsilon arcs with weight
// d[q] + w (duplicates (ilabel, olabel, nextstate) combined by min), sets the final
// weight min_q d[q] + final(q), and re-adds the collected arcs in REVERSE order.
// Other states lose their arcs; Connect then drops states that are not accessible
// and co-accessible (renumbering in order). The BFS renumbering visits arcs in order.
// Weights are float32 (-log probabilities); +inf is "not final".
#ifndef PKWRAP_CSRC_KALDI_SUPERVISION_MERGE_H_
#define PKWRAP_CSRC_KALDI_SUPERVISION_MERGE_H_

#include <cstdint>
#include <vector>

namespace pkwrap {
namespace kaldi {

// A read-only FST in pkwrap's flat layout: arcs of state s are
// [state_offsets[s], state_offsets[s+1]).
struct FstView {
  int64_t num_states;
  int64_t start;
  const float *final;            // [num_states]
  const int64_t *state_offsets;  // [num_states + 1]
  const int32_t *ilabel;         // [num_arcs]
  const int32_t *olabel;         // [num_arcs]
  const float *weight;           // [num_arcs]
  const int32_t *nextstate;      // [num_arcs]
};

struct FstData {
  int64_t start = -1;
  std::vector<float> final;
  std::vector<int64_t> state_offsets;
  std::vector<int32_t> ilabel, olabel, nextstate;
  std::vector<float> weight;
};

// Concat (last first) + RmEpsilon + Connect + breadth-first state order, as above.
// Throws std::invalid_argument on an FST without start state, or when the result is
// empty or not connected.
FstData ConcatRmEpsilonSortBfs(const std::vector<FstView> &fsts);

}  // namespace kaldi
}  // namespace pkwrap

#endif  // PKWRAP_CSRC_KALDI_SUPERVISION_MERGE_H_
