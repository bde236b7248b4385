"""A chain egs dir from a lattice dir, as Kaldi's ``steps/nnet3/chain/get_egs.sh`` makes it
(what ``steps/nnet3/chain/train.py`` runs when ``--egs.dir`` is empty).

Per utterance of the lattice dir (``lat.{1..num_jobs}.gz``, in that order)::

    lattice-align-phones --replace-output-symbols=true <lat-dir>/final.mdl
    | chain-get-supervision --lattice-input=true --frame-subsampling-factor=<alignment f>
                            --left-tolerance --right-tolerance <chain-dir>/tree <chain-dir>/0.trans_mdl
    | nnet3-chain-get-egs [--online-ivectors --online-ivector-period] --left-context ...
                          --num-frames=<frames-per-eg> --frame-subsampling-factor=<f>
                          --compress=true  <features after (online) CMVN>
    (normalized with <chain-dir>/normalization.fst)

Every eg of a training utterance goes to a random archive (``nnet3-chain-copy-egs
--random``); each archive is then shuffled (``nnet3-chain-shuffle-egs``) into
``cegs.<n>.ark``. The ``valid_uttlist`` utterances (held out of the archives) and the
``train_subset_uttlist`` ones (also in the archives) are made into egs again with their
own chunk draws and their own CMVN speaker back-off (their speakers' utterances within
the list only, as get_egs.sh's filtered spk2utt), giving ``valid_diagnostic.cegs``,
``train_diagnostic.cegs`` and ``combine.cegs`` (``nnet3-chain-subset-egs``).

Online CMVN (``online_cmvn=True``): ``apply-cmvn-online`` with the options of
``cmvn_opts`` (e.g. ``--config=conf/online_cmvn.conf``), the global stats being the sum
of ``<feat-dir>/cmvn.scp``; a speaker's utterance backs off to its earlier utterances in
the speaker's spk2utt order among those of the same job (training: all but the
validation ones). Else ``apply-cmvn <cmvn_opts>`` with the speaker stats of
``cmvn.scp``.

The numbers Kaldi writes in ``info/`` follow get_egs.sh: ``num_frames`` is
``round(sum(utt2dur) / frame_shift)``, ``num_archives = num_frames // frames_per_iter +
1`` (reduced to a multiple as the script does past 508 archives), and
``egs_per_archive = num_frames // (F * num_archives)`` where F is the *last* value of
``frames_per_eg`` (bash arithmetic reads "140,100,160" as 160).

Randomness (chunk placement, i-vector row, archive choice, shuffles, subset choice) comes
from numpy generators seeded with ``srand``; Kaldi uses its own ``rand()`` (and an
unseeded ``std::random_device`` for chunk gaps), so the chunks differ from Kaldi's run;
the eg of a given chunk equals Kaldi's (tests/test_lattice_egs.py).

Scp files hold paths relative to the current directory, as in Kaldi: call this from the
recipe root.
"""
from __future__ import annotations

import logging
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..kaldi.chain_egs import write_chain_example
from ..kaldi.io import atomic_output, read_number_file, write_kaldi_object
from .egs import ExampleGenerationConfig, UtteranceSplitter, get_chain_egs
from .supervision import (ErrorReport, SupervisionError, SupervisionOptions,
                          SupervisionSplitter, lattice_to_supervision)

__all__ = ["make_chain_egs_dir", "EgsDirSummary", "EgsDirError", "FeatureNormalizer"]

logger = logging.getLogger(__name__)


@dataclass
class EgsDirSummary:
    """What :func:`make_chain_egs_dir` did."""

    egs_dir: str
    num_archives: int
    num_frames: int
    egs_per_archive_written: List[int]
    num_valid_egs: int
    num_train_subset_egs: int
    report: ErrorReport
    seconds: float
    unused_lattices: List[str] = field(default_factory=list)


class EgsDirError(ValueError):
    """Bad input to :func:`make_chain_egs_dir` (the message names the file)."""


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise EgsDirError("%s: missing (%s)" % (path, what))
    return path


