"""Numerator log-probability of LF-MMI: forward-backward over the supervision FST.

The supervision FSTs are epsilon-free acceptors, labels pdf+1, weights -log(prob)
read in the log semiring; every arc consumes one frame. With the *unclamped* output
x (no exp is taken, the recursion is in log space, float64)::

    log alpha(j) = logsum_{arcs a: i->j} log alpha(i) - w_a + x[frame][p_a]
    log p_num    = logsum_{final i} log alpha_end(i) - final(i)

and d log p_num / d x[frame][p] is the posterior of pdf p at that frame.

* Regular supervision (Kaldi's NumeratorComputation): ``supervision.fst`` is ONE
  time-synchronous FST for the S sequences concatenated (sequence 0 first). Its
  frame tau is sequence ``tau // T``, frame ``tau % T``: with a batch-first
  ``[S][T][P]`` output that is simply row tau of ``x.reshape(S*T, P)``.
* End-to-end supervision (Kaldi's GenericNumeratorComputation):
  ``supervision.e2e_fsts[s]`` is sequence s's own FST over its T frames; it may
  have self-loops, so the recursion is frame-synchronous.

The value returned is multiplied by ``supervision.weight`` (Kaldi's
``num_logprob_weighted``), and so are the posteriors. (Kaldi's generic numerator
leaves its log-likelihood unweighted but weights its derivative; both are weighted
here, so that objf and gradient agree. The e2e fixtures all have weight 1.)

Backends:
  * "cpp": csrc/chain/numerator.cc on a CPU output.
  * "host": for an output on another device (used automatically for CUDA tensors):
    the log-likelihoods the FST needs are gathered on the device, the same C++
    recursion runs on the host (as Kaldi's numerator does) and the posteriors are
    index-added back on the device (e2e: the output is copied to the host).
  * "torch": plain torch ops on any device, one step per frame (S*T steps for
    regular supervision, so slow on a GPU; kept as the reference torch path).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..kaldi.chain_egs import Supervision
from ..kaldi.fst import Fst

__all__ = ["numerator_forward_backward", "check_supervision"]


def check_supervision(supervision: Supervision, S: int, T: int, P: int) -> None:
    """Raise ValueError if ``supervision`` does not fit an output of shape (S, T, P)."""
    if not isinstance(supervision, Supervision):
        raise TypeError("supervision must be a pkwrap.kaldi.chain_egs.Supervision, got %s"
                        % type(supervision).__name__)
    if supervision.num_sequences != S or supervision.frames_per_sequence != T:
        raise ValueError("supervision has num_sequences=%d, frames_per_sequence=%d but the output "
                         "has shape (S=%d, T=%d, P=%d)" % (supervision.num_sequences,
                                                           supervision.frames_per_sequence, S, T, P))
    if supervision.label_dim != P:
        raise ValueError("supervision label_dim=%d differs from the output's num_pdfs=%d"
                         % (supervision.label_dim, P))
    if supervision.e2e:
        if len(supervision.e2e_fsts) != S:
            raise ValueError("e2e supervision has %d FSTs for %d sequences"
                             % (len(supervision.e2e_fsts), S))
    elif supervision.fst is None:
        raise ValueError("supervision has neither an FST nor e2e FSTs")
    if not np.isfinite(supervision.weight):
        raise ValueError("supervision weight %r is not finite" % supervision.weight)


def _fst_args(f: Fst, what: str):
    if not f.is_acceptor():
        raise ValueError("%s is not an acceptor (ilabel != olabel)" % what)
    if f.num_states == 0 or f.start < 0:
        raise ValueError("%s is empty" % what)
    return (int(f.num_states), int(f.start), np.asarray(f.final, np.float32),
            np.asarray(f.state_offsets, np.int64), np.asarray(f.ilabel, np.int32),
            np.asarray(f.weight, np.float32), np.asarray(f.nextstate, np.int32))


def numerator_forward_backward(supervision: Supervision, x: torch.Tensor,
                               post: Optional[torch.Tensor] = None,
                               backend: Optional[str] = None,
                               post_scale: float = 1.0) -> Tuple[float, bool]:
    """Numerator log-probability, optionally adding weighted posteriors into ``post``.

    Args:
      supervision: regular or e2e supervision for S sequences of T frames.
      x: the chain output ``[S][T][P]`` (batch-first), any float dtype; not modified.
      post: None, or a float32 tensor ``[S][T][P]`` on x's device (C-contiguous) to which
        ``post_scale * supervision.weight * posteriors`` are ADDED (like Kaldi's Backward).
      backend: "auto" ("cpp" on CPU, "host" otherwise), "cpp", "host" or "torch".
      post_scale: extra factor on what is added to ``post`` (e.g. -1 to subtract).
    Returns:
      ``(num_logprob_weighted, ok)``: weight * log p_num summed over sequences, and
      whether it is finite (False: no path through the FST, or NaN/inf in x; then
      nothing is added to ``post``).
    """
    S, T, P = x.shape
    check_supervision(supervision, S, T, P)
    if backend in (None, "auto"):
        backend = "host" if x.device.type != "cpu" else "cpp"
    w = float(supervision.weight)
    x = x.detach()
    if post is not None and (post.shape != x.shape or post.dtype != torch.float32
                             or not post.is_contiguous()):
        raise ValueError("post must be a contiguous float32 tensor of shape %s" % (tuple(x.shape),))
    if backend == "torch":
        return _num_torch(supervision, x, post, float(post_scale))
    if backend == "host":
        return _num_host(supervision, x, post, float(post_scale))
    if backend != "cpp":
        raise ValueError("backend must be 'auto', 'cpp', 'host' or 'torch', got %r" % (backend,))
    if x.device.type != "cpu":
        raise ValueError("numerator backend 'cpp' needs a CPU tensor, got one on %s" % x.device)
    from .. import _pkwrap
    xc = x.to(torch.float32).contiguous()
    xn = xc.numpy()
    pn = post.numpy() if post is not None else None
    try:
        if not supervision.e2e:
            lp, ok = _pkwrap.num_forward_backward(
                *_fst_args(supervision.fst, "the supervision FST"), xn.reshape(S * T, P),
                e2e=False, post=pn.reshape(S * T, P) if pn is not None else None, post_scale=w * post_scale)
            return w * lp, bool(ok)
        tot, ok_all = 0.0, True
        for s, f in enumerate(supervision.e2e_fsts):
            lp, ok = _pkwrap.num_forward_backward(
                *_fst_args(f, "e2e supervision FST %d" % s), xn[s], e2e=True,
                post=pn[s] if pn is not None else None, post_scale=w * post_scale)
            tot += lp
            ok_all = ok_all and ok
        return w * tot, bool(ok_all)
    except ValueError:
        raise
    except RuntimeError as e:  # pragma: no cover - pybind maps invalid_argument to ValueError
        raise ValueError(str(e))


# ------------------------------------------------------------------------------ host
def _num_host(sup: Supervision, x: torch.Tensor, post: Optional[torch.Tensor],
              post_scale: float):
    from .. import _pkwrap
    S, T, P = x.shape
    dev = x.device
    w = float(sup.weight)
    if sup.e2e:
        xc = x.to(device="cpu", dtype=torch.float32).contiguous()
        buf = torch.zeros(S, T, P) if post is not None else None
        lp, ok = numerator_forward_backward(sup, xc, buf, backend="cpp")
        if post is not None and ok:
            post.add_(buf.to(dev), alpha=post_scale)
        return lp, ok
    args = _fst_args(sup.fst, "the supervision FST")
    il = args[4]
    if il.size and (il.min() < 1 or il.max() > P):
        raise ValueError("numerator supervision FST: arc label outside [1, num_pdfs=%d] "
                         "(labels are pdf-id + 1)" % P)
    frames = _pkwrap.num_arc_frames(*args, S * T)
    idx = torch.from_numpy(np.where(frames >= 0, frames * P + il.astype(np.int64) - 1, 0))
    idx_dev = idx.to(dev)
    arc_x = x.reshape(-1)[idx_dev].to(device="cpu", dtype=torch.float32).numpy()
    lp, ok, arc_post = _pkwrap.num_forward_backward_arcs(*args, arc_x, S * T,
                                                         want_post=post is not None)
    if post is not None and ok:
        vals = torch.from_numpy(arc_post).to(dev) * (w * post_scale)
        post.view(-1).index_add_(0, idx_dev, vals)
    return w * lp, bool(ok)


# ----------------------------------------------------------------------------- torch
def _scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    neg_inf = torch.tensor(float("-inf"), dtype=values.dtype, device=values.device)
    m = torch.full((size,), float("-inf"), dtype=values.dtype, device=values.device)
    m = m.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.zeros(size, dtype=values.dtype, device=values.device)
    s.index_add_(0, index, torch.exp(values - m_safe[index]))
    return torch.where(s > 0, m_safe + torch.log(s), neg_inf)


def _state_times(f: Fst, what: str) -> np.ndarray:
    """Frame of each state (BFS from the start); -1 if unreachable."""
    N = f.num_states
    time = np.full(N, -1, dtype=np.int64)
    time[f.start] = 0
    frontier = np.array([f.start])
    off = np.asarray(f.state_offsets)
    ns = np.asarray(f.nextstate)
    t = 0
    while frontier.size:
        idx = np.concatenate([np.arange(off[s], off[s + 1]) for s in frontier]) \
            if frontier.size else np.zeros(0, np.int64)
        nxt = np.unique(ns[idx]) if idx.size else np.zeros(0, np.int64)
        seen = time[nxt]
        if np.any((seen >= 0) & (seen != t + 1)):
            raise ValueError("%s is not time-synchronous (a state is reached after different "
                             "numbers of frames)" % what)
        new = nxt[seen < 0]
        time[new] = t + 1
        frontier = new
        t += 1
    return time


def _num_torch(sup: Supervision, x: torch.Tensor, post: Optional[torch.Tensor], post_scale: float):
    S, T, P = x.shape
    dev = x.device
    w = float(sup.weight)
    xf = x.to(torch.float64).reshape(-1)
    f64 = dict(dtype=torch.float64, device=dev)
    lt = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64), device=dev)
    if not sup.e2e:
        f = sup.fst
        _fst_args(f, "the supervision FST")
        il = np.asarray(f.ilabel)
        if il.size and (il.min() < 1 or il.max() > P):
            raise ValueError("the supervision FST has a label outside [1, num_pdfs=%d]" % P)
        F = S * T
        times = _state_times(f, "the supervision FST")
        src_np = np.asarray(f.src, dtype=np.int64)
        arc_t = times[src_np]
        if np.any(arc_t >= F):
            raise ValueError("the supervision FST has paths longer than the %d frames of the "
                             "output" % F)
        keep = arc_t >= 0
        order = np.nonzero(keep)[0][np.argsort(arc_t[keep], kind="stable")]
        offs = np.searchsorted(arc_t[order], np.arange(F + 1))
        src, dst = lt(src_np[order]), lt(np.asarray(f.nextstate)[order])
        pdf = lt(il[order] - 1)
        aw = torch.as_tensor(np.asarray(f.weight, np.float64)[order], **f64)
        xi = lt(arc_t[order] * P) + pdf
        N = f.num_states
        final = np.asarray(f.final, np.float64)
        end_ok = (times == F) & np.isfinite(final)
        la = torch.full((N,), float("-inf"), **f64)
        la[f.start] = 0.0
        for tau in range(F):
            a, b = int(offs[tau]), int(offs[tau + 1])
            if a == b:
                continue
            v = la[src[a:b]] - aw[a:b] + xf[xi[a:b]]
            la = torch.logaddexp(la, _scatter_logsumexp(v, dst[a:b], N))
        fin = torch.as_tensor(np.where(end_ok, -final, -np.inf), **f64)
        tot = torch.logsumexp(la + fin, 0)
        ok = bool(torch.isfinite(tot))
        if post is None or not ok:
            return w * float(tot), ok
        lb = fin.clone()
        occ_all = torch.empty(int(offs[F]), **f64)
        for tau in range(F - 1, -1, -1):
            a, b = int(offs[tau]), int(offs[tau + 1])
            if a == b:
                continue
            v = -aw[a:b] + xf[xi[a:b]] + lb[dst[a:b]]
            occ_all[a:b] = torch.exp(la[src[a:b]] + v - tot)
            lb = torch.logaddexp(lb, _scatter_logsumexp(v, src[a:b], N))
        post.view(-1).index_add_(0, xi, (w * post_scale * occ_all).to(torch.float32))
        return w * float(tot), ok

    # e2e: all sequences' FSTs side by side, node ids offset per sequence.
    srcs, dsts, pdfs, ws, seqs, finals, starts = [], [], [], [], [], [], []
    base = 0
    for s, f in enumerate(sup.e2e_fsts):
        _fst_args(f, "e2e supervision FST %d" % s)
        il = np.asarray(f.ilabel)
        if il.size and (il.min() < 1 or il.max() > P):
            raise ValueError("e2e supervision FST %d has a label outside [1, num_pdfs=%d]" % (s, P))
        srcs.append(np.asarray(f.src, np.int64) + base)
        dsts.append(np.asarray(f.nextstate, np.int64) + base)
        pdfs.append(il.astype(np.int64) - 1)
        ws.append(np.asarray(f.weight, np.float64))
        seqs.append(np.full(il.shape[0], s, np.int64))
        finals.append(np.asarray(f.final, np.float64))
        starts.append(base + f.start)
        base += f.num_states
    N = base
    src, dst, pdf = lt(np.concatenate(srcs)), lt(np.concatenate(dsts)), lt(np.concatenate(pdfs))
    seq = lt(np.concatenate(seqs))
    aw = torch.as_tensor(np.concatenate(ws), **f64)
    node_seq = lt(np.concatenate([np.full(f.num_states, s) for s, f in enumerate(sup.e2e_fsts)]))
    fin = torch.as_tensor(-np.concatenate(finals), **f64)
    la = torch.full((N,), float("-inf"), **f64)
    la[lt(starts)] = 0.0
    las = [la]
    xbase = seq * (T * P) + pdf
    for t in range(T):
        v = la[src] - aw + xf[xbase + t * P]
        la = _scatter_logsumexp(v, dst, N)
        las.append(la)
    tot_seq = _scatter_logsumexp(la + fin, node_seq, S)
    tot = float(tot_seq.sum())
    ok = bool(torch.isfinite(tot_seq).all())
    if post is None or not ok:
        return w * tot, ok
    lb = fin
    pv = post.view(-1)
    for t in range(T - 1, -1, -1):
        v = -aw + xf[xbase + t * P] + lb[dst]
        occ = torch.exp(las[t][src] + v - tot_seq[seq])
        pv.index_add_(0, xbase + t * P, (w * post_scale * occ).to(torch.float32))
        lb = _scatter_logsumexp(v, src, N)
    return w * tot, ok
