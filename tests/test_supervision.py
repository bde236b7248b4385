"""Numerator supervision: chain-get-supervision, chunk normalization, e2e supervision.

Reference points (Kaldi fixtures): ``{mono,biphone}/data/supervision.ark`` (our archive must
be byte-identical), the normalized supervision of every eg in ``cegs_compress_true.ark``
(same FST up to state numbering, weights within 1e-4) and the numerator log-probs that
Kaldi computed on those egs (``cases/*``), plus ``e2e/cegs_e2e.ark`` (FSTs state for state).
Bad input must raise :class:`SupervisionError` with a reason and be counted in reports.
"""
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import FIXTURES, fixture_path, load_case  # noqa: E402

kaldifst = pytest.importorskip("kaldifst")

from pkwrap.chain.egs import ExampleGenerationConfig, UtteranceSplitter, get_chain_egs  # noqa
from pkwrap.chain.numerator import numerator_forward_backward  # noqa: E402
from pkwrap.chain.supervision import (ErrorReport, SupervisionError,  # noqa: E402
                                      SupervisionOptions, SupervisionSplitter,
                                      add_weight_to_supervision,
                                      alignment_to_proto_supervision,
                                      alignment_to_supervision, fst_state_times,
                                      get_supervisions, min_path_length,
                                      read_int_vectors, read_phones_with_lengths,
                                      read_supervisions, sort_breadth_first,
                                      training_graph_to_supervision_e2e, write_supervisions)
from pkwrap.kaldi.chain_egs import read_chain_egs  # noqa: E402
from pkwrap.kaldi.fst import Fst, read_fst  # noqa: E402
from pkwrap.kaldi.hmm import read_transition_model, read_tree  # noqa: E402

OPTS = SupervisionOptions(left_tolerance=5, right_tolerance=5, frame_subsampling_factor=3)


@pytest.fixture(scope="module", params=["mono", "biphone"])
def setup(request):
    d = fixture_path(request.param)
    return dict(name=request.param, dir=d, tree=read_tree(str(d / "tree")),
                tm=read_transition_model(str(d / "trans.mdl")),
                norm=read_fst(str(d / "normalization.fst")),
                kaldi_sups=dict(read_supervisions("ark:%s" % (d / "data" / "supervision.ark"))))


def isomorphic(a: Fst, b: Fst, atol: float = 1e-4):
    """Deterministic acceptors equal up to state numbering (weights within atol)."""
    if a.num_states != b.num_states or a.num_arcs != b.num_arcs:
        return False
    m = {a.start: b.start}
    todo = [a.start]
    while todo:
        s = todo.pop()
        t = m[s]
        fa, fb = float(a.final[s]), float(b.final[t])
        if np.isfinite(fa) != np.isfinite(fb) or (np.isfinite(fa) and abs(fa - fb) > atol):
            return False
        xa, xb = sorted(a.arcs(s)), sorted(b.arcs(t))
        if len(xa) != len(xb) or len({x[0] for x in xa}) != len(xa):
            return False
        for (i1, _, w1, d1), (i2, _, w2, d2) in zip(xa, xb):
            if i1 != i2 or abs(w1 - w2) > atol:
                return False
            if d1 in m:
                if m[d1] != d2:
                    return False
            else:
                m[d1] = d2
                todo.append(d1)
    return True


# ------------------------------------------------------------------ chain-get-supervision
def test_supervision_equals_kaldi(setup, tmp_path):
    d = setup["dir"]
    report = ErrorReport()
    ours = list(get_supervisions(read_phones_with_lengths(
        "ark,t:%s" % (d / "data" / "phones_with_lengths.txt")), setup["tree"], setup["tm"],
        OPTS, report))
    assert report.num_ok == 8 and report.num_errors == 0
    kaldi = setup["kaldi_sups"]
    assert [k for k, _ in ours] == list(kaldi)
    for key, sup in ours:
        ref = kaldi[key]
        assert (sup.weight, sup.num_sequences, sup.frames_per_sequence, sup.label_dim) == \
            (ref.weight, ref.num_sequences, ref.frames_per_sequence, ref.label_dim)
        for attr in ("state_offsets", "ilabel", "olabel", "weight", "nextstate", "final"):
            assert np.array_equal(getattr(sup.fst, attr), getattr(ref.fst, attr)), (key, attr)
    # the archives are byte-identical, binary and text
    write_supervisions("ark:%s" % (tmp_path / "s.ark"), ours)
    assert (tmp_path / "s.ark").read_bytes() == (d / "data" / "supervision.ark").read_bytes()
    write_supervisions("ark,t:%s" % (tmp_path / "s.txt"), ours)
    assert (tmp_path / "s.txt").read_bytes() == (d / "data" / "supervision.txt").read_bytes()


