// Bindings for csrc/chain/ (denominator and numerator forward-backward).
// Buffers are numpy arrays (float32/int32/int64, C-contiguous); heavy calls release
// the GIL. No torch header is used: pkwrap.chain passes tensor.numpy() views.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "chain/denominator.h"
#include "chain/numerator.h"

namespace py = pybind11;

namespace pkwrap {

namespace {

template <typename T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
std::vector<T> ToVector(const CArray<T> &a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

// A writable float32 C-contiguous array of exactly `n` elements, or throws.
float *MutableFloat(py::array &a, py::ssize_t n, const char *what) {
  if (!py::isinstance<py::array_t<float>>(a) || !(a.flags() & py::array::c_style) ||
      !a.writeable())
    throw std::invalid_argument(std::string(what) + " must be a writable C-contiguous float32 array");
  if (a.size() != n)
    throw std::invalid_argument(std::string(what) + " has " + std::to_string(a.size()) +
                                " elements, expected " + std::to_string(n));
  return static_cast<float *>(a.mutable_data());
}

// The optional output buffer `post` (None, or a writable float32 array of n elements),
// kept alive in `holder` while the kernel writes to it.
float *OptionalPost(const py::object &post, py::array &holder, py::ssize_t n, const char *what) {
  if (post.is_none()) return nullptr;
  holder = post.cast<py::array>();
  return MutableFloat(holder, n, what);
}

// Checks that x is a C-contiguous float32 array with `ndim` dimensions.
const float *FloatInput(const py::array &x, int ndim, const char *msg) {
  if (!py::isinstance<py::array_t<float>>(x) || !(x.flags() & py::array::c_style) ||
      x.ndim() != ndim)
    throw std::invalid_argument(msg);
  return static_cast<const float *>(x.data());
}

// Keeps the numpy arrays of an Fst alive while the view is used.
struct FstArrays {
  CArray<float> final;
  CArray<int64_t> offsets;
  CArray<int32_t> ilabel;
  CArray<float> weight;
  CArray<int32_t> nextstate;
  chain::FstView view;
  FstArrays(int64_t num_states, int64_t start, CArray<float> f, CArray<int64_t> o,
            CArray<int32_t> il, CArray<float> w, CArray<int32_t> ns)
      : final(f), offsets(o), ilabel(il), weight(w), nextstate(ns) {
    if (final.size() != num_states || offsets.size() != num_states + 1)
      throw std::invalid_argument("FST arrays: final must have num_states and state_offsets "
                                  "num_states+1 entries");
    const int64_t A = num_states > 0 ? offsets.data()[num_states] : 0;
    if (ilabel.size() != A || weight.size() != A || nextstate.size() != A)
      throw std::invalid_argument("FST arrays: arc arrays do not match state_offsets");
    if (num_states > 0 && offsets.data()[0] != 0)
      throw std::invalid_argument("FST arrays: state_offsets must start at 0");
    for (int64_t s = 0; s < num_states; ++s)
      if (offsets.data()[s] > offsets.data()[s + 1])
        throw std::invalid_argument("FST arrays: state_offsets must be non-decreasing");
    view.num_states = num_states;
    view.start = start;
    view.final = final.data();
    view.state_offsets = offsets.data();
    view.ilabel = ilabel.data();
    view.weight = weight.data();
    view.nextstate = nextstate.data();
  }
};

}  // namespace

void PybindChain(py::module &m) {
  py::class_<chain::DenGraph>(m, "DenGraph",
                              "Denominator HMM for the C++ kernels (built by "
                              "pkwrap.chain.DenominatorGraph.native()).")
      .def(py::init([](int num_states, int num_pdfs, CArray<int32_t> fwd_offsets,
                       CArray<int32_t> fwd_dst, CArray<int32_t> fwd_pdf, CArray<float> fwd_prob,
                       CArray<int32_t> bwd_offsets, CArray<int32_t> bwd_src,
                       CArray<int32_t> bwd_pdf, CArray<float> bwd_prob,
                       CArray<float> initial_probs) {
             auto g = new chain::DenGraph();
             g->num_states = num_states;
             g->num_pdfs = num_pdfs;
             g->fwd_offsets = ToVector(fwd_offsets);
             g->fwd_dst = ToVector(fwd_dst);
             g->fwd_pdf = ToVector(fwd_pdf);
             g->fwd_prob = ToVector(fwd_prob);
             g->bwd_offsets = ToVector(bwd_offsets);
             g->bwd_src = ToVector(bwd_src);
             g->bwd_pdf = ToVector(bwd_pdf);
             g->bwd_prob = ToVector(bwd_prob);
             g->initial_probs = ToVector(initial_probs);
             try {
               g->Check();
             } catch (...) {
               delete g;
               throw;
             }
             return g;
           }),
           py::arg("num_states"), py::arg("num_pdfs"), py::arg("fwd_offsets"),
           py::arg("fwd_dst"), py::arg("fwd_pdf"), py::arg("fwd_prob"), py::arg("bwd_offsets"),
           py::arg("bwd_src"), py::arg("bwd_pdf"), py::arg("bwd_prob"), py::arg("initial_probs"))
      .def_readonly("num_states", &chain::DenGraph::num_states)
      .def_readonly("num_pdfs", &chain::DenGraph::num_pdfs);

  m.def(
      "den_forward_backward",
      [](const chain::DenGraph &g, py::array x, float leaky, py::object post,
         float post_scale, int num_threads) {
        const float *xp = FloatInput(x, 3, "den_forward_backward: x must be a C-contiguous "
                                     "float32 array of shape (S, T, P)");
        const int S = x.shape(0), T = x.shape(1), P = x.shape(2);
        py::array post_arr;
        float *post_ptr = OptionalPost(post, post_arr, x.size(), "den_forward_backward: post");
        chain::DenResult r;
        {
          py::gil_scoped_release release;
          r = chain::DenominatorForwardBackward(g, xp, S, T, P, leaky, post_ptr, post_scale,
                                                num_threads);
        }
        py::array_t<double> lp(S);
        std::copy(r.logprob.begin(), r.logprob.end(), lp.mutable_data());
        return py::make_tuple(lp, r.ok, r.alpha_beta_product, r.frame0_post_sum);
      },
      py::arg("graph"), py::arg("x"), py::arg("leaky_hmm_coefficient"),
      py::arg("post") = py::none(), py::arg("post_scale") = 1.0f, py::arg("num_threads") = 0,
      "Denominator forward-backward on x [S][T][P] (float32, batch-first). Writes "
      "post_scale * occupation posteriors into post (same shape) when given. Returns "
      "(logprob[S] float64, ok, alpha_beta_product, frame0_post_sum).");

  m.def(
      "num_forward_backward",
      [](int64_t num_states, int64_t start, CArray<float> final, CArray<int64_t> offsets,
         CArray<int32_t> ilabel, CArray<float> weight, CArray<int32_t> nextstate, py::array x,
         bool e2e, py::object post, float post_scale) {
        FstArrays f(num_states, start, final, offsets, ilabel, weight, nextstate);
        const float *xp = FloatInput(x, 2, "num_forward_backward: x must be a C-contiguous "
                                     "float32 array of shape (frames, P)");
        const int64_t F = x.shape(0);
        const int P = x.shape(1);
        py::array post_arr;
        float *post_ptr = OptionalPost(post, post_arr, x.size(), "num_forward_backward: post");
        bool ok = false;
        double logprob;
        {
          py::gil_scoped_release release;
          logprob = e2e ? chain::NumeratorE2eForwardBackward(f.view, xp, static_cast<int>(F), P,
                                                             post_ptr, post_scale, &ok)
                        : chain::NumeratorForwardBackward(f.view, xp, F, P, post_ptr,
                                                          post_scale, &ok);
        }
        return py::make_tuple(logprob, ok);
      },
      py::arg("num_states"), py::arg("start"), py::arg("final"), py::arg("state_offsets"),
      py::arg("ilabel"), py::arg("weight"), py::arg("nextstate"), py::arg("x"),
      py::arg("e2e") = false, py::arg("post") = py::none(), py::arg("post_scale") = 1.0f,
      "Numerator log-space forward-backward of one supervision FST over x [frames][P]; "
      "ADDS post_scale * posteriors into post. Returns (logprob, ok).");

  m.def(
      "num_arc_frames",
      [](int64_t num_states, int64_t start, CArray<float> final, CArray<int64_t> offsets,
         CArray<int32_t> ilabel, CArray<float> weight, CArray<int32_t> nextstate,
         int64_t num_frames) {
        FstArrays f(num_states, start, final, offsets, ilabel, weight, nextstate);
        std::vector<int64_t> time, order;
        chain::StateTimes(f.view, num_frames, &time, &order);
        const int64_t A = ilabel.size();
        py::array_t<int64_t> out(A);
        int64_t *o = out.mutable_data();
        for (int64_t s = 0; s < num_states; ++s)
          for (int64_t a = offsets.data()[s]; a < offsets.data()[s + 1]; ++a) o[a] = time[s];
        return out;
      },
      py::arg("num_states"), py::arg("start"), py::arg("final"), py::arg("state_offsets"),
      py::arg("ilabel"), py::arg("weight"), py::arg("nextstate"), py::arg("num_frames"),
      "Frame of each arc's source state in a time-synchronous supervision FST (-1: "
      "unreachable). Raises ValueError if the FST is not time-synchronous.");

  m.def(
      "num_forward_backward_arcs",
      [](int64_t num_states, int64_t start, CArray<float> final, CArray<int64_t> offsets,
         CArray<int32_t> ilabel, CArray<float> weight, CArray<int32_t> nextstate,
         CArray<float> arc_loglike, int64_t num_frames, bool want_post) {
        FstArrays f(num_states, start, final, offsets, ilabel, weight, nextstate);
        const int64_t A = ilabel.size();
        if (arc_loglike.size() != A)
          throw std::invalid_argument("num_forward_backward_arcs: arc_loglike must have one "
                                      "value per arc");
        py::array_t<float> post(want_post ? A : 0);
        float *pp = nullptr;
        if (want_post) {
          pp = post.mutable_data();
          std::fill(pp, pp + A, 0.0f);
        }
        bool ok = false;
        double logprob;
        {
          py::gil_scoped_release release;
          logprob = chain::NumeratorArcsForwardBackward(f.view, arc_loglike.data(), num_frames,
                                                        pp, &ok);
        }
        return py::make_tuple(logprob, ok, post);
      },
      py::arg("num_states"), py::arg("start"), py::arg("final"), py::arg("state_offsets"),
      py::arg("ilabel"), py::arg("weight"), py::arg("nextstate"), py::arg("arc_loglike"),
      py::arg("num_frames"), py::arg("want_post") = true,
      "Regular numerator on per-arc log-likelihoods (gathered by the caller, e.g. on a "
      "GPU). Returns (logprob, ok, per-arc posteriors).");
}

}  // namespace pkwrap
