"""Chain egs made from features + supervision, as ``nnet3-chain-get-egs`` and
``nnet3-chain-e2e-get-egs`` make them: to Kaldi archives, or on the fly as a torch Dataset.

**Chunks** (Kaldi's ``UtteranceSplitter``). With ``--num-frames=n0,n1,...`` (rounded up
to multiples of the frame-subsampling factor f; n0 the "principal" size) an utterance
of U input frames is covered by a *split*: any number of n0-chunks plus at most two
chunks of the other sizes. Each split has a default duration D (the sum of its sizes,
minus ``num_frames_overlap`` scaled to the smaller of each adjacent pair); its cost is

    c(D, U) = D - U        if D > U     (overlap)
            = 2 (U - D)    otherwise    (frames left out count double)
            = inf          if a chunk is longer than U,

and one split is drawn uniformly among those with ``c < c_min + 1.9999``. Its chunks
are shuffled in ascending or descending order (coin flip), and the gaps between them
are set on the subsampled time axis: if the chunks are too long, the overlap
``U/f - sum(n_i/f)`` is shared between adjacent chunks in proportion to the smaller of
the two (no overlap before the first or after the last chunk); otherwise the spare
frames are spread uniformly at random over the ``k + 1`` places before, between and
after the chunks. Output frame t of a chunk gets the deriv weight ``1 / (number of
chunks containing t)``.

**An example** for a chunk starting at input frame b with n frames, left/right context
l, r: input rows are frames ``b-l .. b+n+r-1`` (rows outside the utterance repeat its
first or last frame), with indexes ``(0, t, 0)``, ``t = -l .. n+r-1``; the output has
``n/f`` frames with indexes ``(0, i*f, 0)``; the supervision is the utterance's
supervision cut to output frames ``[b/f, b/f + n/f)`` and normalized with
normalization.fst (see :mod:`pkwrap.chain.supervision`); the key is ``utt-b``.

Randomness: Kaldi draws its choices from ``rand()`` and ``std::random_device`` (so its
chunk placement differs from run to run even with ``--srand``); pkwrap draws them from a
seeded ``numpy`` generator. Given the same chunk (key), the example equals Kaldi's.

The batch that :func:`collate_chain_egs` returns (S sequences, T output frames,
T_in input frames with context, F feature dim, P pdfs)::

    eg.inputs["input"]         float32 [S * T_in][F]    sequence-major
    eg.input_indexes["input"]  int32   [S * T_in][3]    (n, t, x)
    eg.output_indexes          int32   [T * S][3]       t-major
    eg.deriv_weights           float32 [T * S]
    eg.supervision             Supervision(S, T, P, weight, fst | e2e_fsts)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import (Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import numpy as np

from ..kaldi.chain_egs import NnetChainExample, Supervision, merge_chain_egs
from ..kaldi.fst import Fst, read_fst
from .supervision import (ErrorReport, SupervisionError, SupervisionSplitter,
                          add_weight_to_supervision, min_path_length,
                          training_graph_to_supervision_e2e)

__all__ = ["ExampleGenerationConfig", "ChunkTimeInfo", "UtteranceSplitter",
           "extract_rows_with_padding", "get_chain_egs", "get_e2e_chain_eg",
           "ChainEgsDataset", "E2EChainEgsDataset", "collate_chain_egs"]

logger = logging.getLogger(__name__)


# ======================================================================= config
@dataclass
class ExampleGenerationConfig:
    """Kaldi's ``ExampleGenerationConfig`` (flags of ``nnet3-chain-get-egs``).

    Args:
      left_context: ``--left-context``: input frames added before each chunk.
      right_context: ``--right-context``: ... and after it.
      left_context_initial: ``--left-context-initial`` for the first chunk of an
        utterance (-1: same as left_context).
      right_context_final: ``--right-context-final`` for the last chunk (-1: same).
      num_frames: ``--num-frames``: "150" or "150,120,90" (principal size first), or a
        list; -1 means one chunk per whole utterance. Rounded up to multiples of
        frame_subsampling_factor.
      num_frames_overlap: ``--num-frames-overlap`` (advisory overlap between chunks).
      frame_subsampling_factor: ``--frame-subsampling-factor`` (3 for chain models).
    """

    left_context: int = 0
    right_context: int = 0
    left_context_initial: int = -1
    right_context_final: int = -1
    num_frames: Union[str, int, Sequence[int]] = "1"
    num_frames_overlap: int = 0
    frame_subsampling_factor: int = 1

    def __post_init__(self):
        if isinstance(self.num_frames, str):
            s = self.num_frames.strip()
            try:
                vals = [int(x) for x in s.split(",")]
            except ValueError:
                raise ValueError("invalid --num-frames=%s (expected comma-separated integers)"
                                 % s) from None
        elif isinstance(self.num_frames, int):
            vals = [self.num_frames]
        else:
            vals = [int(x) for x in self.num_frames]
        m = self.frame_subsampling_factor
        if m < 1:
            raise ValueError("invalid --frame-subsampling-factor=%d" % m)
        if self.left_context < 0 or self.right_context < 0:
            raise ValueError("--left-context and --right-context must be >= 0")
        if vals == [-1]:
            self.whole_utterance = True
            self.num_frames_list: List[int] = []
        else:
            if not vals or any(v <= 0 for v in vals):
                raise ValueError("invalid --num-frames=%s" % (self.num_frames,))
            self.whole_utterance = False
            self.num_frames_list = [v if v % m == 0 else m * (v // m + 1) for v in vals]
            if self.num_frames_overlap >= self.num_frames_list[0]:
                raise ValueError("--num-frames-overlap=%d is too high for --num-frames=%d"
                                 % (self.num_frames_overlap, self.num_frames_list[0]))

    @property
    def first_left_context(self) -> int:
        return self.left_context_initial if self.left_context_initial >= 0 else self.left_context

    @property
    def last_right_context(self) -> int:
        return self.right_context_final if self.right_context_final >= 0 else self.right_context


@dataclass
class ChunkTimeInfo:
    """One chunk: input frames ``[first_frame, first_frame + num_frames)`` plus context.

    Args:
      first_frame, num_frames: in input frames (multiples of the subsampling factor).
      left_context, right_context: context frames added.
      output_weights: float32 ``[num_frames / f]``, 1/(chunks covering the frame).
    """

    first_frame: int
    num_frames: int
    left_context: int
    right_context: int
    output_weights: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


class UtteranceSplitter:
    """Kaldi's ``UtteranceSplitter``: where the chunks of an utterance go.

    Args:
      config: the :class:`ExampleGenerationConfig`.
      seed: seed of the random choices (or pass ``rng``).
      rng: a ``numpy.random.Generator`` to draw from.
    """

    def __init__(self, config: ExampleGenerationConfig, seed: Optional[int] = 0,
                 rng: Optional[np.random.Generator] = None):
        self.config = config
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.total_num_utterances = 0
        self.total_input_frames = 0
        self.total_frames_overlap = 0
        self.total_num_chunks = 0
        self.total_frames_in_chunks = 0
        self.chunk_size_to_count: Dict[int, int] = {}
        if not config.whole_utterance:
            self._init_split_for_length()

    # ---------------------------------------------------------------- split table
    def _default_duration(self, split: Sequence[int]) -> float:
        if not split:
            return 0.0
        c = self.config
        prop = np.float32(c.num_frames_overlap) / np.float32(c.num_frames_list[0])
        ans = np.float32(sum(split))
        for a, b in zip(split[:-1], split[1:]):
            ans -= prop * np.float32(min(a, b))
        return float(ans)

    def _max_utterance_length(self) -> int:
        nf = self.config.num_frames_list
        return 2 * max(nf) + nf[0]

    def _init_splits(self) -> List[Tuple[int, ...]]:
        nf = self.config.num_frames_list
        primary = nf[0]
        ceiling = self._max_utterance_length() + primary
        splits = set()
        for i in range(len(nf)):
            for j in range(len(nf)):
                vec = []
                if i > 0:
                    vec.append(nf[i])
                if j > 0:
                    vec.append(nf[j])
                while self._default_duration(vec) <= ceiling:
                    if vec:
                        splits.add(tuple(vec))
                    vec = sorted(vec + [primary])
        return sorted(splits)

    def _init_split_for_length(self) -> None:
        max_len = self._max_utterance_length()
        splits = self._init_splits()
        u = np.arange(max_len + 1, dtype=np.float32)
        big = np.finfo(np.float32).max
        costs = np.empty((len(splits), max_len + 1), np.float32)
        for s, split in enumerate(splits):
            d = np.float32(self._default_duration(split))
            c = np.where(d > u, d - u, np.float32(2.0) * (u - d)).astype(np.float32)
            c[u < max(split)] = big
            costs[s] = c
        self._splits_for_length: List[List[Tuple[int, ...]]] = []
        for L in range(max_len + 1):
            col = costs[:, L]
            m = col.min()
            if m == big:
                self._splits_for_length.append([])
                continue
            self._splits_for_length.append([splits[s] for s in range(len(splits))
                                            if col[s] < m + np.float32(1.9999)])

    # ---------------------------------------------------------------- chunking
    def lengths_match(self, utterance_length: int, supervision_length: int,
                      length_tolerance: int = 0) -> bool:
        """True if ``supervision_length`` is ``ceil(utterance_length / f)`` within tolerance."""
        sf = self.config.frame_subsampling_factor
        return abs(supervision_length - (utterance_length + sf - 1) // sf) <= length_tolerance

    def _chunk_sizes(self, utterance_length: int) -> List[int]:
        c = self.config
        primary = c.num_frames_list[0]
        max_tab = len(self._splits_for_length) - 1
        repeats = 0
        while utterance_length > max_tab:
            utterance_length -= primary - c.num_frames_overlap
            repeats += 1
        possible = self._splits_for_length[utterance_length]
        if not possible:
            return []
        sizes = list(possible[int(self.rng.integers(0, len(possible)))]) + [primary] * repeats
        sizes.sort()
        if int(self.rng.integers(0, 2)) == 0:
            sizes.reverse()
        return sizes

    def _distribute_uniform(self, n: int, size: int) -> List[int]:
        if n < 0:
            return [-x for x in self._distribute_uniform(-n, size)]
        common, rem = divmod(n, size)
        vec = [common + 1] * rem + [common] * (size - rem)
        self.rng.shuffle(vec)
        return vec

    @staticmethod
    def _distribute(n: int, magnitudes: Sequence[int]) -> List[int]:
        # Kaldi's DistributeRandomly. Its fractional parts are stored in an int32 (so
        # they are all 0) and the leftover units therefore go to the first entries in
        # order; reproduced as is.
        if n < 0:
            return [-x for x in UtteranceSplitter._distribute(-n, magnitudes)]
        total = np.float32(sum(magnitudes))
        vec = [int(np.float32(n) * np.float32(m) / total) for m in magnitudes]
        i = 0
        while sum(vec) < n:
            vec[i] += 1
            i += 1
        return vec

    def _gap_sizes(self, utterance_length: int, sizes: Sequence[int],
                   enforce_subsampling: bool = True) -> List[int]:
        if not sizes:
            return []
        sf = self.config.frame_subsampling_factor
        if enforce_subsampling and sf > 1:
            gaps = self._gap_sizes((utterance_length + sf - 1) // sf,
                                   [s // sf for s in sizes], False)
            return [g * sf for g in gaps]
        k = len(sizes)
        total_gap = utterance_length - sum(sizes)
        if total_gap < 0:
            if k == 1:
                raise ValueError("chunk size %d exceeds utterance length %d"
                                 % (sizes[0], utterance_length))
            mags = [min(sizes[i], sizes[i + 1]) for i in range(k - 1)]
            overlaps = self._distribute(total_gap, mags)
            return [0] + overlaps
        return self._distribute_uniform(total_gap, k + 1)[:k]

    def get_chunks_for_utterance(self, utterance_length: int) -> List[ChunkTimeInfo]:
        """The chunks of an utterance of ``utterance_length`` input frames (may be empty if
        it is shorter than the smallest chunk size)."""
        c = self.config
        chunks: List[ChunkTimeInfo] = []
        t = 0
        if c.whole_utterance:
            chunks.append(ChunkTimeInfo(0, utterance_length, c.first_left_context,
                                        c.last_right_context))
        else:
            sizes = self._chunk_sizes(utterance_length)
            gaps = self._gap_sizes(utterance_length, sizes)
            for i, (g, n) in enumerate(zip(gaps, sizes)):
                t += g
                chunks.append(ChunkTimeInfo(
                    t, n, c.first_left_context if i == 0 else c.left_context,
                    c.last_right_context if i == len(sizes) - 1 else c.right_context))
                t += n
        self._set_output_weights(utterance_length, chunks)
        self._acc_stats(utterance_length, chunks)
        if chunks and t - utterance_length >= c.frame_subsampling_factor and \
                not c.whole_utterance:
            raise AssertionError("chunks end %d frames past the utterance" % (t - utterance_length))
        return chunks

    def chunks_at(self, utterance_length: int, first_frames: Sequence[int],
                  sizes: Optional[Sequence[int]] = None) -> List[ChunkTimeInfo]:
        """Chunks at given start frames (no random choice, no stats), with Kaldi's
        contexts and output weights; e.g. to rebuild the egs of a Kaldi archive from their
        keys ``utt-<first_frame>``.

        Args:
          utterance_length: input frames of the utterance.
          first_frames: chunk starts in input frames, increasing.
          sizes: chunk sizes (default: the principal ``num_frames``).
        """
        c = self.config
        if sizes is None:
            sizes = [c.num_frames_list[0] if not c.whole_utterance else utterance_length] \
                * len(first_frames)
        k = len(first_frames)
        chunks = [ChunkTimeInfo(int(b), int(n),
                                c.first_left_context if i == 0 else c.left_context,
                                c.last_right_context if i == k - 1 else c.right_context)
                  for i, (b, n) in enumerate(zip(first_frames, sizes))]
        self._set_output_weights(utterance_length, chunks)
        return chunks

    def _set_output_weights(self, utterance_length: int, chunks: List[ChunkTimeInfo]) -> None:
        sf = self.config.frame_subsampling_factor
        count = np.zeros((utterance_length + sf - 1) // sf + 1, np.int64)
        for ch in chunks:
            count[ch.first_frame // sf:(ch.first_frame + ch.num_frames) // sf] += 1
        for ch in chunks:
            b = ch.first_frame // sf
            e = (ch.first_frame + ch.num_frames) // sf
            ch.output_weights = (np.float32(1.0) / count[b:e].astype(np.float32))

    def _acc_stats(self, utterance_length: int, chunks: List[ChunkTimeInfo]) -> None:
        self.total_num_utterances += 1
        self.total_input_frames += utterance_length
        for i, ch in enumerate(chunks):
            if i > 0:
                prev_end = chunks[i - 1].first_frame + chunks[i - 1].num_frames
                if prev_end > ch.first_frame:
                    self.total_frames_overlap += prev_end - ch.first_frame
            self.chunk_size_to_count[ch.num_frames] = \
                self.chunk_size_to_count.get(ch.num_frames, 0) + 1
            self.total_num_chunks += 1
            self.total_frames_in_chunks += ch.num_frames

    def summary(self) -> str:
        """Kaldi's closing log lines (utterances, chunks, overlap)."""
        if not self.total_num_chunks or not self.total_input_frames:
            return "Split %d utts into 0 chunks." % self.total_num_utterances
        avg = self.total_frames_in_chunks / self.total_num_chunks
        ov = 100.0 * self.total_frames_overlap / self.total_input_frames
        outp = 100.0 * self.total_frames_in_chunks / self.total_input_frames
        return ("Split %d utts, with total length %d frames into %d chunks. Average chunk "
                "length was %g frames; overlap between adjacent chunks was %g%% of input "
                "length; length of output was %g%% of input length (minus overlap = %g%%)."
                % (self.total_num_utterances, self.total_input_frames, self.total_num_chunks,
                   avg, ov, outp, outp - ov))


