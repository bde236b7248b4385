"""Kaldi basic I/O, matrices (full, compressed, sparse) and tables against Kaldi's bytes."""
import io
import os
import struct
import sys

import numpy as np
import pytest

from conftest import fixture_path
from pkwrap.kaldi.chain_egs import read_chain_egs
from pkwrap.kaldi.io import KaldiFormatError, KaldiReader, KaldiWriter
from pkwrap.kaldi.matrix import (CompressedMatrix, SparseMatrix, compress_numpy,
                                 decompress_numpy, read_general_matrix, read_matrix,
                                 read_vector, write_general_matrix, write_matrix, write_vector)
from pkwrap.kaldi.table import (RandomAccessTableReader, SequentialTableReader, TableWriter,
                                parse_rspecifier, parse_wspecifier, read_table)

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _bytes(fn, binary=True):
    b = io.BytesIO()
    fn(KaldiWriter(b, binary))
    return b.getvalue()


# ---------------------------------------------------------------------------- basic types
def test_basic_types_binary_layout():
    def w(k):
        k.write_token("<Weight>")
        k.write_float(0.5)
        k.write_int32(-7)
        k.write_bool(True)
        k.write_int_vector([1, 2, 300])
    b = _bytes(w)
    assert b == (b"<Weight> " + b"\x04" + struct.pack("<f", 0.5) + b"\x04" + struct.pack("<i", -7)
                 + b"T" + b"\x04" + struct.pack("<i", 3) + np.array([1, 2, 300], "<i4").tobytes())
    r = KaldiReader(b)
    r.expect_token("<Weight>")
    assert r.read_float() == 0.5 and r.read_int32() == -7 and r.read_bool() is True
    assert r.read_int_vector().tolist() == [1, 2, 300] and r.at_eof()


def test_basic_types_text_and_double():
    def w(k):
        k.write_token("<T>")
        k.write_float(1e-5)
        k.write_int32(12)
        k.write_bool(False)
        k.write_int_vector([4, 5])
    t = _bytes(w, binary=False)
    assert t == b"<T> 1e-05 12 F [ 4 5 ]\n"
    r = KaldiReader(t, binary=False)
    r.expect_token("<T>")
    assert r.read_float() == pytest.approx(1e-5) and r.read_int32() == 12
    assert r.read_bool() is False and r.read_int_vector().tolist() == [4, 5]
    # a double where a float is expected is accepted (ReadBasicType<float>)
    assert KaldiReader(b"\x08" + struct.pack("<d", 0.25)).read_float() == 0.25


def test_basic_type_errors_name_file_and_offset():
    r = KaldiReader(b"<A> \x04\x01\x00", name="x.ark", key="k1")
    r.expect_token("<A>")
    with pytest.raises(KaldiFormatError, match=r"x\.ark, key 'k1'.*truncated.*at byte 4"):
        r.read_int32()
    with pytest.raises(KaldiFormatError, match="expected token '<B>', got '<A>'"):
        KaldiReader(b"<A> ", name="y").expect_token("<B>")
    with pytest.raises(KaldiFormatError, match="size byte 8"):
        KaldiReader(b"\x08" + b"\0" * 8).read_int32()


# ---------------------------------------------------------------------------- matrices
def test_full_matrix_and_vector_round_trips():
    m = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    b = _bytes(lambda w: write_matrix(w, m))
    assert b[:3] == b"FM " and np.array_equal(read_matrix(KaldiReader(b)), m)
    d = m.astype(np.float64)
    bd = _bytes(lambda w: write_matrix(w, d))
    assert bd[:3] == b"DM " and read_matrix(KaldiReader(bd)).dtype == np.float64
    t = _bytes(lambda w: write_matrix(w, m), binary=False)
    assert t.startswith(b" [\n  0 0.1428571 0.2857143 \n") and t.endswith(b"]\n")
    np.testing.assert_allclose(read_matrix(KaldiReader(t, binary=False)), m, rtol=1e-6)
    v = np.array([1, 0.5, -2], np.float32)
    assert _bytes(lambda w: write_vector(w, v), binary=False) == b" [ 1 0.5 -2 ]\n"
    assert np.array_equal(read_vector(KaldiReader(_bytes(lambda w: write_vector(w, v)))), v)