def _read_lines(path: str) -> List[List[str]]:
    try:
        with open(path) as f:
            return [ln.split() for ln in f if ln.strip()]
    except OSError as e:
        raise EgsDirError("%s: cannot read: %s" % (path, e.strerror or e)) from None


def _write_text(path: str, text: str) -> None:
    with atomic_output(path, "w") as f:
        f.write(text)


def _num_frames(feat_dir: str, feats) -> int:
    """steps/nnet2/get_num_frames.sh: round(sum(utt2dur) / frame_shift)."""
    dur = os.path.join(feat_dir, "utt2dur")
    if os.path.exists(dur):
        fs_path = os.path.join(feat_dir, "frame_shift")
        if os.path.exists(fs_path):
            shift = read_number_file(fs_path, float)
            if not shift > 0:
                raise EgsDirError("%s: frame shift %g must be > 0" % (fs_path, shift))
        else:
            shift = 0.01
        total = 0.0
        for i, p in enumerate(_read_lines(dur), 1):
            try:
                total += float(p[1])
            except (ValueError, IndexError):
                raise EgsDirError("%s:%d: expected 'utt duration'" % (dur, i)) from None
        return int(round(total / shift))
    n2f = os.path.join(feat_dir, "utt2num_frames")
    if os.path.exists(n2f):
        try:
            return sum(int(p[1]) for p in _read_lines(n2f))
        except (ValueError, IndexError):
            raise EgsDirError("%s: expected 'utt frames' lines" % n2f) from None
    return sum(int(np.shape(feats[k])[0]) for k in feats.keys())


def _num_archives(num_frames: int, frames_per_iter: int) -> int:
    n = num_frames // frames_per_iter + 1
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = 512 if limit < 0 or limit > 512 else limit
    except (ImportError, ValueError):
        limit = 512
    inter, mult = n, 1
    while inter + 4 > limit:
        mult += 1
        inter = n // mult
    return mult * inter


class FeatureNormalizer:
    """The features of one get_egs.sh job (training / valid / train-subset), normalized:
    ``normalizer(utt)`` is ``apply-cmvn-online --spk2utt`` over the utterances of the
    job (each speaker's utterances among ``utts``, in spk2utt order; utterances may be
    asked for in any order, a speaker restarting if needed), or offline ``apply-cmvn``
    with the speaker's stats.

    Args:
      feats: key -> raw features (e.g. a RandomAccessTableReader of feats.scp).
      utts: the job's utterances (None: all).
      spk2utt: ``[(spk, [utt, ...])]``; utt2spk: utt -> spk.
      online: online CMVN (else offline).
      opts: :class:`pkwrap.kaldi.cmvn.OnlineCmvnOptions`; global_stats: ``[2][D+1]``.
      cmvn_stats: speaker -> stats (offline); offline: (norm_means, norm_vars).
    """

    def __init__(self, feats, utts: Optional[set], spk2utt, utt2spk, online: bool,
                 opts, global_stats, cmvn_stats=None, offline=(True, False)):
        self.feats, self.online, self.opts, self.g = feats, online, opts, global_stats
        self.utt2spk = utt2spk
        self.cmvn_stats, self.offline = cmvn_stats, offline
        self.order: Dict[str, List[str]] = {}
        self.pos: Dict[str, int] = {}
        for spk, lst in spk2utt:
            keep = [u for u in lst if (utts is None or u in utts) and u in feats]
            self.order[spk] = keep
            for i, u in enumerate(keep):
                self.pos[u] = i
        self.state: Dict[str, Tuple[int, Optional[np.ndarray]]] = {}

    def __call__(self, utt: str) -> np.ndarray:
        from ..kaldi.cmvn import apply_cmvn, apply_online_cmvn
        spk = self.utt2spk.get(utt)
        if spk is None:
            raise SupervisionError(utt, "no_speaker", "not in utt2spk")
        if not self.online:
            if not (self.offline[0] or self.offline[1]):
                return np.asarray(self.feats[utt], dtype=np.float32)
            if spk not in self.cmvn_stats:
                raise SupervisionError(utt, "no_cmvn", "speaker %s has no CMVN stats in "
                                       "cmvn.scp" % spk)
            return apply_cmvn(self.feats[utt], self.cmvn_stats[spk], self.offline[0],
                              self.offline[1], key=utt)
        i = self.pos.get(utt)
        if i is None:
            raise SupervisionError(utt, "no_speaker", "not in spk2utt")
        lst = self.order[spk]
        nxt, st = self.state.get(spk, (0, None))
        if nxt > i:  # out of spk2utt order: start the speaker again
            nxt, st = 0, None
        while nxt < i:
            _, st = apply_online_cmvn(self.feats[lst[nxt]], self.g, self.opts, st, key=lst[nxt])
            nxt += 1
        out, st = apply_online_cmvn(self.feats[utt], self.g, self.opts, st, key=utt)
        self.state[spk] = (i + 1, st)
        return out


