"""The LDA-like input transform of older chain networks (``configs/lda.mat``).

Networks whose xconfig starts with ``fixed-affine-layer name=lda input=Append(-1,0,1,
ReplaceIndex(ivector, t, 0)) affine-transform-file=$dir/configs/lda.mat`` get from
``xconfig_to_configs.py`` a ``configs/init.config`` holding only the input nodes and an
output node with that layer's input. Kaldi's ``steps/nnet3/chain/train.py`` then makes
the matrix from the egs before it builds the network (its stage -2,
``compute_preconditioning_matrix``); :func:`compute_preconditioning_matrix` here does
the same, by the same three programs (each also a script of that name in ``scripts/``):

1. ``nnet3-chain-acc-lda-stats --rand-prune=4.0 init.raw ark:cegs.JOB.ark JOB.lda_stats``
   (:func:`acc_chain_lda_stats`) for JOB = 1 .. min(num_archives, max_lda_jobs): each
   example's ``init.raw`` output (the spliced features, evaluated at the example's
   chain output frames) is the data vector; its class is a pdf, weighted by the pdf's
   posterior at that frame from forward-backward over the supervision FST alone (its
   weights, no network output: :func:`supervision_posteriors`). For end-to-end egs
   (no FST), the stored pdf alignment with weight 1 instead.
2. ``sum-lda-accs lda_stats 1.lda_stats ...`` (:meth:`LdaStats.read`, ``add=True``).
3. ``nnet-get-feature-transform lda.mat lda_stats`` (:func:`estimate_feature_transform`),
   then ``configs/lda.mat -> ../lda.mat``. The final network's ``FixedAffineComponent``
   reads ``lda.mat`` (``D x (D+1)``) as its linear part (the first D columns) and bias
   (the last column: ``-M mean``, which removes the data mean).

**The stats** (:class:`LdaStats`, Kaldi's ``LdaEstimate``): per class c its count
``n_c`` and first-order sum ``f_c``; the total (uncentered) second-order sum ``S``. The
file is Kaldi's (``<LDAACCS> <VECSIZE> D <NUMCLASSES> C <ZERO_ACCS> FV <FIRST_ACCS> FM
<SECOND_ACCS> FP </LDAACCS>``) with the second-order part stored as the within-class
scatter ``S - sum_c f_c f_c' / n_c`` (float) and turned back into ``S`` when read (with
the float-rounded ``n_c, f_c``), exactly as Kaldi does, so Kaldi's ``sum-lda-accs`` and
``nnet-get-feature-transform`` read pkwrap's files and the other way round.

**The transform** (Kaldi's ``FeatureTransformEstimate``, options ``--dim`` (default: all),
``--within-class-factor`` 0.001, ``--max-singular-value`` 5, ``--remove-offset`` true):
with the total covariance T, between-class covariance B and within-class W = T - B,
``W = L L'`` (Cholesky; if that fails, ``1e-3 * trace(W)/D`` is added to the diagonal),
``L^-1 B L^-T = U diag(s) U'`` (SVD, singular values decreasing), ``M = U' L^-1`` (its
first ``dim`` rows), row i scaled by ``sqrt((within_class_factor + s_i) / (1 + s_i))``
(directions with little between-class variance shrink to a variance of about
within_class_factor), singular values of M above ``max_singular_value`` set to it, and
the column ``-M mean`` appended. Where several s_i are equal (in particular the D - C + 1
zeros when there are fewer classes than dimensions), the rows of M within that group
are defined only up to a rotation, which the next layer absorbs; any two correct
implementations (here torch's SVD, in Kaldi LAPACK's) agree on ``M'M`` and up to sign on
the other rows, not element by element in those rows.

**rand-prune** (Kaldi's ``RandPrune``, default 4.0 in train.py): a posterior ``p`` below the
threshold ``r`` becomes ``r`` with probability ``p / r`` and 0 otherwise, one uniform draw per
(frame, pdf) posterior entry in the order frame, then pdf. The expected stats are unchanged
(the pruning is unbiased); only fewer, larger updates are made. pkwrap draws from numpy's
generator seeded with 1 in each job (a run is reproducible). Kaldi draws from the C
library's ``rand()`` (never seeded: glibc's seed 1), which its nnet3 compiler also consumes,
a data-dependent number of times, in its random self-checks when it compiles a computation
for a new example shape (``nnet-computation-graph.cc``), so Kaldi's individual decisions
cannot be reproduced, and two runs on different egs orders differ as well. The two give
stats that differ by the sampling noise of the pruning only; with ``rand_prune=0``
(``--rand-prune=0``) both are deterministic and pkwrap's equal Kaldi's.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..kaldi.io import (KaldiFormatError, KaldiReader, KaldiWriter, atomic_output,
                        write_kaldi_object)
from ..kaldi.matrix import (read_matrix, read_packed_matrix, read_vector, write_kaldi_matrix,
                            write_matrix, write_packed_matrix, write_vector)
from ..ngsgd import _one_thread

__all__ = ["LdaStats", "rand_prune", "supervision_posteriors",
           "nnet_output_at_supervision", "acc_chain_lda_stats", "estimate_feature_transform",
           "FeatureTransformResult", "read_lda_stats", "compute_preconditioning_matrix",
           "PARALLEL_BYTES"]

log = logging.getLogger("pkwrap.chain.lda")


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 matrix product (torch: see :class:`_one_thread`)."""
    import torch
    with _one_thread():
        return (torch.from_numpy(np.ascontiguousarray(a, np.float64))
                @ torch.from_numpy(np.ascontiguousarray(b, np.float64))).numpy()


