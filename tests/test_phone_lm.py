"""Phone LM estimation vs Kaldi's chain-est-phone-lm on the mono and biphone fixtures."""
import json
import math
import runpy
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path
from pkwrap.chain.phone_lm import (PhoneLmOptions, estimate_phone_lm,
                                   read_int_vector_archive)
from pkwrap.kaldi.fst import read_fst, write_fst

REPO = Path(__file__).resolve().parent.parent


def _lm_opts(setup):
    man = json.loads(fixture_path("manifest.json").read_text())
    opts = dict(x.lstrip("-").split("=") for x in man["setups"][setup]["lm_opts"].split())
    return dict(ngram_order=int(opts["ngram-order"]),
                no_prune_ngram_order=int(opts["no-prune-ngram-order"]),
                num_extra_lm_states=int(opts["num-extra-lm-states"]))


@pytest.mark.parametrize("setup", ["mono", "biphone"])
def test_phone_lm_equals_kaldi(setup, tmp_path):
    seqs = list(read_int_vector_archive("ark:%s" % fixture_path(setup, "lm_phone_seqs.txt")))
    lm = estimate_phone_lm(seqs, **_lm_opts(setup))
    ref = read_fst(fixture_path(setup, "phone_lm.fst"))
    # same states (same numbering), arcs, labels and weights
    assert lm.num_states == ref.num_states and lm.num_arcs == ref.num_arcs
    assert lm.start == ref.start
    np.testing.assert_array_equal(lm.state_offsets, ref.state_offsets)
    np.testing.assert_array_equal(lm.ilabel, ref.ilabel)
    np.testing.assert_array_equal(lm.olabel, ref.olabel)
    np.testing.assert_array_equal(lm.nextstate, ref.nextstate)
    np.testing.assert_allclose(lm.weight, ref.weight, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.isinf(lm.final), np.isinf(ref.final))
    fin = np.isfinite(ref.final)
    np.testing.assert_allclose(lm.final[fin], ref.final[fin], rtol=0, atol=1e-6)
    # the written file is byte-identical to Kaldi's
    out = tmp_path / "phone_lm.fst"
    write_fst(lm, str(out))
    assert out.read_bytes() == fixture_path(setup, "phone_lm.fst").read_bytes()


def test_cli_and_binary_archive(tmp_path):
    """chain-est-phone-lm (its main(), in-process) on a binary int-vector archive gives
    Kaldi's file."""
    src = fixture_path("mono", "lm_phone_seqs.txt")
    ark = tmp_path / "seqs.ark"
    with open(ark, "wb") as f:
        for key, seq in read_int_vector_archive(src):
            f.write(key.encode() + b" \0B" + struct.pack("<bi", 4, len(seq))
                    + struct.pack("<%di" % len(seq), *seq))
    assert list(read_int_vector_archive(ark)) == list(read_int_vector_archive(src))
    out = tmp_path / "lm.fst"
    o = _lm_opts("mono")
    cli = runpy.run_path(str(REPO / "scripts" / "chain-est-phone-lm"), run_name="cli")
    cli["main"](["--ngram-order=%d" % o["ngram_order"],
                 "--no-prune-ngram-order=%d" % o["no_prune_ngram_order"],
                 "--num-extra-lm-states=%d" % o["num_extra_lm_states"],
                 "ark:%s" % ark, str(out)])
    assert out.read_bytes() == fixture_path("mono", "phone_lm.fst").read_bytes()


def test_small_lm_by_hand():
    """Bigram, no pruning: probabilities are plain relative frequencies."""
    lm = estimate_phone_lm([[1, 2], [1, 2, 2]], ngram_order=2, no_prune_ngram_order=1,
                           num_extra_lm_states=100)
    # histories in order of first use: (0,), (1,), (2,)
    assert lm.num_states == 3 and lm.start == 0
    arcs = {s: lm.arcs(s) for s in range(3)}
    assert [(a[0], a[3]) for a in arcs[0]] == [(1, 1)] and arcs[0][0][2] == 0.0
    assert [(a[0], a[3]) for a in arcs[1]] == [(2, 2)]
    # from 2: "2 2" once, "2 </s>" twice
    assert [(a[0], a[3]) for a in arcs[2]] == [(2, 2)]
    assert arcs[2][0][2] == pytest.approx(-math.log(1 / 3), abs=1e-6)
    assert lm.final[2] == pytest.approx(-math.log(2 / 3), abs=1e-6)
    assert np.isinf(lm.final[:2]).all()


def test_pruning_reaches_target():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 8, size=rng.integers(5, 30)).tolist() for _ in range(200)]
    full = estimate_phone_lm(seqs, 3, 2, 10**6)
    pruned = estimate_phone_lm(seqs, 3, 2, 5)
    basic = 1 + 7  # histories of length 1: BOS and 7 phones
    assert pruned.num_states == basic + 5 < full.num_states
    # every state still sums to one (arcs + final)
    for lm in (full, pruned):
        tot = np.bincount(lm.src, weights=np.exp(-lm.weight.astype(np.float64)),
                          minlength=lm.num_states) + np.exp(-lm.final.astype(np.float64))
        np.testing.assert_allclose(tot, 1.0, atol=1e-5)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="utt7.*phones must be positive"):
        estimate_phone_lm([("utt1", [1, 2]), ("utt7", [3, 0, 2])])
    with pytest.raises(ValueError, match="utt2: unknown phone id.*\\[9\\]"):
        estimate_phone_lm({"utt1": [1, 2], "utt2": [2, 9]}, phones=range(1, 5))
    with pytest.raises(ValueError, match="no phone sequences"):
        estimate_phone_lm([])
    with pytest.raises(ValueError, match="ngram-order"):
        PhoneLmOptions(ngram_order=1)
    with pytest.raises(ValueError, match="no-prune-ngram-order"):
        PhoneLmOptions(ngram_order=3, no_prune_ngram_order=4)
    bad = tmp_path / "bad.txt"
    bad.write_text("utt1 1 2 3\nutt2 1 x 3\n")
    with pytest.raises(ValueError, match="bad.txt:2.*utt2"):
        list(read_int_vector_archive(bad))
    trunc = tmp_path / "trunc.ark"
    trunc.write_bytes(b"utt1 \0B" + struct.pack("<bi", 4, 10) + b"\1\0\0\0")
    with pytest.raises(ValueError, match="truncated"):
        list(read_int_vector_archive(trunc))
