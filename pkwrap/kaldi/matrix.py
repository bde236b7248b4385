"""Kaldi matrices and vectors: full (float/double), compressed and sparse.

Binary layouts (``src/matrix/kaldi-matrix.cc``, ``compressed-matrix.cc``,
``sparse-matrix.cc``)::

    "FM " | "DM "  int32 rows, int32 cols, rows*cols float32 | float64, row-major
    "FV " | "DV "  int32 dim, dim float32 | float64
    "CM " | "CM2 " | "CM3 "   then the GlobalHeader without its format field:
                   float min_value, float range, int32 num_rows, int32 num_cols,
                   then the payload (raw, no size bytes)
    "SM "  int32 rows, then per row "SV " int32 dim, int32 n, n x (int32 col, float value)
    "FP " | "DP "  int32 n, then n(n+1)/2 float32 | float64: a packed lower triangle,
                   row by row (SpMatrix, TpMatrix)

Text mode: a matrix is ``" [\\n  a b \\n  c d ]\\n"``, a vector ``" [ a b ]\\n"``, a
sparse matrix ``"rows=R dim=D [ i v ... ] ..."``, a packed matrix ``"[\\n a \\n b c ]\\n"``
(row i has i+1 values); a compressed matrix is written uncompressed.

CompressedMatrix formats. With ``u16(q) = min + range * (1/65535 as float) * q``:

* ``CM``, kOneByteWithColHeaders (Kaldi's choice for speech features, > 8 rows): per
  column 4 uint16 percentiles ``q0 q25 q75 q100`` (``p_i = u16(q_i)``), then the
  column-major bytes ``b[col][row]`` decoded piecewise-linearly:
  ``b <= 64: p0 + (p25-p0) * b/64``; ``b <= 192: p25 + (p75-p25) * (b-64)/128``;
  else ``p75 + (p100-p75) * (b-192)/63``.
* ``CM2``, kTwoByte: row-major uint16 ``q``, value ``min + q * (range / 65535)``.
* ``CM3``, kOneByte: row-major uint8 ``q``, value ``min + q * (range / 255)``.

Decoding reproduces ``CompressedMatrix::CopyToMat`` bit for bit, including where Kaldi
rounds through double; the loop runs in C++ (``pkwrap._pkwrap.decompress_matrix``)
with :func:`decompress_numpy` as the reference. Encoding reproduces
``CompressedMatrix::CopyFromMat`` (global header, percentiles, rounding) so that
Kaldi and pkwrap compress the same matrix to the same bytes; a matrix read from disk
keeps its bytes, so writing it back is byte-identical.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import io
import warnings

import numpy as np

from .io import KaldiFormatError, KaldiReader, KaldiWriter, format_float, write_kaldi_object

try:  # the C++ core; the numpy fallback is used (and tested) without it
    from .. import _pkwrap as _native
    if not hasattr(_native, "decompress_matrix"):
        _native = None
except ImportError:  # pragma: no cover - exercised only on a broken build
    _native = None

__all__ = ["CompressedMatrix", "SparseMatrix", "read_matrix", "write_matrix",
           "read_vector", "write_vector", "read_general_matrix", "write_general_matrix",
           "decompress_numpy", "compress_numpy", "GeneralMatrix", "read_packed_matrix",
           "write_packed_matrix"]

K_ONE_BYTE_WITH_COL_HEADERS = 1
K_TWO_BYTE = 2
K_ONE_BYTE = 3
_FORMAT_TOKEN = {1: "CM", 2: "CM2", 3: "CM3"}
_TOKEN_FORMAT = {v: k for k, v in _FORMAT_TOKEN.items()}
_HDR = struct.Struct("<ffii")  # min_value, range, num_rows, num_cols
_F = np.float32
_D = np.float64


def _payload_size(fmt: int, rows: int, cols: int) -> int:
    if fmt == K_ONE_BYTE_WITH_COL_HEADERS:
        return cols * (8 + rows)
    if fmt == K_TWO_BYTE:
        return 2 * rows * cols
    return rows * cols


@dataclass
class CompressedMatrix:
    """Kaldi's ``CompressedMatrix``, kept as its bytes.

    Args:
      format: 1 (``CM``), 2 (``CM2``) or 3 (``CM3``).
      min_value, range: the global header's floats.
      num_rows, num_cols: shape R, C.
      data: the payload after the global header (``_payload_size`` bytes).
    """

    format: int
    min_value: float
    range: float
    num_rows: int
    num_cols: int
    data: bytes

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.num_rows, self.num_cols)

    def header_bytes(self) -> bytes:
        """The 20-byte GlobalHeader (format included), as held in memory by Kaldi."""
        return struct.pack("<i", self.format) + _HDR.pack(self.min_value, self.range,
                                                          self.num_rows, self.num_cols)

    def to_numpy(self, native: Optional[bool] = None) -> np.ndarray:
        """Decode to float32 ``[R][C]`` exactly as Kaldi's ``CopyToMat``.

        Args:
          native: use the C++ loop (None: when it is built).
        """
        if self.num_rows == 0 or self.num_cols == 0:
            return np.zeros((self.num_rows, self.num_cols), dtype=_F)
        if native is None:
            native = _native is not None
        if native:
            if _native is None:
                raise RuntimeError("pkwrap._pkwrap is not built: run `make build`")
            return _native.decompress_matrix(self.header_bytes() + self.data)
        return decompress_numpy(self)

    @classmethod
    def from_matrix(cls, mat: np.ndarray, method: str = "auto") -> "CompressedMatrix":
        """Compress like ``CompressedMatrix::CopyFromMat``.

        Args:
          mat: ``[R][C]`` float32 or float64 (float32 is what Kaldi compresses).
          method: "auto" (speech-feature format when R > 8, else two-byte),
            "speech_feature", "two_byte_auto", "two_byte_signed_integer",
            "one_byte_auto", "one_byte_unsigned_integer", "one_byte_zero_one".
        """
        return compress_numpy(mat, method)

    @classmethod
    def read(cls, r: KaldiReader) -> "CompressedMatrix":
        start = r.pos
        tok = r.read_token()
        if tok not in _TOKEN_FORMAT:
            raise r.error("expected CM, CM2 or CM3, got %r" % tok[:40], start)
        fmt = _TOKEN_FORMAT[tok]
        mn, rg, rows, cols = _HDR.unpack(r.take(16, "compressed-matrix header"))
        if cols == 0:  # Kaldi's empty matrix
            return cls(fmt, mn, rg, 0, 0, b"")
        if rows <= 0 or cols < 0 or rows * cols > 2 ** 31:
            raise r.error("bad compressed-matrix size %d x %d" % (rows, cols), start)
        data = r.take(_payload_size(fmt, rows, cols), "compressed-matrix data (%d x %d, %s)"
                      % (rows, cols, tok))
        return cls(fmt, mn, rg, rows, cols, data)

    def write(self, w: KaldiWriter) -> None:
        if not w.binary:  # text mode: Kaldi writes the decompressed matrix
            write_matrix(w, self.to_numpy())
            return
        w.write_token(_FORMAT_TOKEN[self.format])
        w.write(_HDR.pack(self.min_value, self.range, self.num_rows, self.num_cols))
        w.write(self.data)

    def scale(self, alpha: float) -> None:
        """Kaldi's ``CompressedMatrix::Scale``: scales the global header floats."""
        self.min_value = float(_F(self.min_value) * _F(alpha))
        self.range = float(_F(self.range) * _F(alpha))