# ======================================================================= examples
def extract_rows_with_padding(feats: np.ndarray, start: int, num_rows: int) -> np.ndarray:
    """Rows ``start .. start+num_rows-1`` of ``feats``; rows outside repeat the first or
    last row (Kaldi's ``ExtractRowRangeWithPadding``).

    Args:
      feats: ``[U][F]``.
    Returns:
      float32 ``[num_rows][F]``.
    """
    U = feats.shape[0]
    if U == 0:
        raise ValueError("cannot take rows of an empty feature matrix")
    idx = np.clip(np.arange(start, start + num_rows), 0, U - 1)
    return np.ascontiguousarray(feats[idx], dtype=np.float32)


def _make_eg(inp: np.ndarray, left_context: int, sup: Supervision, weights: np.ndarray,
             sf: int) -> NnetChainExample:
    import torch
    n_in = inp.shape[0]
    in_idx = np.zeros((n_in, 3), np.int32)
    in_idx[:, 1] = np.arange(-left_context, n_in - left_context)
    T = sup.frames_per_sequence
    out_idx = np.zeros((T, 3), np.int32)
    out_idx[:, 1] = np.arange(T) * sf
    return NnetChainExample(inputs={"input": torch.from_numpy(inp)},
                            input_indexes={"input": in_idx}, output_name="output",
                            output_indexes=out_idx, supervision=sup,
                            deriv_weights=torch.from_numpy(
                                np.ascontiguousarray(weights, dtype=np.float32)))


