"""Kaldi's basic serialization: binary header, tokens, basic types, integer vectors.

Every Kaldi object is written either in *binary* or in *text* mode. A binary object in
an archive or file is preceded by the two-byte header ``"\\0B"``; text has no header.
The pieces, as ``src/base/io-funcs.{h,cc}`` writes them (all little-endian)::

    token          "<Tok> "              both modes: the characters, then one space
    int32   (bin)  0x04 + 4 bytes        a size byte (sizeof, negated for unsigned types)
    uint32  (bin)  0xFC + 4 bytes        (e.g. the size of an EventMap table)
    float   (bin)  0x04 + 4 bytes        (0x08 + 8 bytes for double; either is accepted)
    bool    (bin)  "T" | "F"             (text: "T " | "F ")
    int32 vector   0x04 + int32 n + n*4 bytes     (text: "[ 1 2 3 ]\\n")
    numbers (text) printed with 7 significant digits, followed by a space

:class:`KaldiReader` parses these from an in-memory buffer (``bytes`` or an ``mmap``)
at a byte position, so a reader over an archive can jump to ``scp`` offsets without
copying. Every error is a :class:`KaldiFormatError` naming the file, the archive key
when known, the byte position and what was expected. :class:`KaldiWriter` writes the
same pieces to a binary stream.
"""
from __future__ import annotations

import contextlib
import glob
import io as _io
import math
import os
import stat
import struct
from typing import BinaryIO, Callable, Iterator, List, Optional, Sequence

import numpy as np

__all__ = ["KaldiFormatError", "KaldiReader", "KaldiWriter", "BINARY_HEADER",
           "format_float", "AtomicFile", "atomic_output", "atomic_outputs", "read_text",
           "check_size"]

BINARY_HEADER = b"\0B"
_WS = frozenset(b" \t\n\r\v\f")

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")


class KaldiFormatError(ValueError):
    """Bytes that are not what the Kaldi format says. The message names the file, the
    archive key (when known), the byte offset and what was wrong."""


def format_float(x: float, precision: int = 7) -> str:
    """A number as Kaldi prints it in text mode (C++ ostream ``<<`` with the given
    precision: 7 for Kaldi's writers, 6 for the stream default)."""
    x = float(x)
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return "%.*g" % (precision, x)


def _reading(what: Optional[str]) -> str:
    return "" if what is None else " while reading %s" % what