# ----------------------------------------------------------------------------- decode
def _u16_to_float(min_value, rng, q):
    """Uint16ToFloat in float32: min + (range * (1/65535)f) * q."""
    c = _F(1.52590218966964e-05)
    return _F(min_value) + (_F(rng) * c) * np.asarray(q).astype(_F)


def _col_tables(cm: CompressedMatrix, headers: np.ndarray) -> np.ndarray:
    """float32 ``[C][256]``: the decoded value of every byte for every column."""
    p = _u16_to_float(cm.min_value, cm.range, headers)  # [C][4] float32
    p0, p25, p75, p100 = (p[:, i:i + 1] for i in range(4))
    v = np.arange(256)
    vf = v.astype(_F)
    # (p_hi - p_lo) * value is float; "* (1/64.0)" and the add happen in double.
    lo = (p0.astype(_D) + ((p25 - p0) * vf).astype(_D) * (1 / 64.0)).astype(_F)
    mid = (p25.astype(_D) + ((p75 - p25) * (vf - _F(64))).astype(_D) * (1 / 128.0)).astype(_F)
    hi = (p75.astype(_D) + ((p100 - p75) * (vf - _F(192))).astype(_D) * (1 / 63.0)).astype(_F)
    return np.where(v <= 64, lo, np.where(v <= 192, mid, hi))


