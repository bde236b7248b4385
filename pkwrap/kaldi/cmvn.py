"""Online cepstral mean (and variance) normalization, as Kaldi's ``apply-cmvn-online``.

For frame t of an utterance (0-based) with window W (``--cmn-window``, 600), the raw
statistics are those of the frames ``max(0, t-W+1) .. t`` (count ``n = min(t+1, W)``,
sums in double precision). While ``n < W`` they are topped up, in this order:

* from the speaker's earlier utterances (``--spk2utt``; the utterances before this one
  in the speaker's list that have features): ``c = min(W - n, speaker_frames,
  speaker_count)`` frames' worth, i.e. ``c / speaker_count`` times the speaker's stats;
* from the global stats (``global_cmvn.stats``, e.g. the sum of ``cmvn.scp``):
  ``min(W - n', global_frames)`` frames' worth.

The frame is then normalized with Kaldi's ``ApplyCmvn`` (mean only by default: the
offset ``float(-1/count) * sum`` is rounded to float and added). After an utterance,
every one of its frames (not just the last W) is added to the speaker's stats.
Dimensions in ``--skip-dims`` are left as they are.

Options come from the command line or a Kaldi config file such as
``conf/online_cmvn.conf`` (``--cmn-window=600`` lines, ``#`` comments), see
:meth:`OnlineCmvnOptions.from_string`.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

__all__ = ["OnlineCmvnOptions", "apply_online_cmvn", "apply_online_cmvn_table", "apply_cmvn",
           "parse_offline_cmvn_opts", "format_text_matrix",
           "read_global_cmvn_stats", "read_spk2utt", "read_utt2spk"]


def _bool(s: str, name: str) -> bool:
    if s.lower() in ("true", "t", "1"):
        return True
    if s.lower() in ("false", "f", "0"):
        return False
    raise ValueError("option --%s expects true or false, got %r" % (name, s))


@dataclass
class OnlineCmvnOptions:
    """Kaldi's ``OnlineCmvnOptions`` (defaults as Kaldi's).

    Args:
      cmn_window: ``--cmn-window``: frames of the sliding window.
      speaker_frames: ``--speaker-frames``: at most this many frames from the
        speaker's earlier utterances.
      global_frames: ``--global-frames``: at most this many from the global stats.
      norm_means: ``--norm-means``.
      norm_vars: ``--norm-vars`` (needs norm_means).
      skip_dims: ``--skip-dims``: dimensions left unnormalized, e.g. ``[13, 14]``.
    """

    cmn_window: int = 600
    speaker_frames: int = 600
    global_frames: int = 200
    norm_means: bool = True
    norm_vars: bool = False
    skip_dims: Tuple[int, ...] = ()

    def check(self) -> None:
        if not (self.global_frames <= self.speaker_frames <= self.cmn_window):
            raise ValueError("online CMVN options need --global-frames <= --speaker-frames <= "
                             "--cmn-window (got %d, %d, %d)" % (
                                 self.global_frames, self.speaker_frames, self.cmn_window))
        if self.cmn_window <= 0:
            raise ValueError("--cmn-window must be > 0")
        if self.norm_vars and not self.norm_means:
            raise ValueError("--norm-vars=true needs --norm-means=true")

    _NAMES = {"cmn-window": ("cmn_window", int), "speaker-frames": ("speaker_frames", int),
              "global-frames": ("global_frames", int), "norm-means": ("norm_means", "b"),
              "norm-vars": ("norm_vars", "b"), "skip-dims": ("skip_dims", "dims")}

    def set_option(self, name: str, value: str, where: str = "") -> None:
        """Set one option by its Kaldi name (``cmn-window``, ...)."""
        name = name.replace("_", "-")
        if name not in self._NAMES:
            raise ValueError("%sunknown online CMVN option --%s (known: %s)" % (
                where, name, ", ".join("--" + n for n in self._NAMES)))
        attr, kind = self._NAMES[name]
        try:
            if kind == "b":
                v = _bool(value, name)
            elif kind == "dims":
                v = tuple(int(x) for x in value.split(":") if x != "")
            else:
                v = int(value)
        except ValueError as e:
            raise ValueError("%sbad value for --%s: %s" % (where, name, e)) from None
        setattr(self, attr, v)

    @classmethod
    def from_string(cls, opts: str, base_dir: Optional[str] = None) -> "OnlineCmvnOptions":
        """Options from a command-line string such as train.py's ``--feat.cmvn-opts``
        (``"--config=conf/online_cmvn.conf --norm-vars=false"``); a ``--config`` file
        is read first (relative to ``base_dir``, default the current directory), the
        other options override it, as Kaldi's ParseOptions does."""
        o = cls()
        items = shlex.split(opts or "")
        configs = []
        for it in items:
            if it.startswith("--config="):
                configs.append(o._read_config(it[len("--config="):], base_dir))
        for it in items:
            if it.startswith("--config="):
                continue
            if not it.startswith("--") or "=" not in it:
                raise ValueError("online CMVN options: expected --name=value, got %r" % it)
            k, v = it[2:].split("=", 1)
            o.set_option(k, v)
        try:
            o.check()
        except ValueError as e:  # name the config file the options came from
            if configs:
                raise ValueError("%s: %s" % (", ".join(configs), e)) from None
            raise
        return o

    def _read_config(self, path: str, base_dir: Optional[str]) -> str:
        """Read the options of a config file; returns its path."""
        from .io import read_text
        p = path if os.path.isabs(path) or base_dir is None else os.path.join(base_dir, path)
        lines = read_text(p).splitlines()
        for i, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            where = "%s:%d: " % (p, i)
            if not line.startswith("--"):
                raise ValueError("%sexpected --name=value, got %r" % (where, line))
            if "=" in line:
                k, v = line[2:].split("=", 1)
            else:
                k, v = line[2:], "true"
            if k == "config":
                self._read_config(v, os.path.dirname(p))
                continue
            self.set_option(k.strip(), v.strip(), where)
        return p


