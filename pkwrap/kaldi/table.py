"""Kaldi tables: archives (``ark``), script files (``scp``), rspecifiers and wspecifiers.

An *archive* is a concatenation of ``key<space>object``: a binary object starts with the
header ``"\\0B"``, a text one does not. A *script file* has lines ``key rxfilename``
where ``rxfilename`` is a file, ``file.ark:offset`` (the byte where the object, i.e.
its ``"\\0B"``, starts), ``-`` (stdin) or ``command |``.

Specifiers accepted (``src/util/kaldi-table.h``)::

    rspecifier   ark:file | ark,t:file | ark,s,cs,p,...:file | scp:file.scp | ark:- |
                 ark:command|  | a plain path (``*.scp`` is read as a script, else an archive)
    wspecifier   ark:file | ark,t:file | ark,scp:a.ark,a.scp | scp,ark:a.scp,a.ark |
                 ark:- | ark:| command  (binary unless ``t``)

Readers: :class:`SequentialTableReader` (a generator of ``(key, object)``) and
:class:`RandomAccessTableReader` (``reader[key]``; scp offsets or an index of an
archive). :class:`TableWriter` writes archives (and their scp). What an object is comes
from a *holder*: a ``read(reader) -> obj`` / ``write(writer, obj)`` pair; the ones
for basic Kaldi types are in :data:`HOLDERS`. Errors name the file, the key and the
byte offset.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Tuple

import numpy as np


from .io import AtomicFile, KaldiFormatError, KaldiReader, KaldiWriter, format_float
from .matrix import read_matrix, read_vector, write_matrix, write_vector

__all__ = ["parse_rspecifier", "parse_wspecifier", "RSpecifier", "WSpecifier",
           "SequentialTableReader", "RandomAccessTableReader", "TableWriter", "Holder",
           "HOLDERS", "read_table", "open_input_buffer", "read_archive_entry",
           "read_archive_file"]

_R_OPTS = {"t", "b", "o", "no", "s", "ns", "cs", "ncs", "p", "np", "bg"}
_W_OPTS = {"t", "b", "f", "nf", "p", "np"}


@dataclass(frozen=True)
class RSpecifier:
    """A parsed rspecifier: ``kind`` "ark" or "scp", ``path`` (file, "-" or "cmd |")
    and the option letters."""
    kind: str
    path: str
    opts: FrozenSet[str]

    @property
    def permissive(self) -> bool:
        return "p" in self.opts


@dataclass(frozen=True)
class WSpecifier:
    """A parsed wspecifier: archive path (or None), script path (or None), binary."""
    ark: Optional[str]
    scp: Optional[str]
    binary: bool
    flush: bool = False


def parse_rspecifier(spec: str) -> RSpecifier:
    """Parse ``ark,s,cs:path`` / ``scp:path`` / a plain path."""
    spec = str(spec)
    head, sep, rest = spec.partition(":")
    parts = head.split(",") if sep else []
    if sep and ("ark" in parts or "scp" in parts) and all(
            p in _R_OPTS or p in ("ark", "scp") for p in parts):
        kinds = [p for p in parts if p in ("ark", "scp")]
        if len(kinds) != 1:
            raise ValueError("rspecifier %r: exactly one of ark/scp is needed" % spec)
        if not rest:
            raise ValueError("rspecifier %r: empty file name" % spec)
        return RSpecifier(kinds[0], rest, frozenset(p for p in parts if p in _R_OPTS))
    if sep and ("ark" in parts or "scp" in parts):
        bad = [p for p in parts if p not in _R_OPTS and p not in ("ark", "scp")]
        raise ValueError("rspecifier %r: unknown option(s) %s" % (spec, ",".join(bad)))
    if not spec:
        raise ValueError("empty rspecifier")
    return RSpecifier("scp" if spec.endswith(".scp") else "ark", spec, frozenset())


def parse_wspecifier(spec: str) -> WSpecifier:
    """Parse ``ark:f`` / ``ark,t:f`` / ``ark,scp:a.ark,a.scp`` / ``scp,ark:a.scp,a.ark``."""
    spec = str(spec)
    head, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError("wspecifier %r: expected ark:..., ark,t:... or ark,scp:a.ark,a.scp"
                         % spec)
    parts = head.split(",")
    kinds = [p for p in parts if p in ("ark", "scp")]
    bad = [p for p in parts if p not in _W_OPTS and p not in ("ark", "scp")]
    if bad or not kinds:
        raise ValueError("wspecifier %r: unknown option(s) %s" % (spec, ",".join(bad) or head))
    binary = "t" not in parts
    flush = "f" in parts
    if not rest.strip():
        raise ValueError("wspecifier %r: empty file name" % spec)
    if kinds == ["ark"]:
        return WSpecifier(rest, None, binary, flush)
    if kinds == ["scp"]:
        raise ValueError("wspecifier %r: writing only a script file is not supported "
                         "(use ark,scp:a.ark,a.scp)" % spec)
    names = rest.split(",")
    if len(names) != 2 or not all(names):
        raise ValueError("wspecifier %r: ark,scp needs two file names 'a.ark,a.scp'" % spec)
    ark, scp = (names if kinds[0] == "ark" else names[::-1])
    return WSpecifier(ark, scp, binary, flush)


# ----------------------------------------------------------------------------- input
def open_input_buffer(rxfilename: str):
    """The whole of a Kaldi rxfilename as a buffer: a read-only ``mmap`` for regular
    files (zero copy), ``bytes`` for ``-`` (stdin) and ``command |`` pipes."""
    rx = str(rxfilename)
    if rx == "-" or rx == "":
        return sys.stdin.buffer.read()
    if rx.rstrip().endswith("|"):
        cmd = rx.rstrip()[:-1]
        p = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE)
        if p.returncode != 0:
            raise OSError("command %r failed with exit status %d" % (cmd, p.returncode))
        return p.stdout
    with open(rx, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _split_offset(rx: str) -> Tuple[str, Optional[int]]:
    """``file.ark:1234`` -> (``file.ark``, 1234); other rxfilenames -> (rx, None)."""
    rx = rx.strip()
    if rx.endswith("]"):
        raise ValueError("%r: row/column ranges in scp entries are not supported" % rx)
    if rx.endswith("|"):
        return rx, None
    head, sep, tail = rx.rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return rx, None


class Holder:
    """How to read and write one kind of table object.

    Args:
      read: ``read(reader) -> obj``, the reader positioned after the binary header
        (``reader.binary`` tells the mode, ``reader.key`` the key).
      write: ``write(writer, obj)``.
      text_newline: the object ends with a newline in text mode (Kaldi's BasicHolder
        and token holders); the reader then checks and eats it.
      binary_header: binary objects start with ``"\\0B"`` (False for FST archives,
        whose binary objects start with OpenFst's magic number; ``read`` then gets the
        reader with ``binary`` False and tells the mode itself).
    """

    def __init__(self, read: Callable, write: Optional[Callable] = None,
                 text_newline: bool = False, binary_header: bool = True):
        self.read = read
        self.write = write
        self.text_newline = text_newline
        self.binary_header = binary_header


def _read_basic_text_eol(r: KaldiReader, value):
    buf = r.buf
    while r.pos < r.end and buf[r.pos] in b" \t\r":
        r.pos += 1
    if r.pos < r.end:
        if buf[r.pos] != 10:
            raise r.error("expected end of line after the value")
        r.pos += 1
    return value


def _w_float(w: KaldiWriter, v):
    if w.binary:
        w.write_float(v)
    else:
        w.write(format_float(v).encode() + b"\n")


def _w_int(w: KaldiWriter, v):
    if w.binary:
        w.write_int32(v)
    else:
        w.write(b"%d\n" % int(v))


def _w_token(w: KaldiWriter, v):
    w.write_token(v)
    if not w.binary:
        w.write(b"\n")


def _r_token(r: KaldiReader):
    return r.read_token() if r.binary else _read_basic_text_eol(r, r._word())


HOLDERS: Dict[str, Holder] = {
    "matrix": Holder(read_matrix, write_matrix),
    "vector": Holder(read_vector, write_vector),
    "float": Holder(lambda r: r.read_float() if r.binary
                    else _read_basic_text_eol(r, r.read_float()), _w_float),
    "int32": Holder(lambda r: r.read_int32() if r.binary
                    else _read_basic_text_eol(r, r.read_int32()), _w_int),
    "token": Holder(_r_token, _w_token),
    "int32_vector": Holder(lambda r: r.read_int_vector(),
                           lambda w, v: w.write_int_vector(v)),
}


def _holder(h) -> Holder:
    if isinstance(h, Holder):
        return h
    if isinstance(h, str):
        if h not in HOLDERS:
            raise ValueError("unknown holder %r (one of %s)" % (h, ", ".join(HOLDERS)))
        return HOLDERS[h]
    raise TypeError("holder must be a Holder or one of %s" % ", ".join(HOLDERS))


def _read_object(buf, pos: int, name: str, key: str, holder: Holder):
    """Read one object at ``pos`` (binary header detected); returns (obj, end_pos)."""
    r = KaldiReader(buf, pos, name=name, key=key)
    if not holder.binary_header:
        r.binary = False
    elif r.pos < r.end and buf[r.pos] == 0:
        if r.pos + 1 >= r.end or buf[r.pos + 1] != 66:
            raise r.error("bad binary header (\\0 not followed by 'B')")
        r.pos += 2
        r.binary = True
    else:
        r.binary = False
    if r.at_eof():
        raise r.error("truncated archive: no object after the key")
    try:
        obj = holder.read(r)
    except KaldiFormatError:
        raise
    except (ValueError, IndexError, OverflowError) as e:
        raise r.error("corrupt object (%s)" % e)
    return obj, r.pos


def read_archive_entry(buf, pos: int, name: str, holder) -> Tuple[Optional[str], int, object, int]:
    """The archive entry (``key<space>object``) at or after ``pos`` (whitespace skipped).

    Args:
      buf: the archive's bytes (``bytes`` or ``mmap``).
      pos: byte offset where an entry (or whitespace before it) starts.
      name: file name for error messages.
      holder: a :class:`Holder` or the name of one.
    Returns:
      ``(key, object_offset, object, end)``: ``end`` is where the next entry may start;
      ``key`` is None (and the rest 0/None/pos) when only whitespace is left.
    Raises:
      KaldiFormatError: naming the file, key and byte offset.
    """
    holder = _holder(holder)
    r = KaldiReader(buf, pos, name=name)
    n = len(buf)
    r.skip_ws()
    if r.pos >= n:
        return None, 0, None, r.pos
    kstart = r.pos
    p = kstart
    while p < n and buf[p] not in b" \t\n\r\v\f\0":
        p += 1
    key = bytes(buf[kstart:p]).decode("utf-8", errors="replace")
    if p >= n:
        raise KaldiFormatError("%s: truncated archive: key %r at byte %d has no object"
                               % (name, key, kstart))
    if buf[p] not in b" \t\n":
        raise KaldiFormatError("%s: invalid archive: expected a space after key %r at "
                               "byte %d" % (name, key, p))
    if buf[p] != 10:
        p += 1
    obj, end = _read_object(buf, p, name, key, holder)
    return key, p, obj, end


def read_archive_file(path, holder) -> Iterator[Tuple[str, Any]]:
    """``(key, object)`` of the archive in the file ``path``, gzipped (``.gz``, as Kaldi
    dirs keep ``ali.N.gz`` and ``lat.N.gz``) or not. Decompression runs in this process
    (no ``gunzip`` pipe): a damaged file gives one error naming it."""
    import gzip
    from pkwrap.cli import FileError, file_error
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise file_error(p, e) from e
    if p.endswith(".gz") or data[:2] == b"\x1f\x8b":
        if not data:  # gzip.decompress(b"") is b"": gunzip would fail
            raise FileError(p, "empty file (not gzip data)")
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, ValueError, gzip.BadGzipFile) as e:
            raise FileError(p, "cannot decompress (%s)" % e) from None
    return _iter_archive(data, p, _holder(holder))


def _iter_archive(buf, name: str, holder: Holder, start: int = 0,
                  with_offsets: bool = False):
    """Yield ``(key, obj)`` (or ``(key, obj_offset, obj)``) from an archive buffer."""
    pos = start
    while True:
        key, p, obj, pos = read_archive_entry(buf, pos, name, holder)
        if key is None:
            return
        yield (key, p, obj) if with_offsets else (key, obj)


def _read_scp(path: str) -> List[Tuple[str, str]]:
    buf = open_input_buffer(path)
    text = bytes(buf).decode("utf-8", errors="replace")
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        f = line.strip().split(None, 1)
        if len(f) != 2:
            raise KaldiFormatError("%s:%d: bad script-file line %r (want 'key rxfilename')"
                                   % (path, lineno, line[:80]))
        out.append((f[0], f[1]))
    return out


class _BufferCache:
    """Open archives mapped once per reader (scp files usually point into few arks)."""

    def __init__(self):
        self._bufs: Dict[str, object] = {}

    def get(self, path: str):
        if path not in self._bufs:
            if len(self._bufs) > 64:
                self._bufs.clear()
            self._bufs[path] = open_input_buffer(path)
        return self._bufs[path]


def _read_scp_entry(cache: _BufferCache, key: str, rx: str, holder: Holder,
                    scp_name: str):
    path, offset = _split_offset(rx)
    try:
        buf = cache.get(path)
    except OSError as e:
        raise KaldiFormatError("%s: key %r: cannot open %r (%s)" % (scp_name, key, path, e))
    if offset is not None and offset >= len(buf):
        raise KaldiFormatError("%s: key %r: offset %d is past the end of %s (%d bytes)"
                               % (scp_name, key, offset, path, len(buf)))
    obj, _ = _read_object(buf, offset or 0, path, key, holder)
    return obj


class SequentialTableReader:
    """Iterate over ``(key, object)`` of an rspecifier.

    Args:
      rspecifier: see the module docstring.
      holder: a :class:`Holder` or the name of one in :data:`HOLDERS`.

    Example::

        for key, mat in SequentialTableReader("scp:feats.scp", "matrix"):
            ...
    """

    def __init__(self, rspecifier: str, holder="matrix"):
        self.spec = parse_rspecifier(rspecifier)
        self.holder = _holder(holder)

    def __iter__(self) -> Iterator[Tuple[str, object]]:
        spec = self.spec
        if spec.kind == "ark":
            buf = open_input_buffer(spec.path)
            try:
                yield from _iter_archive(buf, spec.path, self.holder)
            except KaldiFormatError as e:
                if not spec.permissive:
                    raise
                # 'p': Kaldi ends the archive quietly; we still say why.
                warnings.warn("permissive read of %s stopped: %s" % (spec.path, e))
            return
        cache = _BufferCache()
        for key, rx in _read_scp(spec.path):
            try:
                obj = _read_scp_entry(cache, key, rx, self.holder, spec.path)
            except KaldiFormatError as e:
                if spec.permissive:  # 'p': Kaldi skips unreadable entries
                    warnings.warn("permissive read: skipping %s" % e)
                    continue
                raise
            yield key, obj

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class RandomAccessTableReader:
    """``reader[key]`` over an rspecifier: scp entries are read at their offsets; an
    archive is indexed once (key -> byte offset) and objects are read on demand.

    Args:
      rspecifier: see the module docstring.
      holder: a :class:`Holder` or the name of one in :data:`HOLDERS`.
    """

    def __init__(self, rspecifier: str, holder="matrix"):
        self.spec = parse_rspecifier(rspecifier)
        self.holder = _holder(holder)
        self._cache = _BufferCache()
        self._index: Dict[str, Tuple[str, Optional[int]]] = {}
        if self.spec.kind == "scp":
            for key, rx in _read_scp(self.spec.path):
                self._index[key] = _split_offset(rx)
        else:
            buf = self._cache.get(self.spec.path)
            for key, off, _ in _iter_archive(buf, self.spec.path, self.holder,
                                             with_offsets=True):
                self._index[key] = (self.spec.path, off)

    def keys(self):
        return self._index.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, key: str):
        if key not in self._index:
            raise KeyError("%s: no key %r" % (self.spec.path, key))
        path, off = self._index[key]
        rx = path if off is None else "%s:%d" % (path, off)
        return _read_scp_entry(self._cache, key, rx, self.holder, self.spec.path)

    def get(self, key: str, default=None):
        return self[key] if key in self._index else default

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TableWriter:
    """Write ``(key, object)`` pairs to a wspecifier (context manager).

    Files appear complete or not at all: the archive (and its scp) are written to
    temporary names and renamed by :meth:`close`; an exception inside the ``with`` block
    (or :meth:`abort`) removes them (:class:`~pkwrap.kaldi.io.AtomicFile`). For
    ``ark:| cmd`` a failing command is reported with its exit status.

    Args:
      wspecifier: ``ark:f``, ``ark,t:f``, ``ark,scp:a.ark,a.scp``, ``ark:-``, ``ark:| cmd``.
      holder: a :class:`Holder` or the name of one in :data:`HOLDERS`.
    """

    def __init__(self, wspecifier: str, holder="matrix"):
        self.spec = parse_wspecifier(wspecifier)
        self.holder = _holder(holder)
        if self.holder.write is None:
            raise ValueError("holder has no writer")
        self._proc = None
        self._scp = None
        self.closed = True
        ark = self.spec.ark
        if self.spec.scp is not None and (ark == "-" or ark.lstrip().startswith("|")):
            raise ValueError("wspecifier %r: ark,scp needs the archive to be a file "
                             "(for the offsets)" % wspecifier)
        if ark.lstrip().startswith("|"):
            self._cmd = ark.lstrip()[1:].strip()
            self._proc = subprocess.Popen(self._cmd, shell=True, stdin=subprocess.PIPE)
            self._f = self._proc.stdin
        else:
            self._f = AtomicFile(ark)
        if self.spec.scp is not None:
            try:
                self._scp = AtomicFile(self.spec.scp, "w")
            except BaseException:
                self._f.discard()
                raise
        self._pos = 0
        self._w = KaldiWriter(self, self.spec.binary)
        self.closed = False

    # KaldiWriter writes through us so we can count bytes for scp offsets.
    def write(self, b: bytes) -> None:
        try:
            self._f.write(b)
        except BrokenPipeError:
            self._pipe_failed()
            raise
        self._pos += len(b)

    def __setitem__(self, key: str, obj) -> None:
        self.write_item(key, obj)

    def write_item(self, key: str, obj) -> None:
        if self.closed:
            raise ValueError("TableWriter is closed")
        if not key or any(c.isspace() for c in key):
            raise ValueError("invalid table key %r (empty or contains whitespace)" % key)
        self.write(key.encode("utf-8") + b" ")
        if self._scp is not None:
            self._scp.write("%s %s:%d\n" % (key, self.spec.ark, self._pos))
        if self.holder.binary_header:
            self._w.write_header()
        self.holder.write(self._w, obj)
        if self.spec.flush:
            self._f.flush()

    def _pipe_failed(self):
        rc = self._proc.wait()
        raise OSError("output command %r failed with exit status %d" % (self._cmd, rc))

    def close(self) -> None:
        """Finish: the files get their final names (a pipe's command must succeed)."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._proc is not None:
                try:
                    self._f.close()
                except BrokenPipeError:
                    pass
                if self._proc.wait() != 0:
                    raise OSError("output command %r failed with exit status %d"
                                  % (self._cmd, self._proc.returncode))
            else:
                self._f.commit()
            if self._scp is not None:
                self._scp.commit()
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self._proc.wait()
        else:
            self._f.discard()
        if self._scp is not None:
            self._scp.discard()

    def abort(self) -> None:
        """Give up: nothing is left under the output names."""
        if not self.closed:
            self.closed = True
            self._discard()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.close()
        else:
            self.abort()
        return False


def read_table(rspecifier: str, holder="matrix") -> Dict[str, object]:
    """All of a table as an ordered dict ``key -> object``."""
    return dict(SequentialTableReader(rspecifier, holder))