def test_proto_supervision_follows_the_definition():
    # phones 3 (len 4), 5 (len 2), 7 (len 6): T=12, f=3 -> 4 output frames
    opts = SupervisionOptions(left_tolerance=1, right_tolerance=2, frame_subsampling_factor=3)
    p = alignment_to_proto_supervision([3, 5, 7], [4, 2, 6], opts)
    # by hand: phone 3 on input frames [0, 4+2) -> output frames [0, 2); phone 5 on
    # [4-1, 6+2) -> [1, 3); phone 7 on [6-1, 12) -> [2, 4)
    assert p.allowed_phones == [[3], [3, 5], [5, 7], [7]]
    assert p.phones == [3, 5, 7] and p.num_frames == 4
    with pytest.raises(ValueError):
        SupervisionOptions(0, 0, 3).check()  # 0 + 0 + 1 < 3


def test_state_times_and_bfs_sort(setup):
    sup = next(iter(setup["kaldi_sups"].values()))
    times, total = fst_state_times(sup.fst)
    assert total == sup.frames_per_sequence and np.all(np.diff(times) >= 0)
    # renumber the states randomly: the BFS sort restores Kaldi's numbering exactly
    f = sup.fst
    rng = np.random.default_rng(0)
    perm = np.concatenate([[0], 1 + rng.permutation(f.num_states - 1)])
    arcs = [(int(perm[s]), int(i), int(o), float(w), int(perm[d]))
            for s, i, o, w, d in zip(f.src, f.ilabel, f.olabel, f.weight, f.nextstate)]
    shuffled = Fst.from_arcs(f.num_states, 0, arcs, {int(perm[s]): 0.0 for s in
                                                   np.nonzero(np.isfinite(f.final))[0]})
    assert sort_breadth_first(shuffled) == f