def read_global_cmvn_stats(path) -> np.ndarray:
    """``global_cmvn.stats`` (a Kaldi matrix, text or binary): float64 ``[2][D+1]``
    (sums, sums of squares; the count in the last column)."""
    from .io import KaldiReader
    from .matrix import read_matrix
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError("%s: cannot read CMVN stats: %s" % (p, e.strerror or e)) from None
    r = KaldiReader(data, name=p)
    r.read_header()
    if r.binary:
        m = np.asarray(read_matrix(r), dtype=np.float64)
    else:
        # text: parse in double, as Kaldi reads a Matrix<double> (not through float)
        body = data[r.pos:].decode("ascii", errors="replace").strip()
        if not (body.startswith("[") and body.endswith("]")):
            raise ValueError("%s: expected a text matrix in [ ... ]" % p)
        try:
            rows = [[float(v) for v in line.split()]
                    for line in body[1:-1].splitlines() if line.split()]
            m = np.array(rows, dtype=np.float64)
        except ValueError as e:
            raise ValueError("%s: bad text matrix (%s)" % (p, e)) from None
    if m.ndim != 2 or m.shape[0] not in (1, 2) or m.shape[1] < 2:
        raise ValueError("%s: CMVN stats must be a 2 x (dim+1) matrix, got %s" % (p, m.shape))
    if not m[0, -1] > 0:
        raise ValueError("%s: CMVN stats have count %g (must be > 0)" % (p, m[0, -1]))
    if m.shape[0] == 1:
        m = np.vstack([m, np.zeros_like(m)])
    return m


def _window_sums(xd: np.ndarray, W: int) -> np.ndarray:
    """Sums of the last W rows at every row, accumulated in Kaldi's order (a running
    sum: add the new row, then subtract the one leaving the window), so the doubles
    are bit-identical to Kaldi's."""
    out = np.cumsum(xd, axis=0)  # sequential: the same additions as Kaldi's up to row W-1
    if xd.shape[0] > W:
        cur = out[W - 1].copy()
        for t in range(W, xd.shape[0]):
            cur += xd[t]
            cur -= xd[t - W]
            out[t] = cur
    return out