# ----------------------------------------------------------------------------- stats
class LdaStats:
    """Kaldi's ``LdaEstimate`` accumulators (float64), read and written in its format.

    Attributes:
      zero: ``[C]`` per-class counts (sum of weights).
      first: ``[C][D]`` per-class weighted sums of the data.
      second: ``[D][D]`` total weighted sum of outer products (not centered).
    """

    def __init__(self, num_classes: int = 0, dim: int = 0):
        self.zero = np.zeros(num_classes, np.float64)
        self.first = np.zeros((num_classes, dim), np.float64)
        self.second = np.zeros((dim, dim), np.float64)

    @property
    def num_classes(self) -> int:
        return self.first.shape[0]

    @property
    def dim(self) -> int:
        return self.first.shape[1]

    def tot_count(self) -> float:
        return float(self.zero.sum())

    def accumulate(self, data: np.ndarray, classes: np.ndarray, weights: np.ndarray,
                   rows: Optional[np.ndarray] = None) -> None:
        """Add ``weights[k]`` times the vector ``data[rows[k]]`` (``data[k]`` without
        ``rows``) to class ``classes[k]`` (Kaldi's ``Accumulate`` for each k)."""
        x = np.asarray(data, np.float64)
        classes = np.asarray(classes, np.int64)
        w = np.asarray(weights, np.float64)
        rows = np.arange(len(classes)) if rows is None else np.asarray(rows, np.int64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError("LDA stats of dim %d: data of shape %s" % (self.dim, x.shape))
        if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError("class %d outside [0, %d)" % (
                classes.min() if classes.min() < 0 else classes.max(), self.num_classes))
        if len(classes) == 0:
            return
        np.add.at(self.zero, classes, w)
        xs = x[rows] * w[:, None]
        order = np.argsort(classes, kind="stable")
        c_sorted = classes[order]
        starts = np.flatnonzero(np.r_[True, c_sorted[1:] != c_sorted[:-1]])
        self.first[c_sorted[starts]] += np.add.reduceat(xs[order], starts, axis=0)
        # sum_k w_k x_k x_k' = X' diag(sum of the weights of each row) X
        per_row = np.bincount(rows, weights=w, minlength=x.shape[0])
        used = per_row != 0
        xu = x[used]
        self.second += _mm((xu * per_row[used][:, None]).T, xu)

    def add(self, other: "LdaStats") -> None:
        if other.num_classes != self.num_classes or other.dim != self.dim:
            raise ValueError("LDA stats of %d classes, dim %d and of %d classes, dim %d "
                             "cannot be added" % (self.num_classes, self.dim,
                                                  other.num_classes, other.dim))
        self.zero += other.zero
        self.first += other.first
        self.second += other.second

    # ---------------------------------------------------------------- Kaldi's format
    def _scatter_terms(self, zero: np.ndarray, first: np.ndarray) -> np.ndarray:
        nz = zero != 0
        f = first[nz]
        return _mm((f / zero[nz][:, None]).T, f)

    def write(self, path_or_file, binary: bool = True) -> None:
        """``LdaEstimate::Write`` (to a path, atomically, or a binary file object)."""
        write_kaldi_object(path_or_file, self._write, binary)

    def _write(self, w: KaldiWriter) -> None:
        w.write_token("<LDAACCS>")
        w.write_token("<VECSIZE>")
        w.write_int32(self.dim)
        w.write_token("<NUMCLASSES>")
        w.write_int32(self.num_classes)
        w.write_token("<ZERO_ACCS>")
        write_vector(w, self.zero.astype(np.float32))
        w.write_token("<FIRST_ACCS>")
        write_matrix(w, self.first.astype(np.float32))
        w.write_token("<SECOND_ACCS>")
        within = self.second - self._scatter_terms(self.zero, self.first)
        write_packed_matrix(w, within.astype(np.float32))
        w.write_token("</LDAACCS>")

    @classmethod
    def read(cls, r: KaldiReader, into: Optional["LdaStats"] = None) -> "LdaStats":
        """``LdaEstimate::Read`` from a reader after its header; with ``into``, the stats
        read are added to it (Kaldi's ``add=true``, dims and class counts must match)."""
        r.expect_token("<LDAACCS>")
        r.expect_token("<VECSIZE>")
        dim = r.read_int32("the LDA stats dimension")
        r.expect_token("<NUMCLASSES>")
        nc = r.read_int32("the number of classes")
        if dim < 0 or nc < 0:
            raise r.error("bad LDA stats size: dim %d, %d classes" % (dim, nc))
        if into is not None and (into.num_classes or into.dim) and \
                (into.num_classes != nc or into.dim != dim):
            raise r.error("LDA stats of %d classes, dim %d cannot be added to stats of %d "
                          "classes, dim %d" % (nc, dim, into.num_classes, into.dim))
        got = {}
        while True:
            start = r.pos
            tok = r.read_token()
            if tok == "</LDAACCS>":
                break
            if tok == "<ZERO_ACCS>":
                got["zero"] = read_vector(r).astype(np.float64)
            elif tok == "<FIRST_ACCS>":
                got["first"] = read_matrix(r).astype(np.float64)
            elif tok == "<SECOND_ACCS>":
                got["second"] = read_packed_matrix(r).astype(np.float64)
            else:
                raise r.error("unexpected token %r in LDA stats" % tok[:40], start)
        for k in ("zero", "first", "second"):
            if k not in got:
                raise r.error("LDA stats without <%s_ACCS>" % k.upper())
        z, f, s = got["zero"], got["first"], got["second"]
        if z.shape != (nc,) or f.shape != (nc, dim) or s.shape != (dim, dim):
            raise r.error("LDA stats of %d classes, dim %d hold counts of shape %s, sums of "
                          "shape %s and a second-order matrix of shape %s"
                          % (nc, dim, z.shape, f.shape, s.shape))
        st = cls(nc, dim)
        st.zero, st.first = z, f
        st.second = s + st._scatter_terms(z, f)
        if into is None:
            return st
        if into.num_classes == 0 and into.dim == 0:  # empty: takes the shape read
            into.zero, into.first, into.second = st.zero, st.first, st.second
        else:
            into.add(st)
        return into

    def get_stats(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``LdaEstimate::GetStats``: (total covariance, between-class covariance, mean,
        count)."""
        count = float(self.zero.sum())
        if not count > 0:
            raise ValueError("the LDA stats have no data (total count %g)" % count)
        mean = self.first.sum(axis=0) / count
        total = self.second / count - np.outer(mean, mean)
        between = self._scatter_terms(self.zero, self.first) / count - np.outer(mean, mean)
        return total, between, mean, count


def read_lda_stats(rxfilenames: Sequence[str]) -> LdaStats:
    """The sum of the LDA stats files (Kaldi rxfilenames: files, ``-``, ``cmd |``), as
    ``sum-lda-accs`` and ``nnet-get-feature-transform`` read them."""
    from ..kaldi.table import open_input_buffer
    from ..cli import file_error
    st = LdaStats()
    for rx in rxfilenames:
        try:
            data = open_input_buffer(rx)
        except OSError as e:
            raise file_error(rx, e) from e
        if len(data) == 0:
            raise KaldiFormatError("%s: empty file, expected LDA stats" % rx)
        r = KaldiReader(data, name=str(rx))
        r.read_header()
        LdaStats.read(r, into=st)
    return st


# ----------------------------------------------------------------------------- rand-prune
def rand_prune(weights: np.ndarray, threshold: float, rng: np.random.Generator) -> np.ndarray:
    """Kaldi's ``RandPrune`` on each weight in order (float32): ``0`` stays ``0``, a weight
    of magnitude >= threshold is kept, any other becomes ``sign * threshold`` with
    probability ``|w| / threshold`` (one draw of ``rng`` each), else 0."""
    w = np.asarray(weights, np.float32)
    if threshold < 0:
        raise ValueError("rand-prune threshold must be >= 0, got %g" % threshold)
    if threshold == 0 or w.size == 0:
        return w.copy()
    th = np.float32(threshold)
    draw = (w != 0) & (np.abs(w) < th)
    out = w.copy()
    k = int(draw.sum())
    if k:
        u = rng.random(k, dtype=np.float32)
        keep = u <= (np.abs(w[draw]) / th).astype(np.float32)
        out[draw] = np.where(keep, np.where(w[draw] >= 0, th, -th), np.float32(0))
    return out


# ----------------------------------------------------------------------------- one eg
def supervision_posteriors(sup) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame pdf posteriors of a (one-sequence, regular) chain supervision: forward-
    backward over its FST with its own weights (Kaldi: ``ConvertFstToLattice`` then
    ``LatticeForwardBackward``), each arc's posterior as a float, summed per (frame, pdf)
    and zeros dropped. Returns ``(frames, pdfs, posteriors)`` ordered by frame, then pdf."""
    from .. import _pkwrap
    from .numerator import _fst_args
    f = sup.fst
    args = _fst_args(f, "the supervision FST")
    T = int(sup.frames_per_sequence) * int(sup.num_sequences)
    il = args[4]
    P = int(sup.label_dim)
    if il.size and (il.min() < 1 or il.max() > P):
        raise ValueError("the supervision FST has a label outside [1, num_pdfs=%d]" % P)
    frames = _pkwrap.num_arc_frames(*args, T)
    lp, ok, arc_post = _pkwrap.num_forward_backward_arcs(
        *args, np.zeros(il.shape[0], np.float32), T, want_post=True)
    if not ok:
        raise ValueError("the supervision FST has no path of %d frames" % T)
    live = frames >= 0
    key = frames[live] * P + (il[live].astype(np.int64) - 1)
    uniq, inv = np.unique(key, return_inverse=True)
    sums = np.zeros(len(uniq), np.float32)
    np.add.at(sums, inv, arc_post[live])
    nz = sums != 0
    uniq, sums = uniq[nz], sums[nz]
    return uniq // P, uniq % P, sums


def _request(nnet, eg):
    """Kaldi's ``GetChainComputationRequest`` for one example: the inputs at their
    indexes ``{name: (first t, [L][D] tensor)}`` and the output frames (its chain
    supervision's)."""
    import torch
    if eg.output_name != "output":
        raise ValueError("expected the example's output to be named 'output', got %r"
                         % eg.output_name)
    if eg.supervision.num_sequences != 1:
        raise ValueError("%d sequences in one example: this program expects one sequence "
                         "per eg (unmerged egs)" % eg.supervision.num_sequences)
    if "output" not in nnet.output_names:
        raise ValueError("%s has no output node 'output'" % nnet.name)
    inputs = {}
    for name, x in eg.inputs.items():
        if name.startswith("__"):
            continue
        if name not in nnet.input_names:
            raise ValueError("the example has an input %r, but %s has no such input node"
                             % (name, nnet.name))
        idx = np.asarray(eg.input_indexes[name])
        t = idx[:, 1]
        if np.any(idx[:, 0] != 0) or np.any(idx[:, 2] != 0) or \
                np.any(np.diff(t) != 1):
            raise ValueError("input %r of the example is not one run of consecutive frames "
                             "of one sequence (merged egs?)" % name)
        inputs[name] = (int(t[0]), torch.as_tensor(x, dtype=torch.float32))
    missing = [n for n in nnet.input_names if n not in inputs]
    if missing:
        raise ValueError("%s reads input %s, which the example does not have"
                         % (nnet.name, ", ".join(missing)))
    return inputs, np.asarray(eg.output_indexes)[:, 1].astype(np.int64)


def _outputs(nnet, requests) -> List[np.ndarray]:
    """The network's ``output`` for each request of :func:`_request`, ``[T][D]`` float32;
    requests of the same shape are computed together (as one minibatch)."""
    import torch
    groups: dict = {}
    for i, (inputs, out_t) in enumerate(requests):
        sig = (tuple((k, t0) + tuple(x.shape) for k, (t0, x) in sorted(inputs.items())),
               out_t.tobytes())
        groups.setdefault(sig, []).append(i)
    result: List[Optional[np.ndarray]] = [None] * len(requests)
    for members in groups.values():
        first, out_t = requests[members[0]]
        batch = {k: (t0, torch.stack([requests[i][0][k][1] for i in members]))
                 for k, (t0, _) in first.items()}
        lo, hi = int(out_t.min()), int(out_t.max())
        with torch.no_grad():
            y = nnet.compute(batch, {"output": (lo, hi)})["output"]
        y = y[:, torch.as_tensor(out_t - lo)].numpy().astype(np.float32, copy=False)
        for j, i in enumerate(members):
            result[i] = y[j]
    return result


def nnet_output_at_supervision(nnet, eg) -> np.ndarray:
    """The network's ``output`` for one example at the example's chain output frames
    (Kaldi's ``GetChainComputationRequest``: the inputs at their indexes, the output at
    the supervision's), ``[T][D]`` float32."""
    return _outputs(nnet, [_request(nnet, eg)])[0]


def acc_chain_lda_stats(nnet, egs: Iterable, rand_prune_threshold: float = 0.0,
                        stats: Optional[LdaStats] = None,
                        rng: Optional[np.random.Generator] = None,
                        progress: Optional[Callable[[int], None]] = None) -> Tuple[LdaStats, int]:
    """``nnet3-chain-acc-lda-stats``: LDA stats of the network's output (the data) with
    the supervision's pdf posteriors as class weights, over ``(key, eg)`` pairs.

    Args:
      nnet: the :class:`~pkwrap.nnet3.Nnet3` (``init.raw``: normally only splicing).
      egs: ``(key, NnetChainExample)`` pairs, one sequence each (unmerged egs).
      rand_prune_threshold: Kaldi's ``--rand-prune`` (0: no pruning, deterministic).
      stats: stats to add to (a new :class:`LdaStats` if None).
      rng: the random generator of rand-prune (None: numpy's, seeded with 1, so a run
        is reproducible).
    Returns:
      ``(stats, number of examples)``.
    """
    rng = np.random.default_rng(1) if rng is None else rng
    n = 0
    pending: list = []  # (data, classes, weights, rows) not yet added: added in batches
    pending_rows = 0

    def flush():
        nonlocal pending, pending_rows
        if not pending:
            return
        base = np.cumsum([0] + [len(p[0]) for p in pending[:-1]])
        stats.accumulate(np.concatenate([p[0] for p in pending]),
                         np.concatenate([p[1] for p in pending]),
                         np.concatenate([p[2] for p in pending]),
                         rows=np.concatenate([p[3] + b for p, b in zip(pending, base)]))
        pending, pending_rows = [], 0

    def run(chunk):
        nonlocal stats, n, pending_rows
        requests = []
        for key, eg in chunk:
            try:
                requests.append(_request(nnet, eg))
            except ValueError as e:
                raise ValueError("example %s: %s" % (key, e)) from None
        for (key, eg), x in zip(chunk, _outputs(nnet, requests)):
            n += 1
            stats = _acc_one(key, eg, x, rand_prune_threshold, stats, rng, pending)
            pending_rows += len(pending[-1][0])
            if pending_rows >= 8192:
                flush()
            if progress is not None:
                progress(n)

    with _one_thread():  # the work per example is small
        chunk = []
        for item in egs:
            chunk.append(item)
            if len(chunk) == 64:
                run(chunk)
                chunk = []
        if chunk:
            run(chunk)
        if stats is not None:
            flush()
    if stats is None:
        stats = LdaStats()
    return stats, n


def _acc_one(key, eg, x, rand_prune_threshold, stats, rng, pending):
    """One example of :func:`acc_chain_lda_stats` (``x``: the network's output at its
    chain output frames): appends its (data, classes, weights, rows) to ``pending``;
    returns the stats (made at the first example)."""
    try:
        sup = eg.supervision
        T = int(sup.frames_per_sequence)
        if x.shape[0] != T:
            raise ValueError("%d output frames for a supervision of %d frames"
                             % (x.shape[0], T))
        if sup.fst is not None and sup.fst.num_states > 0:
            frames, pdfs, post = supervision_posteriors(sup)
        else:
            ali = sup.alignment_pdfs
            if ali is None or len(ali) != T:
                raise ValueError("end-to-end supervision without a pdf alignment of %d "
                                 "frames" % T)
            frames = np.arange(T)
            pdfs = np.asarray(ali, np.int64)
            post = np.ones(T, np.float32)
        if stats is None:
            stats = LdaStats(int(sup.label_dim), x.shape[1])
        elif stats.num_classes != int(sup.label_dim) or stats.dim != x.shape[1]:
            raise ValueError("%d pdfs and output dim %d, after examples with %d and %d"
                             % (sup.label_dim, x.shape[1], stats.num_classes, stats.dim))
        w = rand_prune(post, rand_prune_threshold, rng)
        keep = w != 0
        pending.append((x, pdfs[keep], w[keep], frames[keep]))
    except ValueError as e:
        raise ValueError("example %s: %s" % (key, e)) from None
    return stats


# ----------------------------------------------------------------------------- transform
class FeatureTransformResult:
    """What :func:`estimate_feature_transform` found (Kaldi logs these)."""

    def __init__(self, matrix, count, singular_values, smoothed, num_ceiled, max_singular,
                 ceiling, cholesky):
        self.matrix = matrix
        self.count = count
        self.singular_values = singular_values
        self.smoothed = smoothed
        self.num_ceiled = num_ceiled
        self.max_singular = max_singular
        self.ceiling = ceiling
        self.cholesky = cholesky

    def log_lines(self, target_dim: int) -> List[str]:
        s = self.singular_values
        lines = ["Data count is %g" % self.count]
        if self.smoothed:
            lines.append("Cholesky failed (possibly not +ve definite), so adding %g to "
                         "diagonal and trying again." % self.smoothed)
        lines += ["LDA singular values are [ %s ]" % " ".join("%g" % v for v in s),
                  "Sum of all singular values is %g" % s.sum(),
                  "Sum of selected singular values is %g" % s[:target_dim].sum()]
        if self.num_ceiled:
            lines.append("Applied ceiling to %d out of %d singular values of transform "
                         "using ceiling %g, max is %g" % (self.num_ceiled, len(s),
                                                          self.ceiling, self.max_singular))
        return lines


def estimate_feature_transform(stats: LdaStats, dim: int = -1,
                               within_class_factor: float = 0.001,
                               max_singular_value: float = 5.0,
                               remove_offset: bool = True) -> FeatureTransformResult:
    """``nnet-get-feature-transform`` (Kaldi's ``FeatureTransformEstimate::Estimate``): the
    preconditioning transform of the module docstring, ``[dim][D(+1)]`` float32."""
    with _one_thread():
        total, between, mean, count = stats.get_stats()
    D = total.shape[0]
    target = D if dim <= 0 else int(dim)
    if target > D:
        raise ValueError("--dim=%d is more than the data dimension %d" % (target, D))
    within = total - between
    with _one_thread():
        return _estimate(within, between, mean, count, target, within_class_factor,
                         max_singular_value, remove_offset)


def _cholesky(a: np.ndarray) -> Optional[np.ndarray]:
    import torch
    l, info = torch.linalg.cholesky_ex(torch.from_numpy(a))
    return l.numpy() if int(info) == 0 else None


def _estimate(within, between, mean, count, target, within_class_factor, max_singular_value,
              remove_offset) -> "FeatureTransformResult":
    import torch
    D = within.shape[0]
    smoothed = 0.0
    chol = chol_s = _cholesky(within)
    if chol is None:
        smoothed = float(np.float32(1.0e-3 * np.trace(within) / D))
        chol_s = _cholesky(within + smoothed * np.eye(D))
        if chol_s is None:
            raise ValueError("the within-class covariance is not positive definite, even "
                             "with %g added to its diagonal" % smoothed)
    linv = torch.linalg.inv(torch.from_numpy(np.tril(chol_s))).numpy()
    tmp = _mm(_mm(linv, between), linv.T)
    tmp = (tmp + tmp.T) * 0.5
    u, s, _ = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(tmp)))
    order = np.argsort(-s, kind="stable")
    s, u = s[order], u[:, order]
    lda = _mm(u.T, linv)
    m = lda[:target].astype(np.float32)
    if within_class_factor != 1.0:
        old = (1.0 + s[:target]).astype(np.float32)
        new = (np.float64(np.float32(within_class_factor)) + s[:target]).astype(np.float32)
        m *= np.sqrt(new / old).astype(np.float32)[:, None]
    num_ceiled, max_s = 0, 0.0
    if max_singular_value > 0.0:
        uu, ss, vt = (t.numpy() for t in torch.linalg.svd(
            torch.from_numpy(m.astype(np.float64)), full_matrices=False))
        max_s = float(ss.max()) if ss.size else 0.0
        big = ss > np.float32(max_singular_value)
        num_ceiled = int(big.sum())
        if num_ceiled:
            ss = np.where(big, np.float64(np.float32(max_singular_value)), ss)
            m = _mm(uu * ss, vt).astype(np.float32)
    if remove_offset:
        mf = mean.astype(np.float32)
        neg = -_mm(m, mf.astype(np.float64)[:, None])[:, 0]
        m = np.concatenate([m, neg.astype(np.float32)[:, None]], axis=1)
    return FeatureTransformResult(m, count, s, smoothed, num_ceiled, max_s, max_singular_value,
                                  None if chol is None else chol.astype(np.float32))


