"""pkwrap.kaldi.lattice: Kaldi CompactLattice archives (a lattice dir's lat.N.gz).

``fixtures/kaldi/kaldi_recipe/lats/lat.1.gz`` holds the first 3 lattices of the
kaldi_recipe experiment's ``exp/chain/lats/lat.1.gz`` (steps/align_fmllr_lats.sh),
entries copied byte for byte."""
import gzip

import numpy as np
import pytest

from conftest import fixture_path
from pkwrap.kaldi.io import KaldiFormatError
from pkwrap.kaldi.lattice import read_compact_lattices

# data/train_hires/utt2num_frames of the experiment
NUM_FRAMES = {"s000-0000": 229, "s000-0001": 210, "s000-0002": 135}


def _path():
    return str(fixture_path("kaldi_recipe", "lats", "lat.1.gz"))


def test_read_lattices_gz_and_pipe():
    lats = list(read_compact_lattices(_path()))
    assert [k for k, _ in lats] == list(NUM_FRAMES)
    piped = list(read_compact_lattices("ark:gunzip -c %s |" % _path()))
    assert [k for k, _ in piped] == list(NUM_FRAMES)
    for (k, lat), (_, lat2) in zip(lats, piped):
        times, n = lat.state_times()
        assert n == NUM_FRAMES[k]  # every path spans the utterance's frames
        assert lat.arcs[0][0][3].tolist() == lat2.arcs[0][0][3].tolist()
    k, lat = lats[0]
    assert (lat.start, lat.num_states, sum(len(a) for a in lat.arcs)) == (0, 11, 12)
    label, g, a, tids, nxt = lat.arcs[0][0]
    assert (label, nxt, len(tids)) == (7, 1, 62)
    assert np.float32(g) == np.float32(2.8568429946899414)
    assert np.float32(a) == np.float32(2109.88037109375)
    assert [len(x[3]) for x in lat.arcs[2]] == [17, 20]  # two alignments of an epsilon
    assert lat.final[10][:2] == (0.0, 0.0) and lat.final[0] is None


def test_truncated_lattice_archive_names_file_and_key(tmp_path):
    data = gzip.open(_path()).read()
    p = tmp_path / "lat.1.gz"
    with gzip.open(p, "wb") as f:
        f.write(data[:len(data) - 30])
    with pytest.raises(KaldiFormatError, match=r"lat.1.gz.*s000-0002"):
        list(read_compact_lattices(str(p)))
