"""The denominator graph of LF-MMI: an HMM over pdfs read from Kaldi's ``den.fst``.

``den.fst`` (made by ``chain-make-den-fst``) is an epsilon-free acceptor whose arcs
carry label ``pdf + 1`` and weight ``-log(prob)``. As in Kaldi's
``chain::DenominatorGraph`` the final probabilities are ignored by the recursion
(every state may end a sequence with probability one) and each arc i -> j with pdf p
has transition probability ``exp(-weight)``.

Initial probabilities (Kaldi's ``SetInitialProbs``): with the row-normalized
transition matrix

    A[i, j] = sum_{arcs i->j} exp(-w) / (exp(-final(i)) + sum_{arcs leaving i} exp(-w))

start from the one-hot vector of the start state p_0, iterate
``p_{n+1} = normalize(p_n A)`` (normalize = divide by the sum, because final
probabilities leak mass) and average the first 100 iterates p_0 ... p_99. Done in
float64, stored as float32 like Kaldi.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Union

import numpy as np

from ..kaldi.fst import Fst, read_fst

__all__ = ["DenominatorGraph"]


class DenominatorGraph:
    """Arcs of a denominator FST, grouped for the forward and backward recursions.

    Attributes (numpy arrays; N = num_states, A = num_arcs):
      num_states: N.
      num_pdfs: P; arcs carry pdf ids in [0, P).
      initial_probs: float32 ``[N]``, Kaldi's ``InitialProbs()``.
      src, dst, pdf: int32 ``[A]``, arcs in file order (grouped by source).
      prob: float32 ``[A]``, ``exp(-weight)``.
      fwd_offsets: int32 ``[N+1]``: arcs leaving state i are ``fwd_offsets[i]:fwd_offsets[i+1]``
        of src/dst/pdf/prob.
      bwd_order: int64 ``[A]``: a permutation that groups the arcs by destination
        (stable, so arcs into j keep source order); ``bwd_offsets`` int32 ``[N+1]`` delimits
        the groups.
      name: where the graph came from (used in error messages).
    """

    def __init__(self, num_states: int, num_pdfs: int, src: np.ndarray, dst: np.ndarray,
                 pdf: np.ndarray, prob: np.ndarray, initial_probs: np.ndarray,
                 name: str = "<den graph>"):
        self.num_states = int(num_states)
        self.num_pdfs = int(num_pdfs)
        self.name = name
        self.src = np.ascontiguousarray(src, dtype=np.int32)
        self.dst = np.ascontiguousarray(dst, dtype=np.int32)
        self.pdf = np.ascontiguousarray(pdf, dtype=np.int32)
        self.prob = np.ascontiguousarray(prob, dtype=np.float32)
        self.initial_probs = np.ascontiguousarray(initial_probs, dtype=np.float32)
        A = self.src.shape[0]
        if not (self.dst.shape[0] == self.pdf.shape[0] == self.prob.shape[0] == A):
            raise ValueError("%s: arc arrays differ in length" % name)
        if self.initial_probs.shape != (self.num_states,):
            raise ValueError("%s: initial_probs has shape %s, expected (%d,)"
                             % (name, self.initial_probs.shape, self.num_states))
        if A and np.any(np.diff(self.src) < 0):
            raise ValueError("%s: arcs must be grouped by source state" % name)
        self.fwd_offsets = np.searchsorted(self.src, np.arange(self.num_states + 1)).astype(np.int32)
        self.bwd_order = np.argsort(self.dst, kind="stable")
        self.bwd_offsets = np.searchsorted(self.dst[self.bwd_order],
                                           np.arange(self.num_states + 1)).astype(np.int32)
        self._native = None
        self._torch: Dict[str, object] = {}
        self._triton: Dict[str, object] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_fst(cls, path_or_fst: Union[str, os.PathLike, Fst], num_pdfs: int) -> "DenominatorGraph":
        """Build the graph from ``den.fst`` (a path, or an already read :class:`Fst`).

        Args:
          path_or_fst: path of an OpenFst binary or gzipped den.fst, or an Fst.
          num_pdfs: number of pdfs P of the acoustic model (the network's output dim).
        Returns:
          A DenominatorGraph. Raises ValueError naming the file when the FST is empty,
          not an acceptor, has epsilon arcs or labels outside [1, num_pdfs], or has
          weights that are not finite.
        """
        if isinstance(path_or_fst, Fst):
            fst, name = path_or_fst, "<Fst object>"
        else:
            name = os.fspath(path_or_fst)
            fst = read_fst(name)
        num_pdfs = int(num_pdfs)
        if num_pdfs <= 0:
            raise ValueError("%s: num_pdfs must be positive, got %d" % (name, num_pdfs))
        if fst.num_states == 0 or fst.start < 0:
            raise ValueError("%s: the denominator FST is empty" % name)
        il = np.asarray(fst.ilabel)
        ol = np.asarray(fst.olabel)
        if il.shape[0] == 0:
            raise ValueError("%s: the denominator FST has no arcs" % name)
        bad = np.nonzero(il != ol)[0]
        if bad.size:
            a = bad[0]
            raise ValueError("%s: not an acceptor: arc %d from state %d has ilabel %d != olabel %d"
                             % (name, a, int(fst.src[a]), int(il[a]), int(ol[a])))
        eps = np.nonzero(il == 0)[0]
        if eps.size:
            raise ValueError("%s: has epsilon arcs (e.g. from state %d); a denominator FST "
                             "is epsilon-free with labels pdf+1" % (name, int(fst.src[eps[0]])))
        out = np.nonzero((il < 1) | (il > num_pdfs))[0]
        if out.size:
            raise ValueError("%s: label %d outside [1, num_pdfs=%d] (labels are pdf-id + 1); "
                             "wrong num_pdfs for this graph? its largest label is %d"
                             % (name, int(il[out[0]]), num_pdfs, int(il.max())))
        w = np.asarray(fst.weight, dtype=np.float64)
        if not np.all(np.isfinite(w)):
            raise ValueError("%s: arc weights must be finite" % name)
        init = _initial_probs(fst, name)
        return cls(fst.num_states, num_pdfs, fst.src, fst.nextstate, il - 1,
                   np.exp(-w).astype(np.float32), init, name=name)

    @property
    def num_arcs(self) -> int:
        return int(self.src.shape[0])

    def __repr__(self) -> str:
        return "DenominatorGraph(%s: %d states, %d arcs, %d pdfs)" % (
            self.name, self.num_states, self.num_arcs, self.num_pdfs)

    # ------------------------------------------------------------ kernel views
    def native(self):
        """The C++ graph object (built once) used by the CPU kernels."""
        if self._native is None:
            from .. import _pkwrap
            o = self.bwd_order
            self._native = _pkwrap.DenGraph(
                self.num_states, self.num_pdfs, self.fwd_offsets, self.dst, self.pdf, self.prob,
                self.bwd_offsets, np.ascontiguousarray(self.src[o]),
                np.ascontiguousarray(self.pdf[o]), np.ascontiguousarray(self.prob[o]),
                self.initial_probs)
        return self._native

    def torch_arrays(self, device) -> dict:
        """The graph as torch tensors on ``device`` (cached per device) for the torch path."""
        import torch
        key = str(device)
        if key not in self._torch:
            t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dt)
            self._torch[key] = {
                "src": t(self.src, torch.long), "dst": t(self.dst, torch.long),
                "pdf": t(self.pdf, torch.long), "prob": t(self.prob, torch.float32),
                "init": t(self.initial_probs, torch.float32),
            }
        return self._torch[key]

    def triton(self, device):
        """The :class:`pkwrap.chain.den_triton.TritonDenominator` of this graph on ``device``
        (built once per device; it keeps the captured CUDA graphs of recent shapes)."""
        from .den_triton import TritonDenominator, device_key
        key = str(device_key(device))
        if key not in self._triton:
            self._triton[key] = TritonDenominator(self, device)
        return self._triton[key]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_native"] = None
        d["_torch"] = {}
        d["_triton"] = {}
        return d

    def __setstate__(self, d):
        d.setdefault("_triton", {})
        self.__dict__.update(d)


def _initial_probs(fst: Fst, name: str) -> np.ndarray:
    """Kaldi's DenominatorGraph::SetInitialProbs (see the module docstring)."""
    N = fst.num_states
    src = np.asarray(fst.src, dtype=np.int64)
    dst = np.asarray(fst.nextstate, dtype=np.int64)
    p_arc = np.exp(-np.asarray(fst.weight, dtype=np.float64))
    final = np.asarray(fst.final, dtype=np.float64)
    tot = np.exp(-final) + np.bincount(src, weights=p_arc, minlength=N)
    if np.any(~(tot > 0.0)) or np.any(tot >= 100.0):
        s = int(np.nonzero(~((tot > 0.0) & (tot < 100.0)))[0][0])
        raise ValueError("%s: state %d has total outgoing probability %g (Kaldi requires "
                         "0 < total < 100)" % (name, s, tot[s]))
    if not (src == fst.start).any():
        raise ValueError("%s: the start state %d has no arcs (a denominator graph must "
                         "be able to emit a frame from its start)" % (name, fst.start))
    a = p_arc / tot[src]
    cur = np.zeros(N)
    cur[fst.start] = 1.0
    avg = np.zeros(N)
    num_iters = 100
    for _ in range(num_iters):
        avg += cur / num_iters
        nxt = np.bincount(dst, weights=cur[src] * a, minlength=N)
        tot_nxt = nxt.sum()
        if not tot_nxt > 0.0:
            raise ValueError("%s: no path from the start state is longer than %d frames "
                             "(dead ends); initial probabilities are undefined" % (name, _))
        cur = nxt / tot_nxt
    return avg.astype(np.float32)