# ------------------------------------------------------------------ chunks + normalization
def test_normalized_chunks_equal_kaldi_egs(setup):
    d = setup["dir"]
    n = 0
    for key, eg in read_chain_egs("ark:%s" % (d / "data" / "cegs_compress_true.ark")):
        utt, first = key.rsplit("-", 1)
        part = SupervisionSplitter(setup["kaldi_sups"][utt]).get_frame_range(int(first) // 3, 50)
        assert part.fst.has_epsilons()  # the splitter's pre-start state, as Kaldi's
        norm = add_weight_to_supervision(part, setup["norm"], key)
        assert not norm.fst.has_epsilons()
        assert norm.frames_per_sequence == eg.supervision.frames_per_sequence == 50
        assert isomorphic(norm.fst, eg.supervision.fst), key
        fst_state_times(norm.fst)  # sorted by time, as Kaldi requires
        n += 1
    assert n == {"mono": 19, "biphone": 18}[setup["name"]]


def _our_eg_for(case):
    """Rebuild the (single) eg of a Kaldi case from features + our own supervision."""
    d = FIXTURES / case["inputs"]["egs"].relative_to(FIXTURES).parts[0]
    tree, tm = read_tree(str(d / "tree")), read_transition_model(str(d / "trans.mdl"))
    norm = read_fst(str(d / "normalization.fst"))
    key = case["inputs"]["eg_key"]
    utt, first = key.rsplit("-", 1)
    ali = dict(read_phones_with_lengths("ark,t:%s" % (d / "data" / "phones_with_lengths.txt")))
    sup = alignment_to_supervision(ali[utt], tree, tm, OPTS, utt)
    feats = np.load(d / "data" / "feats.npz")[utt]
    cfg = ExampleGenerationConfig(left_context=10, right_context=10, num_frames=150,
                                  frame_subsampling_factor=3)
    sp = UtteranceSplitter(cfg)
    kaldi_keys = [k for k, _ in read_chain_egs("ark:%s" % case["inputs"]["egs"])
                  if k.rsplit("-", 1)[0] == utt]
    starts = sorted(int(k.rsplit("-", 1)[1]) for k in kaldi_keys)
    chunks = sp.chunks_at(min(len(feats), 3 * sup.frames_per_sequence), starts)
    egs = dict(get_chain_egs(utt, feats, sup, sp, norm, chunks=chunks))
    return egs[key]


@pytest.mark.parametrize("name", ["mono_single_leaky0.1", "biphone_single_leaky0.1"])
def test_numerator_logprob_equals_kaldi(name):
    case = load_case(name)
    eg = _our_eg_for(case)
    T, P = case["frames_per_sequence"], case["num_pdfs"]
    x = torch.from_numpy(np.load(case["inputs"]["nnet_output"]).reshape(1, T, P))
    lp, ok = numerator_forward_backward(eg.supervision, x)
    want = case["outputs"]["num_logprob_weighted"]
    assert ok and abs(lp - want) <= 1e-4 * abs(want)


def test_unseen_ngram_gives_empty_numerator_report():
    d = fixture_path("mono")
    tree, tm = read_tree(str(d / "tree")), read_transition_model(str(d / "trans.mdl"))
    norm = read_fst(str(d / "normalization.fst"))
    seen = set()
    for _, seq in read_int_vectors("ark,t:%s" % (d / "lm_phone_seqs.txt")):
        seen.update(zip(seq[:-1], seq[1:]))
    phones = range(2, 18)
    a, b = next((a, b) for a in phones for b in phones if (a, b) not in seen)
    c = next(c for c in phones if (a, c) in seen and (c, 1) in seen and (1, a) in seen)
    good = alignment_to_supervision([(1, 15), (a, 9), (c, 9), (1, 15)], tree, tm, OPTS, "good")
    add_weight_to_supervision(SupervisionSplitter(good).get_frame_range(0, 16), norm, "good")
    bad = alignment_to_supervision([(1, 15), (a, 9), (b, 9), (1, 15)], tree, tm, OPTS, "bad")
    with pytest.raises(SupervisionError) as e:
        add_weight_to_supervision(SupervisionSplitter(bad).get_frame_range(0, 16), norm, "bad-0")
    assert e.value.reason == "empty_numerator" and e.value.key == "bad-0"
    # through egs creation: the chunk is reported, counted and skipped, never written
    cfg = ExampleGenerationConfig(num_frames=48, frame_subsampling_factor=3)
    report = ErrorReport()
    feats = np.zeros((48, 4), np.float32)
    assert get_chain_egs("bad", feats, bad, UtteranceSplitter(cfg), norm, report=report) == []
    assert report.counts == {"empty_numerator": 1} and report.keys() == ["bad-0"]
    assert len(get_chain_egs("good", feats, good, UtteranceSplitter(cfg), norm)) == 1


def test_bad_alignments_are_reported_per_utterance():
    d = fixture_path("mono")
    tree, tm = read_tree(str(d / "tree")), read_transition_model(str(d / "trans.mdl"))
    alis = [("ok", [(1, 15), (5, 9), (1, 12)]),
            ("unknown", [(1, 15), (99, 9), (1, 12)]),   # phone 99 not in the model
            ("empty", []),
            ("short", [(2 + i % 2, 1) for i in range(20)]),  # 20 phones, 7 output frames
            ("zero", [(1, 15), (5, 0)])]
    report = ErrorReport()
    out = dict(get_supervisions(alis, tree, tm, OPTS, report))
    assert list(out) == ["ok"]
    assert report.num_ok == 1 and report.num_errors == 4
    assert report.counts == {"unknown_phone": 1, "empty_alignment": 1, "too_short": 1,
                             "bad_input": 1}
    assert report.keys("too_short") == ["short"]
    s = report.summary()
    assert "4 of 5 utterances failed" in s and "unknown_phone=1 (unknown)" in s


# ------------------------------------------------------------------ end-to-end
def test_e2e_supervision_equals_kaldi_egs():
    from pkwrap.decode.graph import from_kaldifst
    mono, e2e = fixture_path("mono"), fixture_path("e2e")
    tm = read_transition_model(str(mono / "trans.mdl"))
    norm = read_fst(str(mono / "normalization.fst"))
    graphs = {k: from_kaldifst(kaldifst.StdVectorFst(f)) for k, f in
              kaldifst.SequentialVectorFstReader("ark:%s" % (e2e / "graphs.fsts"))}
    egs = dict(read_chain_egs("ark:%s" % (e2e / "cegs_e2e.ark")))
    for key, g in graphs.items():
        T = egs[key].supervision.frames_per_sequence
        sup = training_graph_to_supervision_e2e(g, tm, T, key)
        assert sup.e2e and sup.label_dim == 34 and sup.weight == 1.0
        assert 0 < min_path_length(sup.e2e_fsts[0]) <= T
        out = add_weight_to_supervision(sup, norm, key).e2e_fsts[0]
        ref = egs[key].supervision.e2e_fsts[0]
        for attr in ("state_offsets", "ilabel", "nextstate", "weight", "final"):
            assert np.array_equal(getattr(out, attr), getattr(ref, attr)), (key, attr)
    with pytest.raises(SupervisionError) as e:
        training_graph_to_supervision_e2e(Fst.from_arcs(0, -1, []), tm, 50, "nothing")
    assert e.value.reason == "empty_transcript"