def decompress_numpy(cm: CompressedMatrix) -> np.ndarray:
    """Reference numpy decoder (float32 ``[R][C]``), same bits as Kaldi's CopyToMat."""
    R, C = cm.num_rows, cm.num_cols
    buf = np.frombuffer(cm.data, dtype=np.uint8)
    if cm.format == K_ONE_BYTE_WITH_COL_HEADERS:
        headers = buf[:8 * C].view("<u2").reshape(C, 4)
        tables = _col_tables(cm, headers)
        bytes_cr = buf[8 * C:8 * C + R * C].reshape(C, R)
        out = np.take_along_axis(tables, bytes_cr.astype(np.intp), axis=1)  # [C][R]
        return np.ascontiguousarray(out.T)
    if cm.format == K_TWO_BYTE:
        inc = _F(_D(_F(cm.range)) * (1.0 / 65535.0))
        q = buf[:2 * R * C].view("<u2").reshape(R, C)
    elif cm.format == K_ONE_BYTE:
        inc = _F(_D(_F(cm.range)) * (1.0 / 255.0))
        q = buf[:R * C].reshape(R, C)
    else:
        raise KaldiFormatError("compressed matrix: unknown format %d" % cm.format)
    return _F(cm.min_value) + q.astype(_F) * inc


# ----------------------------------------------------------------------------- encode
_METHODS = ("auto", "speech_feature", "two_byte_auto", "two_byte_signed_integer",
            "one_byte_auto", "one_byte_unsigned_integer", "one_byte_zero_one")


def _float_to_uint(min_value, rng, values, scale: int) -> np.ndarray:
    """FloatToUint16 (scale 65535) / FloatToUint8 (scale 255): f = (v - min)/range in
    float, clamped to [0, 1], then int(f * scale + 0.499) with the add in double."""
    f = (np.asarray(values, dtype=_F) - _F(min_value)) / _F(rng)
    f = np.clip(f, _F(0), _F(1))
    return np.trunc((f * _F(scale)).astype(_D) + 0.499).astype(np.int64)