_REC = struct.Struct("<II")


def _eg_bytes(eg, compress: bool = True) -> bytes:
    return write_kaldi_object(None, lambda w: write_chain_example(w, eg, compress=compress))


@dataclass
class _JobContext:
    feats: object
    all_utts: List[str]
    vset: set
    tset: set
    spk2utt: list
    utt2spk: dict
    online_cmvn: bool
    copts: object
    gstats: object
    cmvn_stats: object
    offline: tuple
    cfg: ExampleGenerationConfig
    srand: int
    lat_tm: object
    tree: object
    ctm: object
    norm: object
    sup_opts: SupervisionOptions
    ivectors: object
    ivector_period: int
    iv_scp: str
    num_archives: int
    compress: bool
    tmp_dir: str
    say: Callable
    t_start: float


@dataclass
class _JobResult:
    keys: List[str]
    unused: List[str]
    counts: List[int]
    held: Dict[str, List[Tuple[str, bytes]]]
    report: ErrorReport
    chunk_report: ErrorReport
    feat_dim: Optional[int]
    split_stats: Dict[str, int]


_CTX: Optional[_JobContext] = None


def _orig_path(tmp_dir: str, job: int, archive: int) -> str:
    return os.path.join(tmp_dir, "cegs_orig.%d.%d" % (job + 1, archive + 1))


def _run_job_in_worker(i: int, lat_path: str) -> "_JobResult":
    return _run_job(_CTX, i, lat_path)


