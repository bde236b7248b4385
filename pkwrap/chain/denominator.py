"""Denominator log-probability of LF-MMI with its leaky-HMM forward-backward.

For sequence s with output x[s] ``[T][P]``, ``e[t][p] = exp(clamp(x[s][t][p], -30, 30))``,
initial probabilities pi and leaky coefficient l (Kaldi's DenominatorComputation)::

    alpha(0) = pi
    c(t)          = sum_i alpha(t)_i
    alpha'(t)_i   = alpha(t)_i + l * pi_i * c(t)
    alpha(t+1)_j  = sum_{arcs i->j, pdf p, prob q} alpha'(t)_i * q * e[t][p] / c(t)
    log p_den(s)  = log(sum_i alpha'(T)_i) + sum_{t<T} log c(t)

and d log p_den / d x[s][t][p] is the occupation posterior gamma[s][t][p] of pdf p
(each frame sums to one). As in Kaldi the clamp is ignored in the derivative (the
posterior is returned even where |x| > 30; the out-of-range penalty of
:class:`pkwrap.chain.ChainLoss` keeps x in range).

Three implementations that agree to float32 rounding:

* ``backend="cpp"``: the C++/OpenMP kernel of ``csrc/chain/denominator.cc`` (CPU tensors).
* ``backend="triton"``: fused Triton kernels, one launch per frame, replayed as one CUDA
  graph per minibatch shape (:mod:`pkwrap.chain.den_triton`); used automatically for CUDA
  tensors when Triton is installed (it comes with CUDA builds of torch).
* ``backend="torch"``: plain torch gather/index_add ops, one step per frame; any
  device (the fallback for CUDA tensors without Triton).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

from .den_graph import DenominatorGraph

__all__ = ["denominator_logprob", "denominator_forward_backward", "DenResult"]


class DenResult:
    """What one denominator forward-backward returns.

    Attributes:
      logprob: float64 tensor ``[S]``, log p_den of each sequence.
      post: float32 tensor ``[S][T][P]`` (times ``post_scale``), or None if not asked for.
      ok: Kaldi's check passed: on frame 0, ``sum(alpha' * beta')`` and the sum of
        the posteriors (both summed over sequences) are within 2 of S, and logprob
        is finite.
    """

    __slots__ = ("logprob", "post", "ok")

    def __init__(self, logprob, post, ok):
        self.logprob = logprob
        self.post = post
        self.ok = ok


BACKENDS = ("auto", "cpp", "triton", "torch")


def _pick_backend(x: torch.Tensor, backend: Optional[str]) -> str:
    if backend is None or backend == "auto":
        if x.device.type == "cpu":
            return "cpp"
        from . import den_triton
        return "triton" if x.device.type == "cuda" and den_triton.available() else "torch"
    if backend not in BACKENDS:
        raise ValueError("backend must be one of %s, got %r" % (", ".join(map(repr, BACKENDS)),
                                                                 backend))
    if backend == "cpp" and x.device.type != "cpu":
        raise ValueError("backend 'cpp' needs a CPU tensor, got one on %s" % x.device)
    if backend == "triton" and x.device.type != "cuda" and \
            os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for "
                         "Triton's interpreter), got one on %s" % x.device)
    return backend


def _check_input(den_graph: DenominatorGraph, x: torch.Tensor, leaky: float):
    if not isinstance(x, torch.Tensor):
        raise TypeError("the network output must be a torch.Tensor, got %s" % type(x).__name__)
    if x.dim() != 3:
        raise ValueError("the network output must have shape (num_sequences, frames, num_pdfs); "
                         "got shape %s" % (tuple(x.shape),))
    S, T, P = x.shape
    if P != den_graph.num_pdfs:
        raise ValueError("the network output has %d pdfs (last dim) but the denominator graph "
                         "%s has num_pdfs=%d" % (P, den_graph.name, den_graph.num_pdfs))
    if S == 0 or T == 0:
        raise ValueError("the network output is empty: shape %s" % (tuple(x.shape),))
    if not 0.0 < float(leaky) < 1.0:
        raise ValueError("leaky_hmm_coefficient must be in (0, 1), got %r" % (leaky,))


def denominator_forward_backward(den_graph: DenominatorGraph, x: torch.Tensor,
                                 leaky_hmm_coefficient: float, want_post: bool = True,
                                 post_scale: float = 1.0, backend: Optional[str] = None,
                                 num_threads: Optional[int] = None) -> DenResult:
    """Run the denominator forward (and backward) pass; no autograd.

    Args:
      den_graph: the denominator graph.
      x: the chain output ``[S][T][P]`` (batch-first); read as float32.
      leaky_hmm_coefficient: l in (0, 1).
      want_post: also run the backward pass and return the posteriors.
      post_scale: the returned posteriors are multiplied by this.
      backend: "auto" (C++ on CPU, Triton on CUDA, else torch), "cpp", "triton" or "torch".
      num_threads: threads of the C++ kernel (default ``torch.get_num_threads()``).
    Returns:
      A :class:`DenResult` (tensors on x's device).
    """
    _check_input(den_graph, x, leaky_hmm_coefficient)
    backend = _pick_backend(x, backend)
    x = x.detach()
    if backend == "torch":
        return _den_torch(den_graph, x, float(leaky_hmm_coefficient), want_post, post_scale)
    if backend == "triton":
        lp, post, ok = den_graph.triton(x.device)(x, float(leaky_hmm_coefficient), want_post,
                                                  post_scale)
        return DenResult(lp, post, ok)
    from .. import _pkwrap
    xc = x.to(torch.float32).contiguous()
    post = torch.empty(xc.shape, dtype=torch.float32) if want_post else None
    nt = torch.get_num_threads() if num_threads is None else int(num_threads)
    lp, ok, _, _ = _pkwrap.den_forward_backward(
        den_graph.native(), xc.numpy(), float(leaky_hmm_coefficient),
        post.numpy() if post is not None else None, float(post_scale), nt)
    return DenResult(torch.from_numpy(lp), post, bool(ok))


def _den_torch(g: DenominatorGraph, x: torch.Tensor, leaky: float, want_post: bool,
               post_scale: float) -> DenResult:
    """The same recursion with plain torch ops (see the module docstring).

    Layout as in the C++ kernel: alpha/beta ``[N][S]`` and e ``[T][P][S]``, so every
    gather / index_add moves whole rows of S sequences.
    """
    S, T, P = x.shape
    dev = x.device
    a = g.torch_arrays(dev)
    src, dst, pdf, prob, init = a["src"], a["dst"], a["pdf"], a["prob"], a["init"]
    N = g.num_states
    prob_c = prob.unsqueeze(1)
    init_c = init.unsqueeze(1)
    e = x.to(torch.float32).clamp(-30.0, 30.0).exp().permute(1, 2, 0).contiguous()  # [T][P][S]
    alpha = init_c.expand(N, S)
    alphas = []
    log_scale = torch.zeros(S, dtype=torch.float64, device=dev)
    for t in range(T):
        c = alpha.sum(0)
        alpha = alpha + leaky * init_c * c
        e[t] /= c  # e is scaled in place by 1/c(t), as in the kernel
        log_scale += torch.log(c.to(torch.float64))
        if want_post:
            alphas.append(alpha)
        contrib = alpha[src] * prob_c * e[t][pdf]
        alpha = torch.zeros(N, S, dtype=torch.float32, device=dev).index_add_(0, dst, contrib)
    c = alpha.sum(0)
    alpha = alpha + leaky * init_c * c
    tot = alpha.to(torch.float64).sum(0)
    logprob = torch.log(tot) + log_scale
    ok = bool(torch.isfinite(logprob).all())
    if not want_post:
        return DenResult(logprob, None, ok)
    post = torch.empty(S, T, P, dtype=torch.float32, device=dev)
    beta = (1.0 / tot.to(torch.float32)).unsqueeze(0).expand(N, S)
    beta = beta + leaky * (init @ beta).unsqueeze(0)
    ab = ps = None
    for t in range(T - 1, -1, -1):
        v = prob_c * e[t][pdf] * beta[dst]
        beta_dash = torch.zeros(N, S, dtype=torch.float32, device=dev).index_add_(0, src, v)
        occ = v * alphas[t][src]
        gam = torch.zeros(P, S, dtype=torch.float32, device=dev).index_add_(0, pdf, occ)
        post[:, t, :] = gam.t() * post_scale
        if t == 0:
            ab = float((alphas[0].to(torch.float64) * beta_dash).sum())
            ps = float(gam.to(torch.float64).sum())
        beta = beta_dash + leaky * (init @ beta_dash).unsqueeze(0)
    ok = ok and abs(ab - S) <= 2.0 and abs(ps - S) <= 2.0
    return DenResult(logprob, post, ok)


class _DenominatorLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, den_graph, leaky, backend, num_threads):
        r = denominator_forward_backward(den_graph, x, leaky, want_post=x.requires_grad,
                                         backend=backend, num_threads=num_threads)
        ctx.save_for_backward(r.post if r.post is not None else torch.empty(0))
        return r.logprob.sum().to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (post,) = ctx.saved_tensors
        return (grad * post).to(grad.dtype), None, None, None, None


def denominator_logprob(den_graph: DenominatorGraph, output: torch.Tensor,
                        leaky_hmm_coefficient: float = 0.1, backend: Optional[str] = None,
                        num_threads: Optional[int] = None) -> torch.Tensor:
    """The denominator log-probability summed over sequences, differentiable.

    Equals Kaldi's ``DenominatorComputation::Forward()``; its gradient w.r.t.
    ``output`` is ``Backward(1.0)``, the occupation posteriors (each frame sums to 1).

    Args:
      den_graph: the denominator graph.
      output: the chain output ``[S][T][P]`` (batch-first).
      leaky_hmm_coefficient: l in (0, 1).
      backend: "auto" (C++ on CPU, Triton on CUDA, else torch), "cpp", "triton" or "torch".
      num_threads: threads of the C++ kernel (default ``torch.get_num_threads()``).
    Returns:
      A scalar tensor (dtype of ``output``): ``sum_s log p_den(s)``.
    """
    return _DenominatorLogprobFunction.apply(output, den_graph, float(leaky_hmm_coefficient),
                                             backend, num_threads)