def compress_numpy(mat: np.ndarray, method: str = "auto") -> CompressedMatrix:
    """``CompressedMatrix::CopyFromMat`` in numpy; see :meth:`CompressedMatrix.from_matrix`."""
    if method not in _METHODS:
        raise ValueError("unknown compression method %r (one of %s)" % (method, ", ".join(_METHODS)))
    m = np.asarray(mat)
    if m.ndim != 2:
        raise ValueError("compress: expected a 2-D matrix, got shape %s" % (m.shape,))
    R, C = m.shape
    if R == 0:
        return CompressedMatrix(K_ONE_BYTE_WITH_COL_HEADERS, 0.0, 0.0, 0, 0, b"")
    # Kaldi converts every value to float before it is compared or quantized (also
    # for Matrix<double>), so compressing float32(mat) is the same.
    m = m.astype(_F)
    if method == "auto":
        method = "speech_feature" if R > 8 else "two_byte_auto"
    fmt = (K_ONE_BYTE_WITH_COL_HEADERS if method == "speech_feature"
           else K_TWO_BYTE if method.startswith("two_byte") else K_ONE_BYTE)
    if method in ("speech_feature", "two_byte_auto", "one_byte_auto"):
        mn = _F(m.min())
        mx = _F(m.max())
        if not (np.isfinite(mn) and np.isfinite(mx)):
            raise ValueError("cannot compress a matrix with NaN or inf")
        if mx == mn:
            mx = _F(_D(mn) + (1.0 + _D(abs(mn))))
        rng = _F(mx - mn)
    elif method == "two_byte_signed_integer":
        mn, rng = _F(-32768.0), _F(65535.0)
    elif method == "one_byte_unsigned_integer":
        mn, rng = _F(0.0), _F(255.0)
    else:
        mn, rng = _F(0.0), _F(1.0)
    if fmt == K_TWO_BYTE:
        q = _float_to_uint(mn, rng, m, 65535).astype("<u2")
        return CompressedMatrix(fmt, float(mn), float(rng), R, C, q.tobytes())
    if fmt == K_ONE_BYTE:
        q = _float_to_uint(mn, rng, m, 255).astype(np.uint8)
        return CompressedMatrix(fmt, float(mn), float(rng), R, C, q.tobytes())
    headers = _col_headers(mn, rng, m)                    # [C][4] uint16
    p = _u16_to_float(mn, rng, headers)                   # [C][4] float32
    vals = np.ascontiguousarray(m.T).astype(_F)           # FloatToChar takes a float
    p0, p25, p75, p100 = (p[:, i:i + 1] for i in range(4))
    a = np.trunc((((vals - p0) / (p25 - p0)) * _F(64)).astype(_D) + 0.5)
    b = _D(64) + np.trunc((((vals - p25) / (p75 - p25)) * _F(128)).astype(_D) + 0.5)
    c = _D(192) + np.trunc((((vals - p75) / (p100 - p75)) * _F(63)).astype(_D) + 0.5)
    with np.errstate(invalid="ignore"):
        q = np.where(vals < p25, np.clip(a, 0, 64),
                     np.where(vals < p75, np.clip(b, 64, 192), np.clip(c, 192, 255)))
    data = headers.astype("<u2").tobytes() + q.astype(np.uint8).tobytes()
    return CompressedMatrix(fmt, float(mn), float(rng), R, C, data)


def _col_headers(mn, rng, m: np.ndarray) -> np.ndarray:
    """ComputeColHeader for every column: the uint16 percentiles (0, 25, 75, 100)."""
    R = m.shape[0]
    s = np.sort(m, axis=0)  # the order statistics nth_element would select
    def u(row):
        return _float_to_uint(mn, rng, row, 65535)
    if R >= 5:
        qn = R // 4
        q0, q25, q75, q100 = u(s[0]), u(s[qn]), u(s[3 * qn]), u(s[R - 1])
    else:
        q0 = u(s[0])
        q25 = u(s[1]) if R > 1 else None
        q75 = u(s[2]) if R > 2 else None
        q100 = u(s[3]) if R > 3 else None
    h0 = np.minimum(q0, 65532)
    h25 = np.minimum(np.maximum(q25, h0 + 1), 65533) if q25 is not None else h0 + 1
    h75 = np.minimum(np.maximum(q75, h25 + 1), 65534) if q75 is not None else h25 + 1
    h100 = np.maximum(q100, h75 + 1) if q100 is not None else h75 + 1
    return np.stack([h0, h25, h75, h100], axis=1).astype(np.uint16)