def test_sparse_matrix_round_trip():
    dense = np.zeros((3, 5), np.float32)
    dense[0, 1], dense[2, 4] = 0.5, -1.0
    sm = SparseMatrix.from_dense(dense)
    for binary in (True, False):
        b = _bytes(lambda w: write_general_matrix(w, sm), binary)
        got = read_general_matrix(KaldiReader(b, binary=binary))
        assert isinstance(got, SparseMatrix) and np.array_equal(got.to_numpy(), dense)
    assert _bytes(lambda w: write_general_matrix(w, sm))[:3] == b"SM "


def _kaldi_compressed_inputs():
    for ark in ("mono/data/cegs_compress_true.ark", "biphone/data/cegs_compress_true.ark",
                "e2e/cegs_e2e.ark"):
        for key, eg in read_chain_egs("ark:%s" % fixture_path(ark)):
            yield ark, key, eg


def test_compressed_decode_native_equals_numpy_and_kaldi_dump():
    n = 0
    for ark, key, eg in _kaldi_compressed_inputs():
        cm = eg.stored_inputs["input"]
        assert cm.format == 1  # Kaldi's choice for features (> 8 rows)
        native, ref = cm.to_numpy(native=True), decompress_numpy(cm)
        assert native.dtype == np.float32 and np.array_equal(native, ref), (ark, key)
        n += 1
    assert n == 41


def test_compress_reproduces_kaldi_bytes():
    """The egs' compressed inputs were made by Kaldi from feats.npz chunks (key
    utt-<first frame>, edge frames repeated): compressing the same rows gives the same
    bytes."""
    feats = {}
    n = 0
    for ark, key, eg in _kaldi_compressed_inputs():
        d = os.path.dirname(ark)
        if d not in feats:
            feats[d] = np.load(fixture_path(d, "feats.npz"))
        utt, first = (key, 0) if d == "e2e" else (key.rsplit("-", 1)[0], int(key.rsplit("-", 1)[1]))
        f = feats[d][utt]
        rows = f[np.clip(eg.input_indexes["input"][:, 1] + first, 0, len(f) - 1)]
        cm = CompressedMatrix.from_matrix(rows)
        st = eg.stored_inputs["input"]
        assert (cm.format, cm.min_value, cm.range, cm.data) == \
            (st.format, st.min_value, st.range, st.data), key
        n += 1
    assert n == 41


@pytest.mark.parametrize("method,fmt", [("two_byte_auto", 2), ("one_byte_auto", 3),
                                        ("speech_feature", 1), ("auto", 2)])
def test_compressed_formats_decode_by_definition(method, fmt):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 5)) * 3).astype(np.float32)
    cm = compress_numpy(x, method)
    assert cm.format == fmt
    b = _bytes(cm.write)
    assert b.startswith({1: b"CM ", 2: b"CM2 ", 3: b"CM3 "}[fmt])
    back = CompressedMatrix.read(KaldiReader(b))
    assert back == cm and _bytes(back.write) == b  # byte-identical round trip
    got = cm.to_numpy(native=True)
    assert np.array_equal(got, cm.to_numpy(native=False))
    # Independent decode straight from the definition in the file format.
    mn, rg = np.float32(cm.min_value), np.float32(cm.range)
    if fmt == 2:
        q = np.frombuffer(cm.data, "<u2").reshape(7, 5).astype(np.float32)
        want = mn + q * np.float32(np.float64(rg) / 65535.0)
        tol = rg / 65535
    elif fmt == 3:
        q = np.frombuffer(cm.data, np.uint8).reshape(7, 5).astype(np.float32)
        want = mn + q * np.float32(np.float64(rg) / 255.0)
        tol = rg / 255
    else:
        want, tol = got, rg / 60
    assert np.array_equal(got, want)
    assert np.abs(got - x).max() <= tol


def test_compressed_integer_methods_are_exact():
    x = np.array([[0, 3, 255], [7, 1, 2]], np.float32)
    for method in ("one_byte_unsigned_integer", "two_byte_signed_integer"):
        assert np.array_equal(compress_numpy(x, method).to_numpy(), x)
    z = np.array([[0, 1], [1, 0]], np.float32)
    assert np.array_equal(compress_numpy(z, "one_byte_zero_one").to_numpy(), z)
    with pytest.raises(ValueError, match="NaN or inf"):
        compress_numpy(np.array([[np.nan] * 3] * 9, np.float32))


