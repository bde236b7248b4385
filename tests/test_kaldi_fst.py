import io

import numpy as np
import pytest

from conftest import fixture_path
from pkwrap.kaldi.fst import (Fst, FstFormatError, read_fst, read_fst_text, write_fst_binary,
                              write_fst_text)

SETUPS = ["mono", "biphone"]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("name", ["den.fst", "normalization.fst", "phone_lm.fst"])
def test_binary_round_trip_is_byte_identical(setup, name):
    path = fixture_path(setup, name)
    fst = read_fst(path)
    out = io.BytesIO()
    write_fst_binary(fst, out)
    assert out.getvalue() == path.read_bytes()


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("name", ["den.fst", "normalization.fst", "phone_lm.fst"])
def test_matches_fstprint_and_fstinfo(setup, name):
    fst = read_fst(fixture_path(setup, name))
    assert write_fst_text(fst) == fixture_path(setup, name + ".txt").read_text()
    info = fixture_path(setup, name + "info.txt").read_text()
    fields = {l[:50].strip(): l[50:].strip() for l in info.splitlines()}
    assert int(fields["# of states"]) == fst.num_states
    assert int(fields["# of arcs"]) == fst.num_arcs
    assert int(fields["initial state"]) == fst.start
    assert int(fields["# of final states"]) == int(np.isfinite(fst.final).sum())
    assert read_fst_text(fixture_path(setup, name + ".txt").read_text()) == fst


def test_bench_graph_and_gzip():
    fst = read_fst(fixture_path("bench", "den.fst"))
    assert (fst.num_states, fst.num_arcs) == (3359, 43251)
    norm = read_fst(fixture_path("bench", "normalization.fst.gz"))
    assert norm.num_states > 0 and norm.is_acceptor()


def test_truncated_and_corrupt(tmp_path):
    data = fixture_path("mono", "den.fst").read_bytes()
    p = tmp_path / "trunc.fst"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FstFormatError, match="trunc.fst.*truncated"):
        read_fst(p)
    bad = bytearray(data)
    bad[0] ^= 0xFF
    p2 = tmp_path / "bad.fst"
    p2.write_bytes(bytes(bad))
    with pytest.raises(FstFormatError, match="bad.fst"):
        read_fst(p2)


def test_from_arcs_and_not_acceptor():
    f = Fst.from_arcs(2, 0, [(0, 1, 2, 0.5, 1)], {1: 0.0})
    assert not f.is_acceptor()
    assert f.arcs(0) == [(1, 2, 0.5, 1)]
