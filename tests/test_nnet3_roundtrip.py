"""Models written by pkwrap are read by real Kaldi, and Kaldi's nnet3-compute of them equals
pkwrap's forward (fixture tests/fixtures/kaldi/nnet3_roundtrip, made by its make.py with a
Kaldi build: pkwrap loads each nnet3_io model, perturbs every parameter and batchnorm
statistic, writes it as binary final.mdl / text raw / binary raw; Kaldi's nnet3-info read each
and nnet3-compute evaluated it)."""
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from pkwrap.nn import load_kaldi_nnet3
from pkwrap.nnet3 import nnet3_compute

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "kaldi", "nnet3_roundtrip")
IO = os.path.join(os.path.dirname(__file__), "fixtures", "kaldi", "nnet3_io")


def _make():
    spec = importlib.util.spec_from_file_location("roundtrip_make", os.path.join(HERE, "make.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MANIFEST = json.load(open(os.path.join(HERE, "manifest.json")))


def test_manifest_covers_three_forms():
    forms = {(c["binary"], c["transition_model"]) for c in MANIFEST["cases"]}
    assert forms == {(True, True), (False, False), (True, False)}
    assert all(len(c["runs"]) == 2 for c in MANIFEST["cases"])


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["model"])
def test_kaldi_reads_what_pkwrap_writes(case, tmp_path):
    make = _make()
    (entry,) = [c for c in make.CASES if c[0] == case["model"]]
    torch.manual_seed(0)
    model, path, digest = make.write_case(entry, str(tmp_path))
    # the bytes Kaldi read are the bytes pkwrap writes today
    assert digest == case["sha256"], "save_kaldi_nnet3 output changed for %s" % case["model"]
    back = load_kaldi_nnet3(path)  # and pkwrap reads them back
    assert (back.trans_model is not None) == case["transition_model"]
    inputs = os.path.join(IO, "inputs")
    worst = 0.0
    for run in case["runs"]:
        for u in run["utts"]:
            feats = np.load(os.path.join(inputs, "feats_%s.npy" % u))
            if run["tag"].startswith("online"):
                kw = dict(online_ivectors=np.load(os.path.join(inputs, "ivector_online_%s.npy" % u)),
                          online_ivector_period=10, frame_subsampling_factor=3)
            else:
                kw = dict(ivector=np.load(os.path.join(inputs, "ivector_utt_%s.npy" % u)).reshape(-1),
                          frame_subsampling_factor=1)
            ours = nnet3_compute(back, feats, frames_per_chunk=50, **kw)
            kaldi = np.load(os.path.join(HERE, "%s_%s_%s.npy" % (case["model"], run["tag"], u)))
            assert ours.shape == kaldi.shape
            err = float(np.abs(ours - kaldi).max())
            worst = max(worst, err)
            # the contract: 1e-3 on outputs of magnitude ~10, i.e. 1e-4 of the magnitude
            # (P3's perturbed outputs reach ~500)
            tol = 1e-4 * max(10.0, float(np.abs(kaldi).max()))
            assert err <= tol, (case["model"], run["tag"], u, err, tol)
            # and the perturbation mattered: the original model's output differs
    orig = load_kaldi_nnet3(os.path.join(IO, case["model"], "final.mdl"))
    u = case["runs"][0]["utts"][0]
    feats = np.load(os.path.join(inputs, "feats_%s.npy" % u))
    a = nnet3_compute(orig, feats, frames_per_chunk=50, frame_subsampling_factor=3,
                      online_ivectors=np.load(os.path.join(inputs, "ivector_online_%s.npy" % u)),
                      online_ivector_period=10)
    kaldi = np.load(os.path.join(HERE, "%s_%s_%s.npy" % (case["model"], case["runs"][0]["tag"], u)))
    assert np.abs(a - kaldi).max() > 100 * max(worst, 1e-5)