def _run_job(c: _JobContext, job: int, lat_path: str) -> _JobResult:
    """One lattice archive (a get_egs.sh job): its training egs to
    ``cegs_orig.<job>.<archive>`` (a random archive each), its valid and train-subset
    egs returned."""
    from ..kaldi.lattice import PhoneAlignError, phone_align_lattice, read_compact_lattices
    normalizers = {
        "train": FeatureNormalizer(c.feats, {u for u in c.all_utts if u not in c.vset},
                                   c.spk2utt, c.utt2spk, c.online_cmvn, c.copts, c.gstats,
                                   c.cmvn_stats, c.offline),
        "valid": FeatureNormalizer(c.feats, c.vset, c.spk2utt, c.utt2spk, c.online_cmvn,
                                   c.copts, c.gstats, c.cmvn_stats, c.offline),
        "subset": FeatureNormalizer(c.feats, c.tset, c.spk2utt, c.utt2spk, c.online_cmvn,
                                    c.copts, c.gstats, c.cmvn_stats, c.offline)}
    splitters = {name: UtteranceSplitter(c.cfg, rng=np.random.default_rng([c.srand, 2, i, job]))
                 for i, name in enumerate(("train", "valid", "subset"))}
    rng_arch = np.random.default_rng([c.srand, 3, job])
    files = [open(_orig_path(c.tmp_dir, job, a), "wb") for a in range(c.num_archives)]
    res = _JobResult([], [], [0] * c.num_archives, {"valid": [], "subset": []}, ErrorReport(),
                     ErrorReport(), None, {})
    last_say = time.time()
    try:
        for key, lat in read_compact_lattices(lat_path):
            res.keys.append(key)
            if key not in c.feats:
                res.unused.append(key)
                continue
            try:
                try:
                    plat = phone_align_lattice(lat, c.lat_tm, key=key)
                except PhoneAlignError as e:
                    raise SupervisionError(key, "bad_lattice", str(e)) from None
                sup = lattice_to_supervision(plat, c.tree, c.ctm, c.sup_opts, key)
                ssplit = SupervisionSplitter(sup)
                iv = None
                if c.ivectors is not None:
                    if key not in c.ivectors:
                        raise SupervisionError(key, "no_ivectors", "no online i-vectors in %s"
                                               % c.iv_scp)
                    iv = c.ivectors[key]
                for name in (("valid",) if key in c.vset else
                             (("train", "subset") if key in c.tset else ("train",))):
                    x = normalizers[name](key)
                    if res.feat_dim is None:
                        res.feat_dim = x.shape[1]
                    elif x.shape[1] != res.feat_dim:
                        raise SupervisionError(key, "bad_input", "feature dim %d, others have %d"
                                               % (x.shape[1], res.feat_dim))
                    egs = get_chain_egs(key, x, sup, splitters[name], c.norm,
                                        report=res.chunk_report, sup_splitter=ssplit,
                                        ivectors=iv, ivector_period=c.ivector_period or 10)
                    for k, eg in egs:
                        blob = _eg_bytes(eg, c.compress)
                        if name == "train":
                            a = int(rng_arch.integers(0, c.num_archives))
                            kb = k.encode()
                            files[a].write(_REC.pack(len(kb), len(blob)) + kb + blob)
                            res.counts[a] += 1
                        else:
                            res.held[name].append((k, blob))
            except SupervisionError as e:
                res.report.add(e, log=False)
                continue
            res.report.num_ok += 1
            if time.time() - last_say > 10:
                last_say = time.time()
                c.say("%s: %d lattices, %d training egs, %.1f s" % (
                    os.path.basename(lat_path), len(res.keys), sum(res.counts),
                    time.time() - c.t_start))
    finally:
        for f in files:
            f.close()
    sp = splitters["train"]
    res.split_stats = {a: getattr(sp, a) for a in (
        "total_num_utterances", "total_input_frames", "total_frames_overlap",
        "total_num_chunks", "total_frames_in_chunks")}
    return res


def _write_archive(path: str, items: Sequence[Tuple[str, bytes]]) -> None:
    with atomic_output(path) as f:
        for k, blob in items:
            f.write(k.encode() + b" " + blob)


def _read_records(path: str) -> List[Tuple[str, bytes]]:
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nk, nb = _REC.unpack_from(data, pos)
        pos += _REC.size
        k = data[pos:pos + nk].decode()
        pos += nk
        out.append((k, data[pos:pos + nb]))
        pos += nb
    return out