# ----------------------------------------------------------------------------- sparse
@dataclass
class SparseMatrix:
    """Kaldi's ``SparseMatrix<float>``: per row, sorted column indices and values.

    Args:
      num_cols: D (every row's ``dim``).
      rows: R pairs ``(int32 indices [n], float32 values [n])``.
    """

    num_cols: int
    rows: List[Tuple[np.ndarray, np.ndarray]]

    @property
    def shape(self) -> Tuple[int, int]:
        return (len(self.rows), self.num_cols)

    def to_numpy(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=_F)
        for i, (idx, val) in enumerate(self.rows):
            out[i, idx] = val
        return out

    @classmethod
    def from_dense(cls, mat: np.ndarray) -> "SparseMatrix":
        m = np.asarray(mat, dtype=_F)
        rows = []
        for row in m:
            nz = np.nonzero(row)[0].astype(np.int32)
            rows.append((nz, row[nz].astype(_F)))
        return cls(m.shape[1], rows)

    @classmethod
    def read(cls, r: KaldiReader) -> "SparseMatrix":
        if r.binary:
            r.expect_token("SM")
            nrows = r.read_int32()
            if not 0 <= nrows < 10000000:
                raise r.error("bad sparse-matrix row count %d" % nrows)
            rows, dim = [], None
            for _ in range(nrows):
                r.expect_token("SV")
                d = r.read_int32()
                n = r.read_int32()
                if d < 0 or not 0 <= n <= d:
                    raise r.error("bad sparse vector (dim %d, %d elements)" % (d, n))
                pairs = r.take_array(np.dtype([("i", "<i1"), ("idx", "<i4"), ("f", "<i1"),
                                               ("val", "<f4")]), n, "sparse vector")
                if n and ((pairs["i"] != 4).any() or (pairs["f"] != 4).any()):
                    raise r.error("sparse vector elements are not int32/float pairs")
                rows.append((pairs["idx"].astype(np.int32), pairs["val"].astype(_F)))
                dim = d if dim is None else dim
            return cls(dim or 0, rows)
        w = r._word()
        if not w.startswith("rows="):
            raise r.error("expected 'rows=N' for a sparse matrix, got %r" % w[:40])
        nrows = int(w[5:])
        rows, dim = [], 0
        for _ in range(nrows):
            w = r._word()
            if not w.startswith("dim="):
                raise r.error("expected 'dim=N' in sparse matrix, got %r" % w[:40])
            dim = int(w[4:])
            if r._word() != "[":
                raise r.error("expected '[' in sparse matrix row")
            idx, val = [], []
            while True:
                w = r._word()
                if w == "]":
                    break
                idx.append(int(w))
                val.append(float(r._word()))
            rows.append((np.array(idx, np.int32), np.array(val, _F)))
        return cls(dim, rows)

    def write(self, w: KaldiWriter) -> None:
        if w.binary:
            w.write_token("SM")
            w.write_int32(len(self.rows))
            for idx, val in self.rows:
                w.write_token("SV")
                w.write_int32(self.num_cols)
                w.write_int32(len(idx))
                pairs = np.empty(len(idx), dtype=[("i", "<i1"), ("idx", "<i4"), ("f", "<i1"),
                                                  ("val", "<f4")])
                pairs["i"], pairs["idx"], pairs["f"], pairs["val"] = 4, idx, 4, val
                w.write(pairs.tobytes())
        else:
            parts = ["rows=%d " % len(self.rows)]
            for idx, val in self.rows:
                parts.append("dim=%d [ " % self.num_cols + "".join(
                    "%d %s " % (i, format_float(v)) for i, v in zip(idx, val)) + "] ")
            w.write(("".join(parts) + "\n").encode())


# ----------------------------------------------------------------------------- full
def read_matrix(r: KaldiReader) -> np.ndarray:
    """Matrix<Real>::Read: ``FM``/``DM``/compressed (binary) or text; returns the stored
    dtype (float32 or float64; compressed decodes to float32)."""
    if r.binary:
        c = r.peek()
        if c == 67:  # 'C'
            return CompressedMatrix.read(r).to_numpy()
        start = r.pos
        tok = r.read_token()
        if tok not in ("FM", "DM"):
            raise r.error("expected a matrix (FM, DM or CM*), got token %r" % tok[:40], start)
        rows, cols = r.read_int32(), r.read_int32()
        if rows < 0 or cols < 0:
            raise r.error("bad matrix size %d x %d" % (rows, cols), start)
        dt = "<f4" if tok == "FM" else "<f8"
        return r.take_array(dt, rows * cols, "matrix data (%d x %d)" % (rows, cols)) \
            .reshape(rows, cols).astype(_F if tok == "FM" else _D)
    return _read_text_matrix(r)