class KaldiReader:
    """A cursor over a buffer holding Kaldi-format data.

    Args:
      buf: ``bytes``, ``bytearray``, ``memoryview`` or ``mmap`` with the data.
      pos: byte offset to start at.
      binary: parse binary (True) or text (False) form; :meth:`read_header` sets it.
      name: file name used in error messages.
      key: archive key of the object being read (used in error messages).
    """

    __slots__ = ("buf", "pos", "binary", "name", "key", "end")

    def __init__(self, buf, pos: int = 0, binary: bool = True, name: str = "<buffer>",
                 key: Optional[str] = None, end: Optional[int] = None):
        self.buf = buf
        self.pos = pos
        self.binary = binary
        self.name = name
        self.key = key
        self.end = len(buf) if end is None else end

    # ------------------------------------------------------------------ errors
    def error(self, msg: str, pos: Optional[int] = None) -> KaldiFormatError:
        where = self.name
        if self.key is not None:
            where += ", key %r" % self.key
        return KaldiFormatError("%s: %s (at byte %d)"
                                % (where, msg, self.pos if pos is None else pos))

    # ------------------------------------------------------------------ raw access
    def at_eof(self) -> bool:
        return self.pos >= self.end

    def peek(self) -> int:
        """Next byte as an int, -1 at the end."""
        return self.buf[self.pos] if self.pos < self.end else -1

    def take(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes (raises if fewer are left)."""
        if n < 0 or self.pos + n > self.end:
            raise self.error("truncated data: wanted %d bytes for %s, %d left"
                             % (n, what, self.end - self.pos))
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(b)

    def take_array(self, dtype, count: int, what: str) -> np.ndarray:
        """``count`` items of ``dtype`` (little-endian) as a new numpy array."""
        dt = np.dtype(dtype)
        nbytes = dt.itemsize * count
        if count < 0 or self.pos + nbytes > self.end:
            raise self.error("truncated data: wanted %d bytes for %s, %d left"
                             % (nbytes, what, self.end - self.pos))
        a = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
        self.pos += nbytes
        return a

    def skip_ws(self) -> None:
        buf, p, e = self.buf, self.pos, self.end
        while p < e and buf[p] in _WS:
            p += 1
        self.pos = p

    def _word(self, what: Optional[str] = None) -> str:
        """Skip whitespace, then read up to the next whitespace (not consumed)."""
        self.skip_ws()
        buf, p, e = self.buf, self.pos, self.end
        start = p
        while p < e and buf[p] not in _WS:
            p += 1
        if p == start:
            raise self.error(("unexpected end of data" if p >= e else "expected a word")
                             + _reading(what))
        self.pos = p
        return bytes(buf[start:p]).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ header
    def read_header(self) -> bool:
        """Detect Kaldi's binary header "\\0B" at the cursor: consume it and set
        ``binary``. Returns the mode."""
        if self.pos + 2 <= self.end and self.buf[self.pos] == 0 and self.buf[self.pos + 1] == 66:
            self.pos += 2
            self.binary = True
        else:
            self.binary = False
        return self.binary

    # ------------------------------------------------------------------ tokens
    def read_token(self) -> str:
        """ReadToken: a whitespace-free word that must be followed by one whitespace
        character, which is consumed."""
        tok = self._word()
        if self.pos >= self.end:
            raise self.error("truncated data after token %r" % tok)
        self.pos += 1
        return tok

    def expect_token(self, token: str) -> None:
        start = self.pos
        try:
            got = self.read_token()
        except KaldiFormatError:
            raise self.error("expected token %r, found end of data" % token, start)
        if got != token and not (token[0] == "<" and got == token[1:]):
            raise self.error("expected token %r, got %r" % (token, got[:40]), start)

    def peek_char(self) -> int:
        """Peek(): in text mode skips whitespace first."""
        if not self.binary:
            self.skip_ws()
        return self.peek()

    def peek_token(self) -> int:
        """PeekToken(): the first character of the next token after a '<' (text mode
        skips whitespace first)."""
        if not self.binary:
            self.skip_ws()
        p = self.pos
        if p < self.end and self.buf[p] == 60:  # '<'
            p += 1
        return self.buf[p] if p < self.end else -1

    # ------------------------------------------------------------------ basic types
    # ``what`` (optional) names the field being read in error messages.
    def read_int32(self, what: Optional[str] = None) -> int:
        return self._read_int(True, what)

    def read_uint32(self, what: Optional[str] = None) -> int:
        """ReadBasicType<uint32>: binary size byte -4 (0xFC)."""
        return self._read_int(False, what)

    def _read_int(self, signed: bool, what: Optional[str]) -> int:
        kind = "int32" if signed else "uint32"
        if self.binary:
            start = self.pos
            b = self.take(5, what or kind)
            size = 4 if signed else 0xFC
            if b[0] != size:
                raise self.error("expected %s (size byte %d), got size byte %d%s"
                                 % (kind, size if signed else -4, b[0], _reading(what)),
                                 start)
            return (_I32 if signed else _U32).unpack_from(b, 1)[0]
        w = self._word(what)
        try:
            v = int(w)
        except ValueError:
            raise self.error("expected an integer, got %r%s" % (w[:40], _reading(what)))
        lo, hi = (-2 ** 31, 2 ** 31) if signed else (0, 2 ** 32)
        if not lo <= v < hi:
            raise self.error("integer %d out of %s range%s" % (v, kind, _reading(what)))
        return v

    def read_float(self, what: Optional[str] = None) -> float:
        """ReadBasicType<float>/<double>: binary accepts a 4- or 8-byte float."""
        if self.binary:
            start = self.pos
            c = self.peek()
            if c == 4:
                return _F32.unpack(self.take(5, what or "float")[1:])[0]
            if c == 8:
                return _F64.unpack(self.take(9, what or "double")[1:])[0]
            raise self.error("expected a float (size byte 4 or 8), got %s%s"
                             % ("end of data" if c < 0 else "byte %d" % c, _reading(what)),
                             start)
        w = self._word(what)
        try:
            return float(w)
        except ValueError:
            raise self.error("expected a number, got %r%s" % (w[:40], _reading(what)))

    def read_bool(self) -> bool:
        if not self.binary:
            self.skip_ws()
        c = self.peek()
        if c == 84:  # 'T'
            self.pos += 1
            return True
        if c == 70:  # 'F'
            self.pos += 1
            return False
        raise self.error("expected a bool ('T' or 'F'), got %s"
                         % ("end of data" if c < 0 else repr(chr(c))))

    def read_int_vector(self, dtype=np.int32, what: Optional[str] = None) -> np.ndarray:
        """ReadIntegerVector (int32 by default)."""
        dt = np.dtype(dtype)
        what_ = what or "integer vector"
        if self.binary:
            start = self.pos
            sz = self.take(1, what_)[0]
            if sz != dt.itemsize:
                raise self.error("expected integer vector of %d-byte elements, got %d%s"
                                 % (dt.itemsize, sz, _reading(what)), start)
            n = _I32.unpack(self.take(4, what_ + " size"))[0]
            if n < 0:
                raise self.error("negative integer vector size %d%s" % (n, _reading(what)),
                                 start)
            return self.take_array(dt.newbyteorder("<"), n, what_).astype(dt)
        self.skip_ws()
        if self.peek() != 91:  # '['
            raise self.error("expected '[' to start an integer vector" + _reading(what))
        self.pos += 1
        vals = []
        while True:
            self.skip_ws()
            if self.peek() == 93:  # ']'
                self.pos += 1
                break
            w = self._word(what)
            try:
                vals.append(int(w))
            except ValueError:
                raise self.error("expected an integer in vector, got %r%s"
                                 % (w[:40], _reading(what)))
        return np.array(vals, dtype=dt)


class KaldiWriter:
    """Writes Kaldi's basic pieces to a binary stream in binary or text mode.

    Args:
      f: a binary file object (anything with ``write(bytes)``).
      binary: binary mode (True) or text mode (False).
    """

    __slots__ = ("f", "binary")

    def __init__(self, f: BinaryIO, binary: bool = True):
        self.f = f
        self.binary = binary

    def write(self, b: bytes) -> None:
        self.f.write(b)

    def write_header(self) -> None:
        """The binary header "\\0B" (nothing in text mode)."""
        if self.binary:
            self.f.write(BINARY_HEADER)

    def write_token(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise ValueError("invalid Kaldi token %r (empty or contains space)" % token)
        self.f.write(token.encode("utf-8") + b" ")

    def write_int32(self, v: int) -> None:
        v = int(v)
        if not -2 ** 31 <= v < 2 ** 31:
            raise ValueError("integer %d does not fit in int32" % v)
        if self.binary:
            self.f.write(b"\x04" + _I32.pack(v))
        else:
            self.f.write(b"%d " % v)

    def write_uint32(self, v: int) -> None:
        v = int(v)
        if not 0 <= v < 2 ** 32:
            raise ValueError("integer %d does not fit in uint32" % v)
        if self.binary:
            self.f.write(b"\xfc" + _U32.pack(v))
        else:
            self.f.write(b"%d " % v)

    def newline(self) -> None:
        """A line break in text mode (Kaldi's writers add them for readability); nothing
        in binary mode."""
        if not self.binary:
            self.f.write(b"\n")

    def write_float(self, v: float) -> None:
        if self.binary:
            self.f.write(b"\x04" + _F32.pack(v))
        else:
            self.f.write(format_float(v).encode() + b" ")

    def write_double(self, v: float) -> None:
        if self.binary:
            self.f.write(b"\x08" + _F64.pack(v))
        else:
            self.f.write(format_float(v).encode() + b" ")

    def write_bool(self, v: bool) -> None:
        self.f.write((b"T" if v else b"F") + (b"" if self.binary else b" "))

    def write_int_vector(self, v: Sequence[int], dtype=np.int32) -> None:
        dt = np.dtype(dtype)
        a = np.asarray(v)
        if self.binary:
            self.f.write(bytes([dt.itemsize]) + _I32.pack(len(a))
                         + a.astype(dt.newbyteorder("<")).tobytes())
        else:
            self.f.write(b"[ " + b"".join(b"%d " % int(x) for x in a) + b"]\n")


# ----------------------------------------------------------------------------- sizes
def check_size(count: int, item_bytes: int, remaining: int, what: str, where: str) -> int:
    """Check, before allocating, that ``count`` items of at least ``item_bytes`` bytes
    each can come from the ``remaining`` bytes of the input; returns ``count``.

    Every binary reader calls this with a size it read from a header, so one flipped bit
    gives an error naming the file (``where``) instead of a huge allocation."""
    if count < 0:
        raise KaldiFormatError("%s: negative %s %d" % (where, what, count))
    if count * item_bytes > remaining:
        raise KaldiFormatError("%s: %s %d needs at least %d bytes, only %d left "
                               "(truncated or corrupt)"
                               % (where, what, count, count * item_bytes, remaining))
    return count


# ----------------------------------------------------------------------------- text input
def read_text(path) -> str:
    """The whole of a text file (UTF-8); errors name the file
    (:class:`pkwrap.cli.FileError`)."""
    from pkwrap.cli import file_error
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise file_error(path, e) from e


def read_number_file(path, kind=int, minimum=None):
    """The number in a one-number file of a Kaldi dir (``num_jobs``, ``frame_shift``,
    ``ivector_period``, an egs dir's ``info/*``): the first token as ``kind`` (int or
    float). Errors name the file (:class:`pkwrap.cli.FileError`): unreadable, not UTF-8,
    empty, not a number, not finite, below ``minimum``."""
    from pkwrap.cli import FileError
    toks = read_text(path).split()
    if not toks:
        raise FileError(path, "empty (expected a number)")
    try:
        v = kind(toks[0])
    except ValueError:
        raise FileError(path, "expected %s number, got %r" % (
            "an integer" if kind is int else "a", toks[0][:40])) from None
    if kind is float and not math.isfinite(v):
        raise FileError(path, "expected a finite number, got %r" % toks[0][:40])
    if minimum is not None and v < minimum:
        raise FileError(path, "%s is less than %s" % (toks[0][:40], minimum))
    return v


# ----------------------------------------------------------------------------- output
# What this process is writing: AtomicFiles not yet committed or discarded, and the
# paths it committed. pkwrap.cli uses them so that a failed program leaves nothing.
_OPEN_OUTPUTS: "set[AtomicFile]" = set()  # strong: an abandoned one is still cleaned up
_COMMITTED: List[str] = []


def num_committed_outputs() -> int:
    """How many files this process has committed so far (a mark for
    :func:`remove_committed_outputs`)."""
    return len(_COMMITTED)


def remove_committed_outputs(since: int) -> None:
    """Remove the files committed after the mark ``since`` (a failed program leaves no
    output)."""
    for path in _COMMITTED[since:]:
        with contextlib.suppress(OSError):
            os.unlink(path)
    del _COMMITTED[since:]


def discard_open_outputs() -> None:
    """Discard every :class:`AtomicFile` still open (its temporary file is removed)."""
    for f in list(_OPEN_OUTPUTS):
        f.discard()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Remove ``<path>.tmp.<pid>`` files of writers that no longer run (a writer killed
    with SIGKILL cannot clean up after itself). Only temporaries of this very output,
    and only of processes that do not exist on this machine, are touched."""
    for t in glob.glob(glob.escape(path) + ".tmp.*"):
        pid = t.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(t)


class AtomicFile:
    """An output file that appears complete or not at all.

    The bytes go to ``<path>.tmp.<pid>`` in the same directory; :meth:`commit` renames
    it onto ``path`` (atomic on POSIX), :meth:`discard` removes it. Any error while
    opening, writing or committing is a :class:`pkwrap.cli.FileError` naming ``path``
    (e.g. ``exp/egs.ark: No space left on device``). ``-`` (stdout) and targets that are
    not regular files (``/dev/null``, a FIFO) are written directly.

    Args:
      path: the final name.
      mode: ``"wb"`` or ``"w"`` (UTF-8 text).
      fsync: fsync the file and the directory on commit (checkpoints).
    """

    def __init__(self, path, mode: str = "wb", fsync: bool = False):
        from pkwrap.cli import FileError, file_error
        if mode not in ("wb", "w"):
            raise ValueError("AtomicFile: mode must be 'wb' or 'w', got %r" % mode)
        self.path = os.fspath(path)
        self.fsync = fsync
        self.closed = False
        self.tmp: Optional[str] = None
        self._own = True
        self.direct = True  # written in place (stdout, a device): nothing to rename
        if self.path == "-":
            self._raw = sys_stdout_buffer()
            self._own = False
        else:
            try:
                st = os.stat(self.path)
                direct = not stat.S_ISREG(st.st_mode)
            except FileNotFoundError:
                direct = False
            except OSError as e:
                raise file_error(self.path, e) from e
            if os.path.isdir(self.path):
                raise FileError(self.path, "is a directory")
            try:
                if direct:
                    self._raw = open(self.path, "wb")
                else:
                    self.direct = False
                    remove_stale_temporaries(self.path)
                    self.tmp = "%s.tmp.%d" % (self.path, os.getpid())
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.tmp)
                    fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                    self._raw = os.fdopen(fd, "wb")
                    _OPEN_OUTPUTS.add(self)
            except OSError as e:
                self.tmp = None
                raise file_error(self.path, e) from e
        self._text = mode == "w"

    def write(self, b) -> int:
        if self._text:
            b = b.encode("utf-8")
        try:
            return self._raw.write(b)
        except OSError as e:
            from pkwrap.cli import file_error
            raise file_error(self.path, e) from e

    def flush(self) -> None:
        try:
            self._raw.flush()
        except OSError as e:
            from pkwrap.cli import file_error
            raise file_error(self.path, e) from e

    def commit(self) -> None:
        """Flush, close and rename onto the final name (an error discards the file)."""
        if self.closed:
            return
        from pkwrap.cli import file_error
        try:
            self._raw.flush()
            if self.fsync and self.tmp is not None:
                os.fsync(self._raw.fileno())
            if self._own:
                self._raw.close()
            self.closed = True
            if self.tmp is not None:
                os.replace(self.tmp, self.path)
                self.tmp = None
                _OPEN_OUTPUTS.discard(self)
                _COMMITTED.append(self.path)
                if self.fsync:
                    _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as e:
            self.discard()
            raise file_error(self.path, e) from e

    def discard(self) -> None:
        """Close and remove the temporary file (the final name is left untouched)."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError, ValueError):
                if self._own:
                    self._raw.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None
        _OPEN_OUTPUTS.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.commit()
        else:
            self.discard()
        return False


def sys_stdout_buffer():
    import sys
    return sys.stdout.buffer


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path, mode: str = "wb", fsync: bool = False) -> Iterator[AtomicFile]:
    """``with atomic_output(path) as f: f.write(...)``: ``path`` appears, complete, only
    when the block ends without an exception (see :class:`AtomicFile`)."""
    f = AtomicFile(path, mode, fsync)
    try:
        yield f
    except BaseException:
        f.discard()
        raise
    f.commit()


def write_kaldi_object(path_or_file, write_body: Callable[["KaldiWriter"], None],
                       binary: bool = True) -> Optional[bytes]:
    """Kaldi's ``WriteKaldiObject``: the binary header (in binary mode), then
    ``write_body(writer)``; to a path (atomically: the file appears complete or not at
    all), to an open binary stream, or, with ``path_or_file`` None, returned as bytes."""
    buf = _io.BytesIO()
    w = KaldiWriter(buf, binary)
    w.write_header()
    write_body(w)
    data = buf.getvalue()
    if path_or_file is None:
        return data
    if isinstance(path_or_file, (str, os.PathLike)):
        with atomic_output(path_or_file) as f:
            f.write(data)
    else:
        path_or_file.write(data)
    return None


@contextlib.contextmanager
def atomic_outputs(*paths, mode: str = "wb") -> Iterator[List[AtomicFile]]:
    """Several outputs of one program: all appear or none (a failure while writing any
    of them, or while committing, removes them all)."""
    files: List[AtomicFile] = []
    try:
        for p in paths:
            files.append(AtomicFile(p, mode))
        yield files
    except BaseException:
        for f in files:
            f.discard()
        raise
    done = []
    try:
        for f in files:
            f.commit()
            done.append(f)
    except BaseException:
        for f in files:
            f.discard()
        for f in done:  # all or nothing
            if not f.direct:
                with contextlib.suppress(OSError):
                    os.unlink(f.path)
        raise