def apply_online_cmvn(feats: np.ndarray, global_stats: np.ndarray,
                      opts: Optional[OnlineCmvnOptions] = None,
                      speaker_stats: Optional[np.ndarray] = None,
                      key: str = "<utt>") -> Tuple[np.ndarray, np.ndarray]:
    """One utterance through Kaldi's ``OnlineCmvn``.

    Args:
      feats: float32 ``[T][D]`` raw features.
      global_stats: float64 ``[2][D+1]`` (:func:`read_global_cmvn_stats`).
      opts: :class:`OnlineCmvnOptions`.
      speaker_stats: the speaker's stats from earlier utterances (``[2][D+1]``), or
        None for the speaker's first utterance.
      key: the utterance, for error messages.
    Returns:
      ``(normalized float32 [T][D], speaker stats including this utterance)``.
    """
    opts = opts or OnlineCmvnOptions()
    x = np.asarray(feats, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("utterance %s: features must be a non-empty [frames][dim] matrix, got "
                         "shape %s" % (key, x.shape))
    T, D = x.shape
    if global_stats.shape != (2, D + 1):
        raise ValueError("utterance %s: features have dim %d but the global CMVN stats are "
                         "%d x %d" % (key, D, global_stats.shape[0], global_stats.shape[1]))
    W = opts.cmn_window
    xd = x.astype(np.float64)
    t = np.arange(T)
    n = (t + 1 - np.maximum(0, t - W + 1)).astype(np.float64)
    s1 = _window_sums(xd, W)
    s2 = _window_sums(xd * xd, W) if opts.norm_vars else None
    cur = n.copy()
    if speaker_stats is not None:
        sc = float(speaker_stats[0, D])
        if sc > 0:
            take = np.minimum(np.minimum(W - cur, opts.speaker_frames), sc)
            take = np.where(cur < W, np.maximum(take, 0.0), 0.0)
            f = take / sc
            s1 = s1 + f[:, None] * speaker_stats[0, :D]
            if s2 is not None:
                s2 = s2 + f[:, None] * speaker_stats[1, :D]
            cur = cur + f * sc
    gc = float(global_stats[0, D])
    take = np.where(cur < W, np.maximum(np.minimum(W - cur, opts.global_frames), 0.0), 0.0)
    f = take / gc
    s1 = s1 + f[:, None] * global_stats[0, :D]
    if s2 is not None:
        s2 = s2 + f[:, None] * global_stats[1, :D]
    cur = cur + f * gc
    out = x.copy()
    if opts.norm_means:
        skip = [d for d in opts.skip_dims]
        for d in skip:
            if not 0 <= d < D:
                raise ValueError("--skip-dims: dimension %d out of range (dim %d)" % (d, D))
        if not opts.norm_vars:
            # Kaldi: offset.AddVec(-1.0 / count, sums): the scale is rounded to float
            alpha = (-1.0 / cur).astype(np.float32).astype(np.float64)
            offset = (alpha[:, None] * s1).astype(np.float32)
            if skip:
                offset[:, skip] = 0.0
            out = (x + offset).astype(np.float32)
        else:
            mean = s1 / cur[:, None]
            var = s2 / cur[:, None] - mean * mean
            var = np.maximum(var, 1.0e-20)
            scale = 1.0 / np.sqrt(var)
            off = -(mean * scale)
            if skip:
                scale[:, skip] = 1.0
                off[:, skip] = 0.0
            out = (x * scale.astype(np.float32) + off.astype(np.float32)).astype(np.float32)
    new_spk = np.zeros((2, D + 1), np.float64) if speaker_stats is None \
        else np.array(speaker_stats, dtype=np.float64, copy=True)
    new_spk[0, :D] += xd.sum(axis=0)
    new_spk[1, :D] += (xd * xd).sum(axis=0)
    new_spk[0, D] += T
    return out, new_spk


def apply_online_cmvn_table(feats: Mapping[str, np.ndarray], spk2utt: Iterable[Tuple[str, List[str]]],
                            global_stats: np.ndarray,
                            opts: Optional[OnlineCmvnOptions] = None,
                            missing: Optional[List[str]] = None
                            ) -> Iterator[Tuple[str, np.ndarray]]:
    """``apply-cmvn-online --spk2utt``: every speaker's utterances in its spk2utt order,
    each one backed off to the speaker's earlier ones.

    Args:
      feats: key -> raw features (e.g. a
        :class:`pkwrap.kaldi.table.RandomAccessTableReader` or a dict).
      spk2utt: ``(speaker, [utt, ...])`` in order.
      global_stats, opts: as in :func:`apply_online_cmvn`.
      missing: utterances of spk2utt with no features are appended here (Kaldi warns
        and skips them: they do not count for the speaker).
    Yields:
      ``(utt, normalized features)``.
    """
    for spk, utts in spk2utt:
        state = None
        for u in utts:
            if u not in feats:
                if missing is not None:
                    missing.append(u)
                continue
            out, state = apply_online_cmvn(feats[u], global_stats, opts, state, key=u)
            yield u, out


def read_spk2utt(path, text: Optional[str] = None) -> List[Tuple[str, List[str]]]:
    """``spk2utt`` lines ``spk utt1 utt2 ...`` in file order (one-line errors naming
    ``path``); ``text``: its content, when already read (e.g. from an rspecifier)."""
    from .io import read_text
    p = os.fspath(path)
    out = []
    for i, line in enumerate((read_text(p) if text is None else text).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise ValueError("%s:%d: speaker %s has no utterances" % (p, i, parts[0]))
        out.append((parts[0], parts[1:]))
    return out


def read_utt2spk(path) -> Dict[str, str]:
    """``utt2spk`` lines ``utt spk`` (insertion order kept)."""
    from .io import read_text
    p = os.fspath(path)
    out: Dict[str, str] = {}
    for i, line in enumerate(read_text(p).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError("%s:%d: expected 'utt speaker', got %r" % (p, i, line.strip()))
        out[parts[0]] = parts[1]
    return out


def apply_cmvn(feats: np.ndarray, stats: np.ndarray, norm_means: bool = True,
               norm_vars: bool = False, key: str = "<utt>") -> np.ndarray:
    """Kaldi's offline ``apply-cmvn`` for one utterance (``ApplyCmvn``): the speaker's
    stats ``[2][D+1]`` (from ``cmvn.scp``) give the mean (and variance) to remove.

    Args:
      feats: float32 ``[T][D]``.
      stats: float64 ``[2][D+1]`` (sums, sums of squares, count in the last column).
      norm_means, norm_vars: ``--norm-means`` (default true), ``--norm-vars`` (false).
      key: the utterance, for error messages.
    """
    x = np.asarray(feats, dtype=np.float32)
    if not norm_means:
        if norm_vars:
            raise ValueError("--norm-vars=true needs --norm-means=true")
        return x.copy()
    stats = np.asarray(stats, dtype=np.float64)
    D = x.shape[1]
    if stats.ndim != 2 or stats.shape[1] != D + 1 or stats.shape[0] not in (1, 2):
        raise ValueError("utterance %s: CMVN stats of shape %s do not fit features of dim %d"
                         % (key, stats.shape, D))
    count = float(stats[0, D])
    if count < 1.0:
        raise ValueError("utterance %s: insufficient CMVN stats (count %g)" % (key, count))
    if not norm_vars:
        alpha = np.float64(np.float32(-1.0 / count))
        return (x + (alpha * stats[0, :D]).astype(np.float32)).astype(np.float32)
    if stats.shape[0] < 2:
        raise ValueError("utterance %s: --norm-vars=true but the stats have no variance row"
                         % key)
    mean = stats[0, :D] / count
    var = np.maximum(stats[1, :D] / count - mean * mean, 1.0e-20)
    scale = 1.0 / np.sqrt(var)
    off = -(mean * scale)
    return (x * scale.astype(np.float32) + off.astype(np.float32)).astype(np.float32)


def parse_offline_cmvn_opts(opts: str) -> Tuple[bool, bool]:
    """``--norm-means`` / ``--norm-vars`` of an ``apply-cmvn`` option string (train.py's
    ``--feat.cmvn-opts`` without online CMVN); other options are refused."""
    nm, nv = True, False
    for it in shlex.split(opts or ""):
        if "=" not in it or not it.startswith("--"):
            raise ValueError("apply-cmvn options: expected --name=value, got %r" % it)
        k, v = it[2:].split("=", 1)
        if k == "norm-means":
            nm = _bool(v, k)
        elif k == "norm-vars":
            nv = _bool(v, k)
        else:
            raise ValueError("apply-cmvn option --%s is not supported (only --norm-means, "
                             "--norm-vars)" % k)
    if nv and not nm:
        raise ValueError("--norm-vars=true needs --norm-means=true")
    return nm, nv


def format_text_matrix(m: np.ndarray) -> str:
    """A double matrix as Kaldi writes it in text form (``matrix-sum --binary=false``)."""
    from .io import format_float
    lines = [" ["]
    for i, row in enumerate(np.asarray(m, dtype=np.float64)):
        body = " ".join(format_float(float(v)) for v in row)
        lines.append("  " + body + (" ]" if i == len(m) - 1 else " "))
    return "\n".join(lines) + "\n"