def _subset(items: List, n: int, rng: np.random.Generator) -> List:
    """nnet3-chain-subset-egs --n: all of them if there are at most n, else n at random
    (in input order)."""
    if n >= len(items):
        return list(items)
    idx = np.sort(rng.choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


def make_chain_egs_dir(egs_dir: str, feat_dir: str, lat_dir: str, chain_dir: str, *,
                       left_context: int, right_context: int,
                       left_context_initial: int = -1, right_context_final: int = -1,
                       online_ivector_dir: Optional[str] = None,
                       cmvn_opts: str = "", online_cmvn: bool = False,
                       frame_subsampling_factor: int = 3,
                       alignment_subsampling_factor: int = 3,
                       frames_per_eg: str = "25", frames_overlap_per_eg: int = 0,
                       num_utts_subset: int = 300, frames_per_iter: int = 400000,
                       srand: int = 0, left_tolerance: int = 5, right_tolerance: int = 5,
                       num_train_egs_combine: int = 1000, num_valid_egs_combine: int = 0,
                       num_egs_diagnostic: int = 400, compress: bool = True,
                       valid_uttlist: Optional[Sequence[str]] = None,
                       train_subset_uttlist: Optional[Sequence[str]] = None,
                       config_dir: Optional[str] = None, num_processes: int = 1,
                       progress: Optional[Callable[[str], None]] = None) -> EgsDirSummary:
    """Make a chain egs dir like ``steps/nnet3/chain/get_egs.sh`` (module docstring).

    Args:
      egs_dir: output dir (made if needed).
      feat_dir: data dir: ``feats.scp``, ``utt2spk``, ``spk2utt``, ``cmvn.scp`` (and
        ``utt2dur``, ``frame_shift`` for ``info/num_frames``).
      lat_dir: ``lat.{1..N}.gz``, ``num_jobs``, ``final.mdl`` (for phone alignment).
      chain_dir: ``tree``, ``0.trans_mdl``, ``normalization.fst``.
      left_context, right_context: egs context (model context + 1 in train.py).
      left_context_initial, right_context_final: -1 = same as the above.
      online_ivector_dir: ``ivector_online.scp`` + ``ivector_period`` (None: no i-vectors).
      cmvn_opts: train.py's ``--feat.cmvn-opts`` (``apply-cmvn-online`` options when
        ``online_cmvn``, else ``apply-cmvn`` ones).
      online_cmvn: ``--online-cmvn`` of ``--egs.opts``.
      frame_subsampling_factor: of the model (3).
      alignment_subsampling_factor: ``chain-get-supervision --frame-subsampling-factor``:
        lattice frames per supervision frame (3 for lattices at the features' 10 ms rate,
        1 for lattices already at the model's output rate). The supervision must come
        out at ``ceil(feature frames / frame_subsampling_factor)`` frames (one frame of
        tolerance); utterances where it does not are reported (``bad_length``).
      frames_per_eg: ``--egs.chunk-width``, e.g. ``"140,100,160"`` (principal first).
      frames_overlap_per_eg, num_utts_subset, frames_per_iter, srand,
      left_tolerance, right_tolerance, num_train_egs_combine, num_valid_egs_combine,
      num_egs_diagnostic: as get_egs.sh's options.
      compress: compress the input features (``--compress``).
      valid_uttlist, train_subset_uttlist: use these lists instead of drawing them.
      config_dir: directory that relative ``--config=`` paths in ``cmvn_opts`` are
        relative to (default: the current directory, as Kaldi).
      num_processes: lattice archives processed in parallel (forked processes; Kaldi's
        ``--nj`` jobs). The result does not depend on it: every lattice archive has its
        own random streams.
      progress: called with one-line progress messages (default: print to stderr).
    Returns:
      :class:`EgsDirSummary`.
    Raises:
      EgsDirError: a missing or malformed input (one line naming the file).
    """
    from ..kaldi.cmvn import (OnlineCmvnOptions, format_text_matrix, parse_offline_cmvn_opts,
                              read_spk2utt, read_utt2spk)
    from ..kaldi.fst import read_fst
    from ..kaldi.hmm import read_transition_model, read_tree
    from ..kaldi.table import RandomAccessTableReader, SequentialTableReader

    t_start = time.time()
    say = progress or (lambda m: print("make_chain_egs_dir: " + m, file=sys.stderr, flush=True))

    # ---------------------------------------------------------------- inputs
    j = os.path.join
    feats_scp = _need(j(feat_dir, "feats.scp"), "features of the data dir")
    utt2spk_p = _need(j(feat_dir, "utt2spk"), "utterance-to-speaker map")
    spk2utt_p = _need(j(feat_dir, "spk2utt"), "speaker-to-utterances map")
    tree_p = _need(j(chain_dir, "tree"), "chain tree")
    trans_p = _need(j(chain_dir, "0.trans_mdl"), "chain transition model")
    norm_p = _need(j(chain_dir, "normalization.fst"), "normalization FST")
    lat_mdl_p = _need(j(lat_dir, "final.mdl"), "model of the lattices")
    nj_p = _need(j(lat_dir, "num_jobs"), "number of lattice archives")
    num_jobs = read_number_file(nj_p, int, minimum=1)
    lat_paths = [_need(j(lat_dir, "lat.%d.gz" % n), "lattices of job %d" % n)
                 for n in range(1, num_jobs + 1)]
    cfg = ExampleGenerationConfig(left_context, right_context, left_context_initial,
                                  right_context_final, frames_per_eg, frames_overlap_per_eg,
                                  frame_subsampling_factor)
    sup_opts = SupervisionOptions(left_tolerance, right_tolerance, alignment_subsampling_factor)
    sup_opts.check()
    try:
        tree = read_tree(tree_p)
        ctm = read_transition_model(trans_p)
        lat_tm = read_transition_model(lat_mdl_p)
        norm = read_fst(norm_p)
    except (ValueError, OSError) as e:
        raise EgsDirError(str(e)) from None
    try:
        utt2spk = read_utt2spk(utt2spk_p)
        spk2utt = read_spk2utt(spk2utt_p)
    except ValueError as e:
        raise EgsDirError(str(e)) from None
    feats = RandomAccessTableReader("scp:" + feats_scp, "matrix")

    ivectors = None
    ivector_period = 0
    ivector_dim = 0
    if online_ivector_dir:
        iv_scp = _need(j(online_ivector_dir, "ivector_online.scp"), "online i-vectors")
        per_p = _need(j(online_ivector_dir, "ivector_period"), "i-vector period")
        ivector_period = read_number_file(per_p, int, minimum=1)
        ivectors = RandomAccessTableReader("scp:" + iv_scp, "matrix")
        first = next(iter(ivectors.keys()), None)
        if first is None:
            raise EgsDirError("%s: no i-vectors" % iv_scp)
        ivector_dim = int(np.shape(ivectors[first])[1])

    offline = (True, False)
    copts = None
    gstats = None
    cmvn_stats = None
    cmvn_scp = j(feat_dir, "cmvn.scp")
    try:
        if online_cmvn:
            copts = OnlineCmvnOptions.from_string(cmvn_opts, config_dir)
        else:
            offline = parse_offline_cmvn_opts(cmvn_opts)
    except ValueError as e:
        raise EgsDirError("cmvn_opts %r: %s" % (cmvn_opts, e)) from None
    if online_cmvn or offline[0]:
        _need(cmvn_scp, "CMVN stats")
        gsum = None
        cmvn_stats = {}
        for spk, m in SequentialTableReader("scp:" + cmvn_scp, "matrix"):
            m = np.asarray(m, dtype=np.float64)
            cmvn_stats[spk] = m
            gsum = m.copy() if gsum is None else gsum + m
        if gsum is None:
            raise EgsDirError("%s: no CMVN stats" % cmvn_scp)
        gstats = gsum

    # ---------------------------------------------------------------- lists
    all_utts = list(utt2spk.keys())
    rng_lists = np.random.default_rng([srand, 1])
    if valid_uttlist is None:
        perm = rng_lists.permutation(len(all_utts))
        valid_uttlist = [all_utts[i] for i in perm[:num_utts_subset]]
    valid_uttlist = list(valid_uttlist)
    vset = set(valid_uttlist)
    if train_subset_uttlist is None:
        rest = [u for u in all_utts if u not in vset]
        perm = rng_lists.permutation(len(rest))
        train_subset_uttlist = [rest[i] for i in perm[:num_utts_subset]]
    train_subset_uttlist = list(train_subset_uttlist)
    tset = set(train_subset_uttlist)
    for what, lst in (("valid_uttlist", valid_uttlist),
                      ("train_subset_uttlist", train_subset_uttlist)):
        bad = [u for u in lst if u not in utt2spk]
        if bad:
            raise EgsDirError("%s: %d utterances of %s are not in it (%s)"
                              % (utt2spk_p, len(bad), what, ", ".join(bad[:3])))
    if vset & tset:
        raise EgsDirError("valid_uttlist and train_subset_uttlist share %d utterances (%s)"
                          % (len(vset & tset), ", ".join(sorted(vset & tset)[:3])))
    if len(vset) < num_utts_subset or len(tset) < num_utts_subset:
        raise EgsDirError("%s: only %d utterances: too few to hold out %d for validation "
                          "and %d for the training diagnostics (--num-utts-subset)"
                          % (utt2spk_p, len(all_utts), num_utts_subset, num_utts_subset))

    os.makedirs(j(egs_dir, "info"), exist_ok=True)
    num_frames = _num_frames(feat_dir, feats)
    num_archives = _num_archives(num_frames, frames_per_iter)
    last_fpe = int(str(frames_per_eg).split(",")[-1])
    egs_per_archive = num_frames // (last_fpe * num_archives)
    say("%d utterances (%d held out for validation, %d for training diagnostics), %d "
        "frames -> %d archives" % (len(all_utts), len(vset), len(tset), num_frames,
                                   num_archives))

    # ---------------------------------------------------------------- egs
    tmp_dir = j(egs_dir, "tmp.%d" % os.getpid())
    os.makedirs(tmp_dir, exist_ok=True)
    ctx = _JobContext(
        feats=feats, all_utts=all_utts, vset=vset, tset=tset, spk2utt=spk2utt,
        utt2spk=utt2spk, online_cmvn=online_cmvn, copts=copts, gstats=gstats,
        cmvn_stats=cmvn_stats, offline=offline, cfg=cfg, srand=srand, lat_tm=lat_tm,
        tree=tree, ctm=ctm, norm=norm, sup_opts=sup_opts, ivectors=ivectors,
        ivector_period=ivector_period, iv_scp=iv_scp if ivectors is not None else "",
        num_archives=num_archives, compress=compress, tmp_dir=tmp_dir, say=say,
        t_start=t_start)
    n_proc = max(1, min(int(num_processes), len(lat_paths)))
    results: List[_JobResult] = []
    try:
        if n_proc == 1:
            results = [_run_job(ctx, i, lp) for i, lp in enumerate(lat_paths)]
        else:
            import multiprocessing as mp
            global _CTX
            _CTX = ctx
            try:
                with mp.get_context("fork").Pool(n_proc) as pool:
                    results = pool.starmap(_run_job_in_worker, list(enumerate(lat_paths)))
            finally:
                _CTX = None
        report, chunk_report = ErrorReport(), ErrorReport()
        seen: Dict[str, str] = {}
        unused: List[str] = []
        counts = [0] * num_archives
        held: Dict[str, List[Tuple[str, bytes]]] = {"valid": [], "subset": []}
        feat_dim = None
        stats = UtteranceSplitter(cfg, seed=0)
        for lp, r in zip(lat_paths, results):
            for k in r.keys:
                if k in seen:
                    raise EgsDirError("%s: utterance %s is also in %s" % (lp, k, seen[k]))
                seen[k] = lp
            unused.extend(r.unused)
            report.errors.extend(r.report.errors)
            report.num_ok += r.report.num_ok
            chunk_report.errors.extend(r.chunk_report.errors)
            chunk_report.num_ok += r.chunk_report.num_ok
            counts = [x + y for x, y in zip(counts, r.counts)]
            for name in held:
                held[name].extend(r.held[name])
            if r.feat_dim is not None:
                if feat_dim is not None and r.feat_dim != feat_dim:
                    raise EgsDirError("%s: features of dim %d, others have %d"
                                      % (feats_scp, r.feat_dim, feat_dim))
                feat_dim = r.feat_dim
            for attr in ("total_num_utterances", "total_input_frames", "total_frames_overlap",
                         "total_num_chunks", "total_frames_in_chunks"):
                setattr(stats, attr, getattr(stats, attr) + r.split_stats[attr])
        for u in all_utts:
            if u not in seen:
                report.add(SupervisionError(u, "no_lattice", "no lattice in %s/lat.*.gz"
                                            % lat_dir), log=False)
        if sum(counts) == 0:
            raise EgsDirError("%s: no training egs were made (%s)" % (lat_dir,
                                                                      report.summary()))
        # ------------------------------------------------------------ archives
        rng_shuf = np.random.default_rng([srand, 4])
        for a in range(num_archives):
            recs = []
            for i in range(len(lat_paths)):
                p = _orig_path(tmp_dir, i, a)
                recs.extend(_read_records(p))
                os.unlink(p)
            order = rng_shuf.permutation(len(recs))
            _write_archive(j(egs_dir, "cegs.%d.ark" % (a + 1)), [recs[i] for i in order])
        rng_sub = np.random.default_rng([srand, 5])
        valid_all, subset_all = held["valid"], held["subset"]
        if not valid_all or not subset_all:
            raise EgsDirError("%s: no %s egs were made (%s)" % (
                lat_dir, "validation" if not valid_all else "training-diagnostic",
                report.summary()))
        _write_archive(j(egs_dir, "valid_diagnostic.cegs"),
                       _subset(valid_all, num_egs_diagnostic, rng_sub))
        _write_archive(j(egs_dir, "train_diagnostic.cegs"),
                       _subset(subset_all, num_egs_diagnostic, rng_sub))
        _write_archive(j(egs_dir, "combine.cegs"),
                       _subset(valid_all, num_valid_egs_combine, rng_sub)
                       + _subset(subset_all, num_train_egs_combine, rng_sub))
    finally:
        if os.path.isdir(tmp_dir):
            for name in os.listdir(tmp_dir):
                os.unlink(j(tmp_dir, name))
            os.rmdir(tmp_dir)
    splitter_summary = stats.summary()

    # ---------------------------------------------------------------- the rest
    _write_text(j(egs_dir, "valid_uttlist"), "".join(u + "\n" for u in valid_uttlist))
    _write_text(j(egs_dir, "train_subset_uttlist"),
                "".join(u + "\n" for u in train_subset_uttlist))
    _write_text(j(egs_dir, "cmvn_opts"), cmvn_opts + "\n")
    if online_cmvn:
        _write_text(j(egs_dir, "global_cmvn.stats"), format_text_matrix(gstats))
        _write_text(j(egs_dir, "online_cmvn"), "")
    elif os.path.exists(j(egs_dir, "online_cmvn")):
        os.unlink(j(egs_dir, "online_cmvn"))
    info = {"num_pdfs": ctm.num_pdfs, "ivector_dim": ivector_dim, "num_frames": num_frames,
            "feat_dim": feat_dim, "num_archives": num_archives,
            "frames_per_eg": frames_per_eg, "egs_per_archive": egs_per_archive,
            "left_context": left_context, "right_context": right_context,
            "left_context_initial": left_context_initial,
            "right_context_final": right_context_final}
    for k, v in info.items():
        _write_text(j(egs_dir, "info", k), "%s\n" % v)
    if online_ivector_dir and os.path.exists(j(online_ivector_dir, "final.ie.id")):
        # steps/nnet2/get_ivector_id.sh: the extractor's id, checked at decoding time
        with open(j(online_ivector_dir, "final.ie.id")) as f:
            _write_text(j(egs_dir, "info", "final.ie.id"), f.read())
    if unused:
        say("WARNING: %d lattices have no features in %s and were not used (%s%s)"
            % (len(unused), feats_scp, ", ".join(unused[:5]), ", ..." if len(unused) > 5
               else ""))
    if report.num_errors:
        say("WARNING: %s" % report.summary())
    if chunk_report.num_errors:
        say("WARNING: chunks skipped: %s" % chunk_report.summary("chunks"))
    say("%s; wrote %d training egs in %d archives (%s), %d validation and %d "
        "training-subset egs, %.1f s" % (splitter_summary, sum(counts),
                                         num_archives, ",".join(map(str, counts)),
                                         len(held["valid"]), len(held["subset"]),
                                         time.time() - t_start))
    return EgsDirSummary(egs_dir, num_archives, num_frames, counts, len(held["valid"]),
                         len(held["subset"]), report, time.time() - t_start, unused)