def _as_feats(feats, key: str) -> np.ndarray:
    if hasattr(feats, "detach"):
        feats = feats.detach().cpu().numpy()
    a = np.asarray(feats, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] == 0:
        raise SupervisionError(key, "bad_input", "features must be a non-empty [frames][dim] "
                               "matrix, got shape %s" % (a.shape,))
    if not np.all(np.isfinite(a)):
        raise SupervisionError(key, "bad_input", "features contain NaN or inf")
    return a


def get_chain_egs(key: str, feats, supervision: Supervision, splitter: UtteranceSplitter,
                  normalization_fst=None, deriv_weights: Optional[np.ndarray] = None,
                  supervision_length_tolerance: int = 1, long_key: bool = False,
                  report: Optional[ErrorReport] = None,
                  chunks: Optional[List[ChunkTimeInfo]] = None,
                  sup_splitter: Optional[SupervisionSplitter] = None,
                  ivectors: Optional[np.ndarray] = None, ivector_period: int = 10,
                  ivector_length_tolerance: int = 100
                  ) -> List[Tuple[str, NnetChainExample]]:
    """The chain egs of one utterance (``nnet3-chain-get-egs``'s ``ProcessFile``).

    Args:
      key: utterance id.
      feats: ``[U][F]`` features (numpy or torch).
      supervision: its one-sequence supervision (``ceil(U / f)`` frames).
      splitter: the :class:`UtteranceSplitter` (config + random choices + stats).
      normalization_fst: normalization.fst (:class:`Fst` or path), or None to leave the
        chunks unnormalized (as Kaldi without the argument; they still have epsilons).
      deriv_weights: optional per-output-frame weights ``[ceil(U / f)]``, multiplied into
        the chunks' output weights.
      supervision_length_tolerance: allowed difference between ``ceil(U/f)`` and the
        supervision's length (Kaldi's default 1).
      long_key: keys ``utt-first-left-num-right-v1`` instead of ``utt-first``.
      report: chunks whose numerator is empty after normalization are recorded here
        (and skipped); if None they raise.
      chunks: use these chunks instead of drawing them (e.g. to rebuild a Kaldi eg).
      sup_splitter: a :class:`SupervisionSplitter` of ``supervision`` to reuse.
      ivectors: online i-vectors ``[R][D]`` of the utterance, one per
        ``ivector_period`` frames (``--online-ivectors``): each eg gets an input
        "ivector" (one row, index (0, 0, 0)). As in Kaldi, the row is that of a frame
        drawn uniformly from ``[b - l, b - l + U - 1]`` (b the chunk's first frame, l its
        left context, U the utterance's frames -- not the chunk's), divided by the
        period and clamped to the rows there are; drawn from ``splitter.rng``.
      ivector_period: ``--online-ivector-period``.
      ivector_length_tolerance: ``--length-tolerance``: most frames by which the
        features and ``rows * period`` may differ.
    Returns:
      ``[(key, NnetChainExample)]``; empty if the utterance is too short.
    Raises:
      SupervisionError: ``bad_length``, ``too_short`` or ``bad_input`` for the utterance.
    """
    feats = _as_feats(feats, key)
    cfg = splitter.config
    sf = cfg.frame_subsampling_factor
    if ivectors is not None:
        ivectors = np.asarray(ivectors, dtype=np.float32)
        if ivectors.ndim != 2 or ivectors.shape[0] == 0:
            raise SupervisionError(key, "bad_input", "online i-vectors must be a non-empty "
                                   "[rows][dim] matrix, got shape %s" % (ivectors.shape,))
        if ivector_period <= 0:
            raise ValueError("--online-ivector-period must be > 0")
        if not np.all(np.isfinite(ivectors)):  # as the features (_as_feats)
            raise SupervisionError(key, "bad_input", "online i-vectors contain NaN or inf")
        if abs(feats.shape[0] - ivectors.shape[0] * ivector_period) > ivector_length_tolerance:
            raise SupervisionError(key, "bad_length", "%d feature frames but %d i-vector rows "
                                   "at period %d (more than --length-tolerance=%d apart)"
                                   % (feats.shape[0], ivectors.shape[0], ivector_period,
                                      ivector_length_tolerance))
    if supervision.num_sequences != 1 or supervision.e2e:
        raise SupervisionError(key, "bad_input", "expected one-sequence regular supervision")
    U, T = feats.shape[0], supervision.frames_per_sequence
    if deriv_weights is not None:
        deriv_weights = np.asarray(deriv_weights, np.float32).ravel()
        if abs(len(deriv_weights) - T) > supervision_length_tolerance:
            raise SupervisionError(key, "bad_length", "deriv weights have %d frames, the "
                                   "supervision %d" % (len(deriv_weights), T))
    if not splitter.lengths_match(U, T, supervision_length_tolerance):
        raise SupervisionError(key, "bad_length", "supervision has %d frames but %d feature "
                               "frames need (%d + %d - 1) / %d = %d" % (
                                   T, U, U, sf, sf, (U + sf - 1) // sf))
    U = min(U, T * sf)
    if chunks is None:
        chunks = splitter.get_chunks_for_utterance(U)
    if not chunks:
        raise SupervisionError(key, "too_short", "not producing egs: utterance is too short "
                               "(%d frames) for --num-frames=%s" % (U, cfg.num_frames))
    ssplit = sup_splitter if sup_splitter is not None else SupervisionSplitter(supervision)
    out = []
    for ch in chunks:
        b = ch.first_frame // sf
        n = ch.num_frames // sf
        ckey = ("%s-%d-%d-%d-%d-v1" % (key, ch.first_frame, ch.left_context, ch.num_frames,
                                       ch.right_context) if long_key
                else "%s-%d" % (key, ch.first_frame))
        part = ssplit.get_frame_range(b, n)
        if normalization_fst is not None:
            try:
                part = add_weight_to_supervision(part, normalization_fst, ckey)
            except SupervisionError as e:
                e.message += " (feature frames %d to %d)" % (ch.first_frame,
                                                             ch.first_frame + ch.num_frames)
                if report is None:
                    raise
                report.add(e)
                continue
        w = np.asarray(ch.output_weights, np.float32)
        if deriv_weights is not None:
            dw = np.zeros(n, np.float32)
            m = max(0, min(n, len(deriv_weights) - b))
            dw[:m] = deriv_weights[b:b + m]
            w = dw * w
        start = ch.first_frame - ch.left_context
        inp = extract_rows_with_padding(feats, start,
                                        ch.left_context + ch.num_frames + ch.right_context)
        eg = _make_eg(inp, ch.left_context, part, w, sf)
        if ivectors is not None:
            frame = int(splitter.rng.integers(start, start + U))
            row = min(max(frame // ivector_period, 0), ivectors.shape[0] - 1)
            import torch
            eg.inputs["ivector"] = torch.from_numpy(
                np.ascontiguousarray(ivectors[row:row + 1], dtype=np.float32))
            eg.input_indexes["ivector"] = np.zeros((1, 3), np.int32)
        out.append((ckey, eg))
    return out


def get_e2e_chain_eg(key: str, feats, graph: Fst, trans_model, config: ExampleGenerationConfig,
                     normalization_fst=None) -> Tuple[str, NnetChainExample]:
    """One end-to-end eg per utterance (``nnet3-chain-e2e-get-egs``'s ``ProcessFile``).

    The utterance length must be one of ``config.num_frames`` (within 4 frames; Kaldi
    then extends the context to make up the difference). The input is the whole
    utterance with ``left_context`` / ``right_context`` frames of edge padding.

    Args:
      key: utterance id (also the eg's key).
      feats: ``[U][F]`` features.
      graph: its ``compile-train-graphs`` graph (transition-ids), see
        :func:`pkwrap.decode.graph.compile_train_graph`.
      trans_model: the transition model.
      config: egs options (``num_frames`` lists the allowed lengths).
      normalization_fst: normalization.fst or None.
    Returns:
      ``(key, NnetChainExample)`` with ``e2e_fsts``.
    Raises:
      SupervisionError: ``bad_length``, ``too_short`` (too many phones for the frames),
        ``empty_numerator``, ``empty_transcript``.
    """
    feats = _as_feats(feats, key)
    U = feats.shape[0]
    if config.whole_utterance:
        min_diff = 0
    else:
        min_diff = 100
        for n in config.num_frames_list:
            if abs(U - n) < abs(min_diff):
                min_diff = U - n
    extend = 0
    if min_diff != 0:
        if abs(min_diff) < 5:
            extend = -min_diff
            logger.warning("utterance %s has %d frames, closest allowed length is off by %d; "
                           "adjusting the context", key, U, min_diff)
        else:
            raise SupervisionError(key, "bad_length", "%d frames is not close to any allowed "
                                   "length %s" % (U, config.num_frames_list))
    sf = config.frame_subsampling_factor
    T = (U + extend + sf - 1) // sf
    sup = training_graph_to_supervision_e2e(graph, trans_model, T, key)
    need = min_path_length(sup.e2e_fsts[0])
    if need < 0:
        raise SupervisionError(key, "empty_transcript", "the graph has no complete path")
    if need > T:
        raise SupervisionError(key, "too_short", "too many phones for too few frames: %d "
                               "subsampled frames, the graph needs at least %d" % (T, need))
    if normalization_fst is not None:
        sup = add_weight_to_supervision(sup, normalization_fst, key)
    lc, rc = config.first_left_context, config.last_right_context
    inp = extract_rows_with_padding(feats, -lc, lc + U + rc + extend)
    return key, _make_eg(inp, lc, sup, np.ones(T, np.float32), sf)


# ======================================================================= datasets
def _torch_data():
    from torch.utils.data import Dataset
    return Dataset


class ChainEgsDataset(_torch_data()):
    """Chain egs made on the fly: a map-style torch Dataset of ``(key, NnetChainExample)``.

    The chunks of every utterance are drawn (as ``nnet3-chain-get-egs`` would) when the
    dataset is built and again at each :meth:`set_epoch` (seeded by ``seed + epoch``,
    so every rank/worker agrees); each item's supervision is cut and normalized when it
    is fetched, so no egs are ever written. Utterances that cannot give egs are listed
    in :attr:`report` (with counts per reason); chunks whose numerator turns out empty
    are reported too and replaced by None (:func:`collate_chain_egs` drops them and
    counts them).

    Args:
      feats: mapping key -> ``[U][F]`` features (numpy/torch; e.g. a dict or a
        ``pkwrap.kaldi.table.RandomAccessTableReader``).
      supervisions: mapping key -> one-sequence :class:`Supervision` (from
        :func:`pkwrap.chain.supervision.get_supervisions`).
      normalization_fst: normalization.fst (Fst or path).
      config: :class:`ExampleGenerationConfig`.
      seed: random seed of the chunk placement.
      keys: the utterances to use (default: those of ``supervisions``, sorted).
      deriv_weights: optional mapping key -> per-output-frame weights.
    """

    def __init__(self, feats: Mapping, supervisions: Mapping[str, Supervision],
                 normalization_fst, config: ExampleGenerationConfig, seed: int = 0,
                 keys: Optional[Sequence[str]] = None,
                 deriv_weights: Optional[Mapping] = None):
        self.feats = feats
        self.supervisions = supervisions
        self.normalization_fst = (read_fst(normalization_fst) if not isinstance(
            normalization_fst, Fst) and normalization_fst is not None else normalization_fst)
        self.config = config
        self.seed = int(seed)
        self.keys = sorted(supervisions.keys()) if keys is None else list(keys)
        self.deriv_weights = deriv_weights
        self.epoch = 0
        self.report = ErrorReport()
        self._sup_splitters: Dict[str, SupervisionSplitter] = {}
        self._place_chunks()

    def _place_chunks(self) -> None:
        self.report = ErrorReport()
        splitter = UtteranceSplitter(self.config, seed=self.seed + 1000003 * self.epoch)
        sf = self.config.frame_subsampling_factor
        items = []
        for key in self.keys:
            if key not in self.supervisions:
                self.report.add(SupervisionError(key, "no_supervision", "no supervision"))
                continue
            if key not in self.feats:
                self.report.add(SupervisionError(key, "no_features", "no features"))
                continue
            sup = self.supervisions[key]
            U = int(np.shape(self.feats[key])[0])
            T = sup.frames_per_sequence
            if not splitter.lengths_match(U, T, 1):
                self.report.add(SupervisionError(key, "bad_length", "supervision has %d frames, "
                                                 "features %d" % (T, U)))
                continue
            chunks = splitter.get_chunks_for_utterance(min(U, T * sf))
            if not chunks:
                self.report.add(SupervisionError(key, "too_short", "utterance too short (%d "
                                                 "frames) for --num-frames=%s"
                                                 % (U, self.config.num_frames)))
                continue
            self.report.num_ok += 1
            items.extend((key, ch) for ch in chunks)
        self.items = items
        self.splitter = splitter

    def set_epoch(self, epoch: int) -> None:
        """Redraw the chunk placement for ``epoch`` (like Kaldi's fresh egs per epoch)."""
        self.epoch = int(epoch)
        self._place_chunks()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, ch = self.items[i]
        dw = (self.deriv_weights[key] if self.deriv_weights is not None
              and key in self.deriv_weights else None)
        rep = ErrorReport()
        ssp = self._sup_splitters.pop(key, None)
        if ssp is None:
            ssp = SupervisionSplitter(self.supervisions[key])
        self._sup_splitters[key] = ssp  # most recently used last
        while len(self._sup_splitters) > 16:
            self._sup_splitters.pop(next(iter(self._sup_splitters)))
        egs = get_chain_egs(key, self.feats[key], self.supervisions[key], self.splitter,
                            self.normalization_fst, deriv_weights=dw, report=rep,
                            chunks=[ch], sup_splitter=ssp)
        if not egs:
            logger.warning("%s", rep.summary("chunks"))
            return None
        return egs[0]


class E2EChainEgsDataset(_torch_data()):
    """End-to-end egs on the fly: one ``(key, NnetChainExample)`` per utterance.

    Args:
      feats: mapping key -> ``[U][F]`` features.
      graphs: mapping key -> training graph (:class:`Fst` over transition-ids, e.g. from
        :func:`pkwrap.decode.graph.compile_train_graph`).
      trans_model: the transition model.
      normalization_fst: normalization.fst.
      config: :class:`ExampleGenerationConfig` (``num_frames`` = allowed lengths).
      keys: utterances to use (default: sorted keys of ``graphs``).
    """

    def __init__(self, feats: Mapping, graphs: Mapping[str, Fst], trans_model,
                 normalization_fst, config: ExampleGenerationConfig,
                 keys: Optional[Sequence[str]] = None):
        self.feats, self.graphs, self.trans_model = feats, graphs, trans_model
        self.normalization_fst = (read_fst(normalization_fst) if not isinstance(
            normalization_fst, Fst) and normalization_fst is not None else normalization_fst)
        self.config = config
        self.keys = sorted(graphs.keys()) if keys is None else list(keys)
        self.report = ErrorReport()
        ok = []
        for k in self.keys:
            if k not in feats:
                self.report.add(SupervisionError(k, "no_features", "no features"))
            elif k not in graphs:
                self.report.add(SupervisionError(k, "no_supervision", "no training graph"))
            else:
                ok.append(k)
                self.report.num_ok += 1
        self.keys = ok

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        k = self.keys[i]
        try:
            return get_e2e_chain_eg(k, self.feats[k], self.graphs[k], self.trans_model,
                                    self.config, self.normalization_fst)
        except SupervisionError as e:
            logger.warning("%s", e)
            return None


def collate_chain_egs(batch: Sequence) -> Tuple[List[str], NnetChainExample]:
    """Merge dataset items into one minibatch (``nnet3-chain-merge-egs``).

    Args:
      batch: ``(key, NnetChainExample)`` pairs (or bare examples); None items (chunks
        whose numerator was empty) are dropped and counted in a warning.
    Returns:
      ``(keys, merged_example)``; the merged example is drawn in the module docstring.
    """
    items = [b for b in batch if b is not None]
    if len(items) < len(batch):
        logger.warning("collate_chain_egs: dropped %d of %d items with no usable supervision",
                       len(batch) - len(items), len(batch))
    if not items:
        raise ValueError("collate_chain_egs: no usable example in the batch")
    keys, egs = [], []
    for it in items:
        if isinstance(it, tuple):
            keys.append(it[0])
            egs.append(it[1])
        else:
            keys.append("")
            egs.append(it)
    T = {e.supervision.frames_per_sequence for e in egs}
    if len(T) > 1:
        raise ValueError("collate_chain_egs: examples of different lengths %s cannot be "
                         "merged; batch them by size" % sorted(T))
    return keys, merge_chain_egs(egs)