def test_compressed_matrix_errors():
    good = _bytes(compress_numpy(np.ones((3, 2), np.float32)).write)
    with pytest.raises(KaldiFormatError, match="truncated.*compressed-matrix data"):
        CompressedMatrix.read(KaldiReader(good[:-3], name="f.ark"))
    with pytest.raises(KaldiFormatError, match="expected CM, CM2 or CM3"):
        CompressedMatrix.read(KaldiReader(b"CM9 " + good[4:]))
    from pkwrap import _pkwrap
    with pytest.raises(ValueError, match="header wants"):
        _pkwrap.decompress_matrix(struct.pack("<iffii", 2, 0, 1, 3, 2) + b"\0" * 5)
    with pytest.raises(ValueError, match="unknown format"):
        _pkwrap.decompress_matrix(struct.pack("<iffii", 7, 0, 1, 3, 2))


# ---------------------------------------------------------------------------- specifiers
def test_specifier_parsing():
    assert parse_rspecifier("ark,s,cs:a.ark") == parse_rspecifier("ark,s,cs:a.ark")
    r = parse_rspecifier("ark,s,cs:egs/cegs.1.ark")
    assert (r.kind, r.path, r.opts) == ("ark", "egs/cegs.1.ark", frozenset({"s", "cs"}))
    assert parse_rspecifier("scp,p:x.scp").permissive
    assert parse_rspecifier("a.scp").kind == "scp" and parse_rspecifier("a.ark").kind == "ark"
    assert parse_rspecifier("ark:-").path == "-"
    w = parse_wspecifier("ark,scp:a.ark,a.scp")
    assert (w.ark, w.scp, w.binary) == ("a.ark", "a.scp", True)
    assert parse_wspecifier("scp,ark:a.scp,a.ark").ark == "a.ark"
    assert parse_wspecifier("ark,t:-").binary is False
    for bad in ("ark,zz:a", "ark,scp:a.ark", "scp:a.scp", "a.ark"):
        with pytest.raises(ValueError):
            (parse_wspecifier if bad != "ark,zz:a" else parse_rspecifier)(bad)


# ---------------------------------------------------------------------------- tables
def test_table_write_scp_offsets_and_random_access(tmp_path):
    mats = {"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.float32).reshape(1, 4)}
    ark, scp = tmp_path / "m.ark", tmp_path / "m.scp"
    with TableWriter("ark,scp:%s,%s" % (ark, scp), "matrix") as w:
        for k, v in mats.items():
            w[k] = v
    lines = scp.read_text().splitlines()
    assert lines[0] == "a %s:2" % ark  # offset of the object ("\0B"), after "a "
    raw = ark.read_bytes()
    off_b = int(lines[1].rsplit(":", 1)[1])
    assert raw[off_b:off_b + 2] == b"\0B" and raw[off_b - 2:off_b] == b"b "
    got = dict(SequentialTableReader("scp:%s" % scp, "matrix"))
    assert set(got) == {"a", "b"} and all(np.array_equal(got[k], mats[k]) for k in mats)
    ra = RandomAccessTableReader("scp:%s" % scp, "matrix")
    assert np.array_equal(ra["b"], mats["b"]) and "c" not in ra
    with pytest.raises(KeyError, match="no key 'c'"):
        ra["c"]
    ra2 = RandomAccessTableReader("ark:%s" % ark, "matrix")
    assert list(ra2.keys()) == ["a", "b"] and np.array_equal(ra2["a"], mats["a"])
    # kaldiio reads what we write
    kaldiio = pytest.importorskip("kaldiio")
    assert np.array_equal(kaldiio.load_scp(str(scp))["b"], mats["b"])


def test_text_tables_and_stdin(tmp_path, monkeypatch):
    w = read_table("ark,t:%s" % fixture_path("mono/data/egs_weights.txt"), "float")
    assert w == {"utt00-12": 0.5, "utt00-171": 0.5}
    p = tmp_path / "t.ark"
    with TableWriter("ark,t:%s" % p, "float") as tw:
        tw["x"] = 0.25
        tw["y"] = 3
    assert p.read_text() == "x 0.25\ny 3\n"
    ints = tmp_path / "i.ark"
    with TableWriter("ark:%s" % ints, "int32_vector") as tw:
        tw["u"] = [1, 2, 3]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ints.read_bytes())))
    assert [(k, v.tolist()) for k, v in SequentialTableReader("ark:-", "int32_vector")] == \
        [("u", [1, 2, 3])]