def _read_text_matrix(r: KaldiReader) -> np.ndarray:
    start = r.pos
    w = r._word()
    if w == "[]":
        return np.zeros((0, 0), dtype=_F)
    if w != "[":
        raise r.error("expected '[' to start a text matrix, got %r" % w[:40], start)
    buf = r.buf
    if hasattr(buf, "find"):
        end = buf.find(b"]", r.pos, r.end)
    else:
        end = bytes(buf[r.pos:r.end]).find(b"]")
        end = -1 if end < 0 else end + r.pos
    if end < 0:
        raise r.error("unterminated text matrix (no ']')", start)
    body = bytes(buf[r.pos:end]).decode("ascii", errors="replace")
    r.pos = end + 1
    if r.pos < r.end and buf[r.pos] == 13:
        r.pos += 1
    if r.pos < r.end and buf[r.pos] == 10:
        r.pos += 1
    if not body.strip():
        return np.zeros((0, 0), dtype=_F)
    try:  # numpy's C parser: about 1.6x faster than float() per element
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mat = np.loadtxt(io.StringIO(body.replace(";", "\n")), dtype=np.float64, ndmin=2,
                             comments=None)
    except ValueError as e:
        raise r.error("bad text matrix (%s)" % str(e).split("\n")[0].split("; use")[0], start)
    return mat.astype(_F)


def write_matrix(w: KaldiWriter, mat: np.ndarray) -> None:
    """Write a full matrix: ``FM`` for float32 (anything not float64), ``DM`` for
    float64, or Kaldi's text form."""
    m = np.asarray(mat)
    if m.ndim != 2:
        raise ValueError("write_matrix: expected 2-D, got shape %s" % (m.shape,))
    if w.binary:
        dbl = m.dtype == _D
        w.write_token("DM" if dbl else "FM")
        w.write_int32(m.shape[0])
        w.write_int32(m.shape[1])
        w.write(np.ascontiguousarray(m, dtype="<f8" if dbl else "<f4").tobytes())
        return
    if m.shape[1] == 0:
        w.write(b" [ ]\n")
        return
    parts = [" ["]
    for row in m:
        parts.append("\n  " + "".join(format_float(x) + " " for x in row.tolist()))
    parts.append("]\n")
    w.write("".join(parts).encode())


def write_kaldi_matrix(path_or_file, mat: np.ndarray, binary: bool = True) -> None:
    """A float matrix file as Kaldi's ``WriteKaldiObject`` writes one (``lda.mat``,
    ``copy-matrix`` output); a path is written atomically."""
    write_kaldi_object(path_or_file, lambda w: write_matrix(w, np.asarray(mat, np.float32)),
                       binary)


def read_vector(r: KaldiReader) -> np.ndarray:
    """Vector<Real>::Read: ``FV``/``DV`` or text ``[ ... ]``; returns the stored dtype."""
    if r.binary:
        start = r.pos
        tok = r.read_token()
        if tok not in ("FV", "DV"):
            raise r.error("expected a vector (FV or DV), got token %r" % tok[:40], start)
        n = r.read_int32()
        if n < 0:
            raise r.error("negative vector size %d" % n, start)
        return r.take_array("<f4" if tok == "FV" else "<f8", n, "vector data (dim %d)" % n) \
            .astype(_F if tok == "FV" else _D)
    start = r.pos
    w = r._word()
    if w == "[]":
        return np.zeros(0, dtype=_F)
    if w != "[":
        raise r.error("expected '[' to start a text vector, got %r" % w[:40], start)
    vals = []
    while True:
        w = r._word()
        if w == "]":
            break
        try:
            vals.append(float(w))
        except ValueError:
            raise r.error("bad number %r in text vector" % w[:40])
    if r.pos < r.end and r.buf[r.pos] == 10:
        r.pos += 1
    return np.array(vals, dtype=_F)


def write_vector(w: KaldiWriter, vec: np.ndarray) -> None:
    v = np.asarray(vec)
    if w.binary:
        dbl = v.dtype == _D
        w.write_token("DV" if dbl else "FV")
        w.write_int32(v.shape[0])
        w.write(np.ascontiguousarray(v, dtype="<f8" if dbl else "<f4").tobytes())
    else:
        w.write((" [ " + "".join(format_float(x) + " " for x in v.tolist()) + "]\n").encode())


