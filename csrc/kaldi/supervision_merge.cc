// See supervision_merge.h. Float sums are plain float adds (tropical Times), as in
// OpenFst; no contraction is involved (there are no products).
#include "kaldi/supervision_merge.h"

#include <cmath>
#include <deque>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>

namespace pkwrap {
namespace kaldi {

namespace {

struct Arc {
  int32_t il, ol;
  float w;
  int32_t next;
};

struct KeyHash {
  size_t operator()(const std::tuple<int32_t, int32_t, int32_t> &k) const {
    size_t h = static_cast<uint32_t>(std::get<0>(k));
    h = h * 7853 + static_cast<uint32_t>(std::get<1>(k));
    h = h * 7867 + static_cast<uint32_t>(std::get<2>(k));
    return h;
  }
};

}  // namespace

FstData ConcatRmEpsilonSortBfs(const std::vector<FstView> &fsts) {
  if (fsts.empty()) throw std::invalid_argument("merge: no FSTs");
  const float kInf = std::numeric_limits<float>::infinity();
  std::vector<std::vector<Arc>> arcs;
  std::vector<float> finals;
  auto append_plain = [&](const FstView &f) {
    const int32_t off = static_cast<int32_t>(arcs.size());
    for (int64_t s = 0; s < f.num_states; s++) {
      std::vector<Arc> sa;
      for (int64_t i = f.state_offsets[s]; i < f.state_offsets[s + 1]; i++)
        sa.push_back({f.ilabel[i], f.olabel[i], f.weight[i], f.nextstate[i] + off});
      arcs.push_back(std::move(sa));
      finals.push_back(f.final[s]);
    }
  };
  const FstView &last = fsts.back();
  if (last.start < 0) throw std::invalid_argument("merge: an FST has no start state");
  append_plain(last);
  int64_t start = last.start;
  for (int64_t k = static_cast<int64_t>(fsts.size()) - 2; k >= 0; k--) {
    const FstView &f = fsts[k];
    if (f.start < 0) throw std::invalid_argument("merge: an FST has no start state");
    const int32_t start2 = static_cast<int32_t>(start);
    const int32_t off = static_cast<int32_t>(arcs.size());
    for (int64_t s = 0; s < f.num_states; s++) {
      std::vector<Arc> sa;
      if (f.final[s] != kInf) sa.push_back({0, 0, f.final[s], start2});
      for (int64_t i = f.state_offsets[s]; i < f.state_offsets[s + 1]; i++)
        sa.push_back({f.ilabel[i], f.olabel[i], f.weight[i], f.nextstate[i] + off});
      arcs.push_back(std::move(sa));
      finals.push_back(kInf);
    }
    start = f.start + off;
  }
  const int64_t S = static_cast<int64_t>(arcs.size());

  // ---- RmEpsilon
  std::vector<char> noneps_in(S, 0);
  noneps_in[start] = 1;
  for (const auto &sa : arcs)
    for (const Arc &a : sa)
      if (a.il != 0 || a.ol != 0) noneps_in[a.next] = 1;
  std::vector<std::vector<Arc>> new_arcs(S);
  std::vector<float> new_finals(finals);
  std::vector<float> dist(S, kInf);
  std::vector<char> has_dist(S, 0), visited(S, 0);
  std::vector<int64_t> touched, todo, stack;
  std::unordered_map<std::tuple<int32_t, int32_t, int32_t>, size_t, KeyHash> where;
  std::vector<Arc> out;
  for (int64_t s = 0; s < S; s++) {
    if (!noneps_in[s]) continue;
    // tropical shortest distances over epsilon arcs
    touched.clear();
    todo.assign(1, s);
    dist[s] = 0.0f;
    has_dist[s] = 1;
    touched.push_back(s);
    while (!todo.empty()) {
      const int64_t q = todo.back();
      todo.pop_back();
      for (const Arc &a : arcs[q]) {
        if (a.il != 0 || a.ol != 0) continue;
        const float nd = dist[q] + a.w;
        if (!has_dist[a.next] || nd < dist[a.next]) {
          if (!has_dist[a.next]) touched.push_back(a.next);
          dist[a.next] = nd;
          has_dist[a.next] = 1;
          todo.push_back(a.next);
        }
      }
    }
    // depth-first visit of the closure, collecting non-epsilon arcs
    out.clear();
    where.clear();
    float fin = kInf;
    stack.assign(1, s);
    while (!stack.empty()) {
      const int64_t q = stack.back();
      stack.pop_back();
      if (visited[q]) continue;
      visited[q] = 1;
      for (const Arc &a : arcs[q]) {
        const float wt = dist[q] + a.w;
        if (a.il == 0 && a.ol == 0) {
          if (!visited[a.next]) stack.push_back(a.next);
        } else {
          auto key = std::make_tuple(a.il, a.ol, a.next);
          auto it = where.find(key);
          if (it != where.end()) {
            float &w = out[it->second].w;
            if (wt < w) w = wt;
          } else {
            where.emplace(key, out.size());
            out.push_back({a.il, a.ol, wt, a.next});
          }
        }
      }
      const float fq = dist[q] + finals[q];
      if (fq < fin) fin = fq;
    }
    for (int64_t q : touched) {
      visited[q] = 0;
      has_dist[q] = 0;
      dist[q] = kInf;
    }
    new_finals[s] = fin;
    new_arcs[s].assign(out.rbegin(), out.rend());
  }

  // ---- Connect
  std::vector<char> acc(S, 0), coacc(S, 0);
  acc[start] = 1;
  todo.assign(1, start);
  while (!todo.empty()) {
    const int64_t q = todo.back();
    todo.pop_back();
    for (const Arc &a : new_arcs[q])
      if (!acc[a.next]) { acc[a.next] = 1; todo.push_back(a.next); }
  }
  std::vector<std::vector<int32_t>> rev(S);
  for (int64_t q = 0; q < S; q++)
    for (const Arc &a : new_arcs[q]) rev[a.next].push_back(static_cast<int32_t>(q));
  todo.clear();
  for (int64_t q = 0; q < S; q++)
    if (new_finals[q] != kInf) { coacc[q] = 1; todo.push_back(q); }
  while (!todo.empty()) {
    const int64_t q = todo.back();
    todo.pop_back();
    for (int32_t p : rev[q])
      if (!coacc[p]) { coacc[p] = 1; todo.push_back(p); }
  }
  std::vector<int64_t> newid(S, -1);
  int64_t n = 0;
  for (int64_t q = 0; q < S; q++)
    if (acc[q] && coacc[q]) newid[q] = n++;
  if (newid[start] < 0) throw std::invalid_argument("merge: the merged FST is empty");

  // ---- SortBreadthFirstSearch (on the connected FST, arcs in order)
  std::vector<int64_t> order(S, -1);
  std::deque<int64_t> dq;
  std::vector<int64_t> bfs;  // old ids in BFS order
  dq.push_back(start);
  order[start] = 0;
  while (!dq.empty()) {
    const int64_t q = dq.front();
    dq.pop_front();
    bfs.push_back(q);
    for (const Arc &a : new_arcs[q]) {
      if (newid[a.next] < 0) continue;
      if (order[a.next] < 0) {
        order[a.next] = 1;  // mark seen; the index is its position in bfs
        dq.push_back(a.next);
      }
    }
  }
  if (static_cast<int64_t>(bfs.size()) != n)
    throw std::invalid_argument("merge: supervision FST is not connected");
  for (int64_t i = 0; i < n; i++) order[bfs[i]] = i;

  FstData res;
  res.start = 0;
  res.final.resize(n);
  res.state_offsets.assign(n + 1, 0);
  for (int64_t i = 0; i < n; i++) {
    const int64_t q = bfs[i];
    res.final[i] = new_finals[q];
    for (const Arc &a : new_arcs[q]) {
      if (newid[a.next] < 0) continue;
      res.ilabel.push_back(a.il);
      res.olabel.push_back(a.ol);
      res.weight.push_back(a.w);
      res.nextstate.push_back(static_cast<int32_t>(order[a.next]));
    }
    res.state_offsets[i + 1] = static_cast<int64_t>(res.ilabel.size());
  }
  return res;
}

}  // namespace kaldi
}  // namespace pkwrap
