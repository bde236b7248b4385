// csrc/chain/numerator.cc: see numerator.h for the recursion.
#include "chain/numerator.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace pkwrap {
namespace chain {

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

inline double LogAdd(double a, double b) {
  if (a < b) std::swap(a, b);
  if (b == kNegInf) return a;
  return a + std::log1p(std::exp(b - a));
}

void CheckLabels(const FstView &f, int P, const char *what) {
  const int64_t A = f.state_offsets[f.num_states];
  for (int64_t a = 0; a < A; ++a) {
    if (f.ilabel[a] < 1 || f.ilabel[a] > P)
      throw std::invalid_argument(std::string(what) + ": arc label " +
                                  std::to_string(f.ilabel[a]) + " outside [1, num_pdfs=" +
                                  std::to_string(P) + "] (labels are pdf-id + 1)");
    if (f.nextstate[a] < 0 || f.nextstate[a] >= f.num_states)
      throw std::invalid_argument(std::string(what) + ": arc to a state that does not exist");
  }
  if (f.start < 0 || f.start >= f.num_states)
    throw std::invalid_argument(std::string(what) + ": the FST has no start state");
}

}  // namespace

// Frame of each reachable state (BFS from the start; -1 if unreachable) and the
// states in BFS order (which is sorted by frame). Throws if not time-synchronous.
void StateTimes(const FstView &f, int64_t num_frames, std::vector<int64_t> *time,
                std::vector<int64_t> *order) {
  const int64_t N = f.num_states;
  if (f.start < 0 || f.start >= N)
    throw std::invalid_argument("numerator supervision FST has no start state");
  time->assign(N, -1);
  order->clear();
  order->reserve(N);
  (*time)[f.start] = 0;
  order->push_back(f.start);
  for (size_t k = 0; k < order->size(); ++k) {
    const int64_t s = (*order)[k];
    const int64_t ts = (*time)[s];
    for (int64_t a = f.state_offsets[s]; a < f.state_offsets[s + 1]; ++a) {
      const int64_t n = f.nextstate[a];
      if (n < 0 || n >= N)
        throw std::invalid_argument("numerator supervision FST: arc to a state that does not exist");
      if ((*time)[n] < 0) {
        (*time)[n] = ts + 1;
        order->push_back(n);
      } else if ((*time)[n] != ts + 1) {
        throw std::invalid_argument(
            "numerator supervision FST is not time-synchronous: state " + std::to_string(n) +
            " is reached after " + std::to_string((*time)[n]) + " and after " +
            std::to_string(ts + 1) + " frames (use the e2e numerator for FSTs with loops)");
      }
    }
    if (ts >= num_frames && f.state_offsets[s + 1] > f.state_offsets[s])
      throw std::invalid_argument("numerator supervision FST has paths longer than the " +
                                  std::to_string(num_frames) + " frames of the output");
  }
}

namespace {

// The regular numerator over any source of arc log-likelihoods: loglike(a, frame)
// returns x[frame][pdf(a)] and add_post(a, frame, value) accumulates a posterior.
template <class LogLike, class AddPost>
double RegularForwardBackward(const FstView &f, int64_t num_frames, bool want_post,
                              LogLike loglike, AddPost add_post, bool *ok) {
  const int64_t N = f.num_states;
  std::vector<int64_t> time, order;
  StateTimes(f, num_frames, &time, &order);
  std::vector<double> la(N, kNegInf), lb(N, kNegInf);
  la[f.start] = 0.0;
  for (int64_t s : order) {
    const double as = la[s];
    if (as == kNegInf) continue;
    for (int64_t a = f.state_offsets[s]; a < f.state_offsets[s + 1]; ++a) {
      const double v = as - f.weight[a] + loglike(a, time[s]);
      la[f.nextstate[a]] = LogAdd(la[f.nextstate[a]], v);
    }
  }
  double tot = kNegInf;
  for (int64_t s : order)
    if (time[s] == num_frames && std::isfinite(f.final[s]))
      tot = LogAdd(tot, la[s] - f.final[s]);
  *ok = std::isfinite(tot);
  if (!want_post) return tot;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const int64_t s = *it;
    double b = (time[s] == num_frames && std::isfinite(f.final[s])) ? -f.final[s] : kNegInf;
    const double as = la[s];
    for (int64_t a = f.state_offsets[s]; a < f.state_offsets[s + 1]; ++a) {
      const double v = -f.weight[a] + loglike(a, time[s]) + lb[f.nextstate[a]];
      b = LogAdd(b, v);
      if (*ok && as != kNegInf && v != kNegInf) add_post(a, time[s], std::exp(as + v - tot));
    }
    lb[s] = b;
  }
  return tot;
}

}  // namespace