# ----------------------------------------------------------------------------- packed
def read_packed_matrix(r: KaldiReader) -> np.ndarray:
    """PackedMatrix<Real>::Read (Kaldi's SpMatrix / TpMatrix): ``FP``/``DP`` (binary) or
    text; returns the full symmetric matrix ``[n][n]`` (for a TpMatrix take
    ``np.tril``) in the stored dtype."""
    start = r.pos
    if r.binary:
        tok = r.read_token()
        if tok not in ("FP", "DP"):
            raise r.error("expected a packed matrix (FP or DP), got token %r" % tok[:40], start)
        n = r.read_int32()
        if n < 0:
            raise r.error("negative packed-matrix size %d" % n, start)
        dt = "<f4" if tok == "FP" else "<f8"
        vals = r.take_array(dt, n * (n + 1) // 2, "packed matrix data (%d x %d)" % (n, n))
        vals = vals.astype(_F if tok == "FP" else _D)
    else:
        w = r._word()
        if w in ("FP", "DP"):  # the old text form: token, size, values
            n = r.read_int32()
            if n < 0:
                raise r.error("negative packed-matrix size %d" % n, start)
            vals = np.array([r.read_float() for _ in range(n * (n + 1) // 2)], dtype=_F)
        elif w == "[]":
            return np.zeros((0, 0), dtype=_F)
        elif w == "[":
            items = []
            while True:
                w = r._word("a packed matrix")
                if w == "]":
                    break
                if w.endswith("]"):
                    items.append(w[:-1])
                    break
                items.append(w)
            try:
                vals = np.array([float(x) for x in items], dtype=_F)
            except ValueError as e:
                raise r.error("bad text packed matrix (%s)" % e, start)
            n = int(round((math.sqrt(8 * len(vals) + 1) - 1) / 2))
            if n * (n + 1) // 2 != len(vals):
                raise r.error("text packed matrix has %d values, not n(n+1)/2 for any n"
                              % len(vals), start)
            if r.pos < r.end and r.buf[r.pos] == 10:
                r.pos += 1
        else:
            raise r.error("expected '[' to start a text packed matrix, got %r" % w[:40], start)
    out = np.zeros((n, n), dtype=vals.dtype)
    rows, cols = np.tril_indices(n)
    out[rows, cols] = vals
    out[cols, rows] = vals
    return out


def write_packed_matrix(w: KaldiWriter, mat: np.ndarray) -> None:
    """PackedMatrix<Real>::Write of the lower triangle of ``mat`` ``[n][n]``: ``DP`` for
    float64, ``FP`` otherwise, or Kaldi's text form."""
    m = np.asarray(mat)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError("write_packed_matrix: expected a square matrix, got shape %s"
                         % (m.shape,))
    n = m.shape[0]
    vals = m[np.tril_indices(n)]
    if w.binary:
        dbl = m.dtype == _D
        w.write_token("DP" if dbl else "FP")
        w.write_int32(n)
        w.write(np.ascontiguousarray(vals, dtype="<f8" if dbl else "<f4").tobytes())
        return
    if n == 0:
        w.write(b"[ ]\n")
        return
    parts = ["[\n"]
    i = 0
    for j in range(n):
        parts.append("".join(format_float(x) + " " for x in vals[i:i + j + 1].tolist()))
        i += j + 1
        parts.append("]\n" if j == n - 1 else "\n")
    w.write("".join(parts).encode())


# ----------------------------------------------------------------------------- general
GeneralMatrix = Union[np.ndarray, CompressedMatrix, SparseMatrix]


def read_general_matrix(r: KaldiReader) -> GeneralMatrix:
    """GeneralMatrix::Read: a compressed (``C``), sparse (``S``/``rows=``) or full matrix,
    returned in its own kind (full matrices as float32, as Kaldi's Matrix<BaseFloat>)."""
    c = r.peek_char()
    if r.binary and c == 67:
        return CompressedMatrix.read(r)
    if (r.binary and c == 83) or (not r.binary and c == 114):
        return SparseMatrix.read(r)
    return read_matrix(r).astype(_F, copy=False)


def write_general_matrix(w: KaldiWriter, m: GeneralMatrix) -> None:
    if isinstance(m, (CompressedMatrix, SparseMatrix)):
        m.write(w)
    else:
        write_matrix(w, np.asarray(m, dtype=_F))