# ----------------------------------------------------------------------------- stage -2
def _log_file(path: str, lines: Sequence[str]) -> None:
    with atomic_output(path, "w") as f:
        f.write("".join(l.rstrip("\n") + "\n" for l in lines))


def _acc_archive(nnet, ark: str, out: str, rand_prune_threshold: float):
    """One job of :func:`compute_preconditioning_matrix`: ``nnet3-chain-acc-lda-stats`` on
    one archive (``nnet``: the network or its file); returns (examples, count, seconds)."""
    import time
    from ..kaldi.chain_egs import read_chain_egs
    from ..nnet3 import read_nnet3
    t0 = time.time()
    if isinstance(nnet, str):
        nnet = read_nnet3(nnet)
    st, n = acc_chain_lda_stats(nnet, read_chain_egs("ark:" + ark), rand_prune_threshold)
    if st.tot_count() == 0:
        raise ValueError("%s: accumulated no LDA stats (%d examples)" % (ark, n))
    st.write(out)
    return n, st.tot_count(), time.time() - t0


#: archives to process (bytes in all) from which the jobs run in parallel processes
PARALLEL_BYTES = 64 << 20


def compute_preconditioning_matrix(dir_: str, egs_dir: str, num_archives: int,
                                   max_lda_jobs: Optional[int] = 10,
                                   rand_prune_threshold: float = 4.0,
                                   nnet=None, dim: int = -1,
                                   within_class_factor: float = 0.001,
                                   max_singular_value: float = 5.0,
                                   num_processes: Optional[int] = None) -> str:
    """train.py's stage -2 (``compute_preconditioning_matrix``): ``JOB.lda_stats`` from
    ``egs_dir/cegs.JOB.ark`` for the first ``min(num_archives, max_lda_jobs)`` archives
    with ``dir_/init.raw`` (or ``nnet``), their sum ``dir_/lda_stats`` (the job files are
    removed, as Kaldi does), ``dir_/lda.mat`` and the link ``dir_/configs/lda.mat ->
    ../lda.mat``; logs in ``dir_/log/`` under Kaldi's names. Returns the lda.mat path.

    The jobs run in ``num_processes`` processes at once (as Kaldi's ``run.pl JOB=1:N``
    does), by default as many as there are CPUs (at most one per job) when the archives
    hold :data:`PARALLEL_BYTES` or more, else one after the other in this process (a new
    process costs seconds to start). Each job's rand-prune draws are its own (seeded as
    in :func:`acc_chain_lda_stats`), so the result does not depend on the number of
    processes."""
    jobs = int(num_archives)
    if max_lda_jobs is not None and jobs > max_lda_jobs:
        jobs = int(max_lda_jobs)
    if jobs < 1:
        raise ValueError("%s: no egs archives (num_archives %d)" % (egs_dir, num_archives))
    raw = os.path.join(dir_, "init.raw")
    logdir = os.path.join(dir_, "log")
    os.makedirs(logdir, exist_ok=True)
    arks = []
    for j in range(1, jobs + 1):
        ark = os.path.join(egs_dir, "cegs.%d.ark" % j)
        if not os.path.isfile(ark):
            if os.path.isfile(os.path.join(egs_dir, "cegs.%d.scp" % j)):
                raise ValueError("%s: missing, and multitask egs (cegs.%d.scp) are not "
                                 "supported by the LDA stage" % (ark, j))
            raise FileNotFoundError("%s: missing (the egs dir has %d archives)"
                                    % (ark, num_archives))
        arks.append(ark)
    if num_processes is None:
        big = sum(os.path.getsize(a) for a in arks) >= PARALLEL_BYTES
        num_processes = min(jobs, os.cpu_count() or 1) if big else 1
    paths = [os.path.join(dir_, "%d.lda_stats" % j) for j in range(1, jobs + 1)]
    if num_processes > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(num_processes, jobs),
                                 mp_context=multiprocessing.get_context("spawn")) as ex:
            futures = [ex.submit(_acc_archive, raw, ark, out, rand_prune_threshold)
                       for ark, out in zip(arks, paths)]
            results = [f.result() for f in futures]
    else:
        from ..nnet3 import read_nnet3
        net = read_nnet3(raw) if nnet is None else nnet
        results = [_acc_archive(net, ark, out, rand_prune_threshold)
                   for ark, out in zip(arks, paths)]
    for j, (ark, out, (n, count, secs)) in enumerate(zip(arks, paths, results), 1):
        _log_file(os.path.join(logdir, "get_lda_stats.%d.log" % j), [
            "# nnet3-chain-acc-lda-stats --rand-prune=%g %s ark:%s %s" % (
                rand_prune_threshold, raw, ark, out),
            "LOG (nnet3-chain-acc-lda-stats): Processed %d examples." % n,
            "LOG (nnet3-chain-acc-lda-stats): Accumulated stats, soft frame count = %g.  "
            "Wrote to %s" % (count, out),
            "# Accounting: time=%d threads=1" % round(secs)])
    # sum-lda-accs: the sum of the files as read back (Kaldi's rounding)
    total = read_lda_stats(paths)
    summed = os.path.join(dir_, "lda_stats")
    total.write(summed)
    _log_file(os.path.join(logdir, "sum_transform_stats.log"),
              ["# sum-lda-accs %s %s" % (summed, " ".join(paths))])
    for p in paths:
        os.remove(p)
    res = estimate_feature_transform(read_lda_stats([summed]), dim=dim,
                                     within_class_factor=within_class_factor,
                                     max_singular_value=max_singular_value)
    mat = os.path.join(dir_, "lda.mat")
    write_kaldi_matrix(mat, res.matrix)
    _log_file(os.path.join(logdir, "get_transform.log"),
              ["# nnet-get-feature-transform %s %s" % (mat, summed)]
              + ["LOG (nnet-get-feature-transform): " + l
                 for l in res.log_lines(res.matrix.shape[0])])
    link = os.path.join(dir_, "configs", "lda.mat")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = link + ".tmp%d" % os.getpid()
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink("../lda.mat", tmp)
    os.replace(tmp, link)
    return mat