double NumeratorForwardBackward(const FstView &f, const float *x, int64_t num_frames, int P,
                                float *post, float post_scale, bool *ok) {
  CheckLabels(f, P, "numerator supervision FST");
  return RegularForwardBackward(
      f, num_frames, post != nullptr,
      [&](int64_t a, int64_t t) { return static_cast<double>(x[t * P + f.ilabel[a] - 1]); },
      [&](int64_t a, int64_t t, double occ) {
        post[t * P + f.ilabel[a] - 1] += post_scale * static_cast<float>(occ);
      },
      ok);
}

double NumeratorArcsForwardBackward(const FstView &f, const float *arc_loglike,
                                    int64_t num_frames, float *arc_post, bool *ok) {
  return RegularForwardBackward(
      f, num_frames, arc_post != nullptr,
      [&](int64_t a, int64_t) { return static_cast<double>(arc_loglike[a]); },
      [&](int64_t a, int64_t, double occ) { arc_post[a] += static_cast<float>(occ); }, ok);
}

double NumeratorE2eForwardBackward(const FstView &f, const float *x, int T, int P,
                                   float *post, float post_scale, bool *ok) {
  CheckLabels(f, P, "e2e supervision FST");
  const int64_t N = f.num_states;
  std::vector<double> la(static_cast<size_t>(T + 1) * N, kNegInf);
  la[f.start] = 0.0;
  for (int t = 0; t < T; ++t) {
    const double *at = la.data() + static_cast<size_t>(t) * N;
    double *an = la.data() + static_cast<size_t>(t + 1) * N;
    const float *xr = x + static_cast<size_t>(t) * P;
    for (int64_t s = 0; s < N; ++s) {
      if (at[s] == kNegInf) continue;
      for (int64_t a = f.state_offsets[s]; a < f.state_offsets[s + 1]; ++a)
        an[f.nextstate[a]] = LogAdd(an[f.nextstate[a]], at[s] - f.weight[a] + xr[f.ilabel[a] - 1]);
    }
  }
  double tot = kNegInf;
  const double *aT = la.data() + static_cast<size_t>(T) * N;
  for (int64_t s = 0; s < N; ++s)
    if (std::isfinite(f.final[s])) tot = LogAdd(tot, aT[s] - f.final[s]);
  *ok = std::isfinite(tot);
  if (post == nullptr || !*ok) return tot;
  std::vector<double> bn(N), bc(N);
  for (int64_t s = 0; s < N; ++s) bn[s] = std::isfinite(f.final[s]) ? -f.final[s] : kNegInf;
  for (int t = T - 1; t >= 0; --t) {
    const double *at = la.data() + static_cast<size_t>(t) * N;
    const float *xr = x + static_cast<size_t>(t) * P;
    float *pr = post + static_cast<size_t>(t) * P;
    for (int64_t s = 0; s < N; ++s) {
      double b = kNegInf;
      for (int64_t a = f.state_offsets[s]; a < f.state_offsets[s + 1]; ++a) {
        const double v = -f.weight[a] + xr[f.ilabel[a] - 1] + bn[f.nextstate[a]];
        b = LogAdd(b, v);
        if (at[s] != kNegInf && v != kNegInf)
          pr[f.ilabel[a] - 1] += post_scale * static_cast<float>(std::exp(at[s] + v - tot));
      }
      bc[s] = b;
    }
    std::swap(bn, bc);
  }
  return tot;
}

}  // namespace chain
}  // namespace pkwrap