def test_table_bad_input(tmp_path):
    mats = {"a": np.ones((2, 3), np.float32), "b": np.ones((1, 3), np.float32)}
    ark = tmp_path / "m.ark"
    with TableWriter("ark:%s" % ark, "matrix") as w:
        for k, v in mats.items():
            w[k] = v
    raw = ark.read_bytes()
    bad = tmp_path / "trunc.ark"
    bad.write_bytes(raw[:-5])
    with pytest.raises(KaldiFormatError, match=r"trunc\.ark, key 'b'.*truncated"):
        list(SequentialTableReader("ark:%s" % bad))
    bad.write_bytes(raw + b"c")
    with pytest.raises(KaldiFormatError, match="key 'c' at byte .* has no object"):
        list(SequentialTableReader("ark:%s" % bad))
    scp = tmp_path / "x.scp"
    scp.write_text("a %s:%d\n" % (ark, len(raw) + 10))
    with pytest.raises(KaldiFormatError, match="key 'a': offset .* past the end"):
        list(SequentialTableReader("scp:%s" % scp))
    scp.write_text("a %s:5\n" % ark)  # points into the middle of an object
    with pytest.raises(KaldiFormatError, match="key 'a'"):
        list(SequentialTableReader("scp:%s" % scp))
    scp.write_text("a %s/missing.ark:0\n" % tmp_path)
    with pytest.raises(KaldiFormatError, match="key 'a': cannot open"):
        list(SequentialTableReader("scp:%s" % scp))
    with pytest.warns(UserWarning, match="skipping.*cannot open"):
        assert list(SequentialTableReader("scp,p:%s" % scp)) == []  # permissive skips
    bad.write_bytes(raw[:-5])
    with pytest.warns(UserWarning, match="stopped.*truncated"):
        assert [k for k, _ in SequentialTableReader("ark,p:%s" % bad)] == ["a"]
    scp.write_text("onlykey\n")
    with pytest.raises(KaldiFormatError, match="bad script-file line"):
        list(SequentialTableReader("scp:%s" % scp))


def test_pipes(tmp_path):
    p = tmp_path / "v.ark.gz"
    with TableWriter("ark:| gzip -c > %s" % p, "vector") as w:
        w["k"] = np.array([1.5, 2], np.float32)
    got = read_table("ark:gunzip -c %s |" % p, "vector")
    assert list(got) == ["k"] and got["k"].tolist() == [1.5, 2.0]
    with pytest.raises(OSError, match="failed"):
        read_table("ark:false |", "vector")


def test_uint32_newline_and_field_names_in_errors():
    """uint32 (size byte -4, as Kaldi writes an EventMap table size), KaldiWriter.newline,
    format_float precision, and the optional field name in read errors."""
    from pkwrap.kaldi.io import format_float

    def w(k):
        k.write_uint32(2 ** 32 - 1)
        k.newline()
        k.write_int32(5)
    b = _bytes(w)
    assert b == b"\xfc" + struct.pack("<I", 2 ** 32 - 1) + b"\x04" + struct.pack("<i", 5)
    assert _bytes(w, binary=False) == b"4294967295 \n5 "
    r = KaldiReader(b)
    assert r.read_uint32() == 2 ** 32 - 1 and r.read_int32() == 5 and r.at_eof()
    with pytest.raises(KaldiFormatError, match=r"expected uint32 \(size byte -4\), got size "
                                               r"byte 4 while reading the size"):
        KaldiReader(b[5:], name="t").read_uint32("the size")
    with pytest.raises(KaldiFormatError, match="out of uint32 range"):
        KaldiReader(b"-1 ", binary=False).read_uint32()
    with pytest.raises(ValueError, match="does not fit in uint32"):
        KaldiWriter(io.BytesIO()).write_uint32(-1)
    with pytest.raises(KaldiFormatError, match=r"^f: expected an integer, got 'x' while "
                                               r"reading a state id \(at byte 2\)"):
        KaldiReader(b" x ", binary=False, name="f").read_int32("a state id")
    with pytest.raises(KaldiFormatError, match="unexpected end of data while reading a prob"):
        KaldiReader(b"  ", binary=False).read_float("a prob")
    with pytest.raises(KaldiFormatError, match="wanted 4 bytes for phones size"):
        KaldiReader(b"\x04\x01").read_int_vector(what="phones")
    assert format_float(1 / 3) == "0.3333333" and format_float(1 / 3, 6) == "0.333333"
    assert format_float(float("-inf"), 6) == "-inf"
