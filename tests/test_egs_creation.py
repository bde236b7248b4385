"""Egs creation (nnet3-chain-get-egs, nnet3-chain-e2e-get-egs) and the on-the-fly Dataset.

Reference points: every eg of the fixtures' Kaldi archives, rebuilt from features +
supervision for the same chunk (key ``utt-<first frame>``): inputs (exact against the
uncompressed archive), indexes, deriv weights, supervision; the chunk counts of Kaldi's
UtteranceSplitter; the e2e archive (ours, compressed, must be byte-identical). Then a round
trip features -> Dataset -> collate -> ChainLoss -> backward.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import fixture_path, script_env  # noqa: E402

kaldifst = pytest.importorskip("kaldifst")

from pkwrap.chain.egs import (ChainEgsDataset, E2EChainEgsDataset,  # noqa: E402
                              ExampleGenerationConfig, UtteranceSplitter, collate_chain_egs,
                              extract_rows_with_padding, get_chain_egs, get_e2e_chain_eg)
from pkwrap.chain.supervision import (ErrorReport, SupervisionError,  # noqa: E402
                                      read_supervisions)
from pkwrap.kaldi.chain_egs import read_chain_egs, write_chain_egs  # noqa: E402
from pkwrap.kaldi.fst import read_fst  # noqa: E402
from pkwrap.kaldi.hmm import read_transition_model  # noqa: E402
from test_supervision import isomorphic  # noqa: E402

CFG = dict(left_context=10, right_context=10, num_frames=150, frame_subsampling_factor=3)


def _load(setup):
    d = fixture_path(setup)
    return (d, dict(read_supervisions("ark:%s" % (d / "data" / "supervision.ark"))),
            read_fst(str(d / "normalization.fst")), dict(np.load(d / "data" / "feats.npz")))


@pytest.mark.parametrize("setup,archive", [("mono", "cegs_compress_false"),
                                           ("mono", "cegs_compress_true"),
                                           ("biphone", "cegs_compress_true")])
def test_egs_equal_kaldi_for_the_same_chunks(setup, archive):
    d, sups, norm, feats = _load(setup)
    kaldi = list(read_chain_egs("ark:%s" % (d / "data" / (archive + ".ark"))))
    starts = {}
    for key, _ in kaldi:
        utt, first = key.rsplit("-", 1)
        starts.setdefault(utt, []).append(int(first))
    sp = UtteranceSplitter(ExampleGenerationConfig(**CFG))
    ours = {}
    for utt, firsts in starts.items():
        U = min(len(feats[utt]), 3 * sups[utt].frames_per_sequence)
        ours.update(get_chain_egs(utt, feats[utt], sups[utt], sp, norm,
                                  chunks=sp.chunks_at(U, sorted(firsts))))
    assert set(ours) == {k for k, _ in kaldi}
    for key, eg in kaldi:
        o = ours[key]
        x, y = eg.inputs["input"].numpy(), o.inputs["input"].numpy()
        assert x.shape == y.shape == (170, 40)
        # Kaldi's compressed inputs are within the 8-bit quantization of ours
        tol = 0.0 if "false" in archive else 0.05 * (np.abs(y).max() + 1)
        assert np.abs(x - y).max() <= tol, key
        assert np.array_equal(eg.input_indexes["input"], o.input_indexes["input"])
        assert np.array_equal(eg.output_indexes, o.output_indexes)
        assert np.allclose(eg.deriv_weights.numpy(), o.deriv_weights.numpy(), atol=1e-7), key
        assert o.supervision.weight == eg.supervision.weight == 1.0
        assert isomorphic(o.supervision.fst, eg.supervision.fst), key


def test_utterance_splitter_follows_kaldi():
    for setup in ("mono", "biphone"):
        d, sups, _, feats = _load(setup)
        kaldi_counts = {}
        for key, _ in read_chain_egs("ark:%s" % (d / "data" / "cegs_compress_true.ark")):
            u = key.rsplit("-", 1)[0]
            kaldi_counts[u] = kaldi_counts.get(u, 0) + 1
        for seed in (0, 1):
            sp = UtteranceSplitter(ExampleGenerationConfig(**CFG), seed=seed)
            for utt in sorted(feats):
                U = len(feats[utt])
                chunks = sp.get_chunks_for_utterance(U)
                assert len(chunks) == kaldi_counts.get(utt, 0), (setup, utt)
                cover = np.zeros((U + 2) // 3 + 1)
                for c in chunks:
                    assert c.num_frames == 150 and c.first_frame % 3 == 0
                    assert 0 <= c.first_frame and c.first_frame + 150 <= U + 2
                    assert (c.left_context, c.right_context) == (10, 10)
                    cover[c.first_frame // 3:c.first_frame // 3 + 50] += 1
                for c in chunks:
                    want = 1.0 / cover[c.first_frame // 3:c.first_frame // 3 + 50]
                    assert np.allclose(c.output_weights, want)
    # same seed, same chunks; other seeds move them (500 frames: 3 chunks + spare frames)
    a = [c.first_frame for c in UtteranceSplitter(ExampleGenerationConfig(**CFG), 3)
         .get_chunks_for_utterance(500)]
    b = [c.first_frame for c in UtteranceSplitter(ExampleGenerationConfig(**CFG), 3)
         .get_chunks_for_utterance(500)]
    others = {tuple(c.first_frame for c in UtteranceSplitter(ExampleGenerationConfig(**CFG), s)
                    .get_chunks_for_utterance(500)) for s in range(10)}
    assert a == b and len(others) > 1
    # Kaldi's stats line for the mono data (its log: 19 chunks, 10.8907% overlap)
    _, _, _, feats = _load("mono")
    sp = UtteranceSplitter(ExampleGenerationConfig(**CFG), seed=0)
    for utt in sorted(feats):
        sp.get_chunks_for_utterance(len(feats[utt]))
    assert sp.total_num_chunks == 19 and sp.total_input_frames == 2672
    assert "overlap between adjacent chunks was 10.8907%" in sp.summary()
    # alternative sizes: at most two of them per utterance
    cfg = ExampleGenerationConfig(num_frames="150,120,90", frame_subsampling_factor=3)
    sp = UtteranceSplitter(cfg, seed=0)
    for U in range(90, 1000, 37):
        sizes = [c.num_frames for c in sp.get_chunks_for_utterance(U)]
        assert sum(s != 150 for s in sizes) <= 2 and sizes


def test_padding_and_bad_lengths():
    f = np.arange(12, dtype=np.float32).reshape(6, 2)
    out = extract_rows_with_padding(f, -2, 10)
    assert np.array_equal(out[:, 0], [0, 0, 0, 2, 4, 6, 8, 10, 10, 10])
    d, sups, norm, feats = _load("biphone")
    sp = UtteranceSplitter(ExampleGenerationConfig(**CFG))
    with pytest.raises(SupervisionError) as e:  # 140 frames < 150: Kaldi skips it too
        get_chain_egs("utt06", feats["utt06"], sups["utt06"], sp, norm)
    assert e.value.reason == "too_short"
    with pytest.raises(SupervisionError) as e:
        get_chain_egs("utt00", feats["utt00"][:300], sups["utt00"], sp, norm)
    assert e.value.reason == "bad_length"
    bad = feats["utt00"].copy()
    bad[5, 3] = np.nan
    with pytest.raises(SupervisionError) as e:
        get_chain_egs("utt00", bad, sups["utt00"], sp, norm)
    assert e.value.reason == "bad_input"


def test_e2e_egs_byte_identical_to_kaldi(tmp_path):
    from pkwrap.decode.graph import compile_train_graph, from_kaldifst
    from pkwrap.kaldi.hmm import read_tree
    from pkwrap.chain.supervision import read_int_vectors
    mono, e2e = fixture_path("mono"), fixture_path("e2e")
    tree, tm = read_tree(str(mono / "tree")), read_transition_model(str(mono / "trans.mdl"))
    norm = read_fst(str(mono / "normalization.fst"))
    L = kaldifst.StdVectorFst.read(str(e2e / "L.fst"))
    text = dict(read_int_vectors("ark,t:%s" % (e2e / "text.int")))
    graphs = {k: from_kaldifst(compile_train_graph(L, w, tree, tm)) for k, w in text.items()}
    feats = dict(np.load(e2e / "feats.npz"))
    cfg = ExampleGenerationConfig(left_context=10, right_context=10, num_frames="150,210",
                                  frame_subsampling_factor=3)
    ours = [get_e2e_chain_eg(k, feats[k], graphs[k], tm, cfg, norm) for k in sorted(text)]
    write_chain_egs("ark:%s" % (tmp_path / "e2e.ark"), ours, compress=True)
    assert (tmp_path / "e2e.ark").read_bytes() == (e2e / "cegs_e2e.ark").read_bytes()
    # the Dataset gives the same egs; bad lengths / too many words are reported
    ds = E2EChainEgsDataset(feats, graphs, tm, norm, cfg)
    assert len(ds) == 4 and ds[3][0] == "e2e03"
    with pytest.raises(SupervisionError) as e:
        get_e2e_chain_eg("e2e00", feats["e2e00"][:120], graphs["e2e00"], tm, cfg, norm)
    assert e.value.reason == "bad_length"
    long_graph = from_kaldifst(compile_train_graph(L, list(range(1, 17)) * 4, tree, tm))
    with pytest.raises(SupervisionError) as e:
        get_e2e_chain_eg("e2e00", feats["e2e00"], long_graph, tm, cfg, norm)
    assert e.value.reason == "too_short"


def test_dataset_round_trip_to_chain_loss(tmp_path):
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    d, sups, norm, feats = _load("mono")
    cfg = ExampleGenerationConfig(**CFG)
    feats_bad = dict(feats)
    feats_bad["short"] = feats["utt00"][:100]
    sups_bad = dict(sups)
    sups_bad["short"] = sups["utt00"]  # 164 supervision frames for 100 feature frames
    ds = ChainEgsDataset(feats_bad, sups_bad, norm, cfg, seed=1)
    assert len(ds) == 19 and ds.report.counts == {"bad_length": 1}
    assert ds.report.keys() == ["short"] and ds.report.num_ok == 8
    first = [k for k, _ in (ds[i] for i in range(len(ds)))]
    ds.set_epoch(1)
    assert len(ds) == 19 and [k for k, _ in (ds[i] for i in range(len(ds)))] != first
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False,
                                         collate_fn=collate_chain_egs)
    keys, batch = next(iter(loader))
    S, T, P = 4, 50, 34
    assert len(keys) == S and batch.supervision.num_sequences == S
    assert batch.inputs["input"].shape == (S * 170, 40)
    # egs round-trip through a Kaldi archive
    write_chain_egs("ark:%s" % (tmp_path / "a.ark"), [(k, ds[i][1]) for i, k in
                                                      enumerate(keys)])
    back = list(read_chain_egs("ark:%s" % (tmp_path / "a.ark")))
    assert [k for k, _ in back] == keys
    assert torch.equal(back[0][1].inputs["input"], ds[0][1].inputs["input"])
    # ... and into the loss: objf of the minibatch = sum over its egs
    den = DenominatorGraph.from_fst(str(d / "den.fst"), P)
    loss_fn = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=0.1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S, T, P, generator=g, requires_grad=True)
    res = loss_fn(x, batch.supervision)
    res.loss.backward()
    assert res.ok and np.isfinite(res.objf) and res.objf < 0 and res.weight == S * T
    assert x.grad is not None and torch.isfinite(x.grad).all()
    parts = [loss_fn(x[i:i + 1].detach(), ds[i][1].supervision).objf for i in range(S)]
    assert abs(sum(parts) - res.objf) <= 1e-4 * abs(res.objf)


def test_command_line_programs(tmp_path):
    """The Kaldi-named scripts: chain-get-supervision and nnet3-chain-e2e-get-egs give
    Kaldi's archives byte for byte; nnet3-chain-get-egs gives Kaldi's number of egs."""
    import subprocess
    import sys
    from pathlib import Path
    from pkwrap.kaldi.table import TableWriter
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    mono, e2e = fixture_path("mono"), fixture_path("e2e")
    env = script_env()

    def run(*args):
        r = subprocess.run([sys.executable, str(scripts / args[0])] + [str(a) for a in args[1:]],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stderr

    for name, src in (("mono", mono / "data" / "feats.npz"), ("e2e", e2e / "feats.npz")):
        f = dict(np.load(src))
        with TableWriter("ark:%s" % (tmp_path / ("feats_%s.ark" % name)), "matrix") as w:
            for k in sorted(f):
                w.write_item(k, f[k])
    log = run("chain-get-supervision", "--left-tolerance=5", "--right-tolerance=5",
              "--frame-subsampling-factor=3", mono / "tree", mono / "trans.mdl",
              "ark,t:%s" % (mono / "data" / "phones_with_lengths.txt"),
              "ark:%s" % (tmp_path / "sup.ark"))
    assert "8 utterances, errors on 0" in log
    assert (tmp_path / "sup.ark").read_bytes() == \
        (mono / "data" / "supervision.ark").read_bytes()
    log = run("nnet3-chain-get-egs", "--srand=1", "--left-context=10", "--right-context=10",
              "--num-frames=150", "--frame-subsampling-factor=3", mono / "normalization.fst",
              "ark:%s" % (tmp_path / "feats_mono.ark"), "ark:%s" % (tmp_path / "sup.ark"),
              "ark:%s" % (tmp_path / "cegs.ark"))
    assert "wrote 19 egs" in log
    assert len(list(read_chain_egs("ark:%s" % (tmp_path / "cegs.ark")))) == 19
    run("compile-train-graphs", "--transition-scale=0", "--self-loop-scale=0", mono / "tree",
        mono / "trans.mdl", e2e / "L.fst", "ark,t:%s" % (e2e / "text.int"),
        "ark:%s" % (tmp_path / "graphs.fsts"))
    run("nnet3-chain-e2e-get-egs", "--num-frames=150,210", "--left-context=10",
        "--right-context=10", "--frame-subsampling-factor=3", mono / "normalization.fst",
        "ark:%s" % (tmp_path / "feats_e2e.ark"), "ark:%s" % (tmp_path / "graphs.fsts"),
        mono / "trans.mdl", "ark:%s" % (tmp_path / "e2e.ark"))
    assert (tmp_path / "e2e.ark").read_bytes() == (e2e / "cegs_e2e.ark").read_bytes()
