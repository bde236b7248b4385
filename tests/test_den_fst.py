"""den.fst / normalization.fst creation vs Kaldi's chain-make-den-fst.

Graphs are built from the fixtures' phone sequences (through our phone LM), tree and
transition model, then compared with Kaldi's files arc by arc (same state numbering and
arc order, weights to 1e-6; byte-identical files where the C library's expf is
loadable), and through the denominator log-prob and derivatives on the
fixture nnet outputs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixture_path, load_case, script_env
import pkwrap.chain.den_fst as den_fst_module
from pkwrap.chain.den_fst import make_den_fst, push_special
from pkwrap.chain.den_graph import DenominatorGraph
from pkwrap.chain.denominator import denominator_logprob
from pkwrap.chain.phone_lm import estimate_phone_lm, read_int_vector_archive
from pkwrap.chain.tree import chain_topology, full_biphone_tree, make_transition_model
from pkwrap.kaldi.fst import Fst, read_fst, write_fst
from pkwrap.kaldi.hmm import ContextDependency, read_transition_model, read_tree

REPO = Path(__file__).resolve().parent.parent


def _lm_opts(setup):
    man = json.loads(fixture_path("manifest.json").read_text())
    opts = dict(x.lstrip("-").split("=") for x in man["setups"][setup]["lm_opts"].split())
    return (int(opts["ngram-order"]), int(opts["no-prune-ngram-order"]),
            int(opts["num-extra-lm-states"]))


_GRAPHS = {}


def _graphs(setup):
    """(den, normalization) built from lm_phone_seqs.txt, tree and trans.mdl (cached)."""
    if setup not in _GRAPHS:
        seqs = read_int_vector_archive(fixture_path(setup, "lm_phone_seqs.txt"))
        lm = estimate_phone_lm(seqs, *_lm_opts(setup))
        tree = read_tree(fixture_path(setup, "tree"))
        tm = read_transition_model(fixture_path(setup, "trans.mdl"))
        _GRAPHS[setup] = make_den_fst(tree, tm, lm)
    return _GRAPHS[setup]


def assert_same_fst(a: Fst, b: Fst, atol=1e-6):
    """Same states, numbering, arcs and arc order; weights to ``atol``."""
    assert (a.num_states, a.num_arcs, a.start) == (b.num_states, b.num_arcs, b.start)
    np.testing.assert_array_equal(a.state_offsets, b.state_offsets)
    np.testing.assert_array_equal(a.ilabel, b.ilabel)
    np.testing.assert_array_equal(a.olabel, b.olabel)
    np.testing.assert_array_equal(a.nextstate, b.nextstate)
    np.testing.assert_allclose(a.weight, b.weight, rtol=0, atol=atol)
    np.testing.assert_array_equal(np.isinf(a.final), np.isinf(b.final))
    fin = np.isfinite(a.final)
    np.testing.assert_allclose(a.final[fin], b.final[fin], rtol=0, atol=atol)


@pytest.mark.parametrize("setup", ["mono", "biphone"])
def test_den_and_normalization_fst_equal_kaldi(setup, tmp_path):
    den, norm = _graphs(setup)
    assert_same_fst(den, read_fst(fixture_path(setup, "den.fst")))
    assert_same_fst(norm, read_fst(fixture_path(setup, "normalization.fst")))
    if den_fst_module._LIBM_EXPF:  # with the C library's expf: the very same bytes
        for fst, name in ((den, "den.fst"), (norm, "normalization.fst")):
            out = tmp_path / name
            write_fst(fst, str(out))
            assert out.read_bytes() == fixture_path(setup, name).read_bytes()
    num_pdfs = read_tree(fixture_path(setup, "tree")).num_pdfs
    init = DenominatorGraph.from_fst(den, num_pdfs).initial_probs
    np.testing.assert_allclose(init, np.load(fixture_path(setup, "den_initial_probs.npy")),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", ["mono_single_leaky0.1", "biphone_single_leaky0.1",
                                  "biphone_merged4_leaky1e-05_l20_xent0"])
def test_den_logprob_and_deriv_equal_kaldi(case):
    """Our den.fst gives Kaldi's denominator log-prob and derivatives on the fixture X."""
    c = load_case(case)
    setup = case.split("_")[0]
    den, _ = _graphs(setup)
    S, T, P = c["num_sequences"], c["frames_per_sequence"], c["num_pdfs"]
    X = np.load(c["inputs"]["nnet_output"]).astype(np.float32)  # rows t*S + s
    out = torch.tensor(X.reshape(T, S, P).transpose(1, 0, 2).copy(), requires_grad=True)
    graph = DenominatorGraph.from_fst(den, P)
    lp = denominator_logprob(graph, out, c["options"]["leaky_hmm_coefficient"])
    lp.backward()
    ref = c["outputs"]["den_logprob"]
    assert abs(lp.item() - ref) <= 1e-4 * abs(ref)
    deriv = out.grad.numpy().transpose(1, 0, 2).reshape(T * S, P)
    ref_deriv = np.load(c["arrays"]["den_deriv"])
    assert np.abs(deriv - ref_deriv).max() <= 2e-4 * np.abs(ref_deriv).max()


def test_bench_den_fst_equals_kaldi():
    """The realistic graph: 2051 pdfs, 4-gram LM (Kaldi's phone_lm.fst as input)."""
    tree = read_tree(fixture_path("bench", "tree"))
    tm = read_transition_model(fixture_path("bench", "trans.mdl"))
    lm = read_fst(str(fixture_path("bench", "phone_lm.fst.gz")))
    den, norm = make_den_fst(tree, tm, lm)
    assert_same_fst(den, read_fst(fixture_path("bench", "den.fst")))
    assert_same_fst(norm, read_fst(str(fixture_path("bench", "normalization.fst.gz"))))


def test_cli_chain_make_den_fst(tmp_path):
    d = fixture_path("mono")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "chain-make-den-fst"),
                        str(d / "tree"), str(d / "trans.mdl"), str(d / "phone_lm.fst"),
                        str(tmp_path / "den.fst"), str(tmp_path / "norm.fst")],
                       capture_output=True, text=True, env=script_env())
    assert r.returncode == 0, r.stderr
    assert_same_fst(read_fst(tmp_path / "den.fst"), read_fst(d / "den.fst"))
    assert_same_fst(read_fst(tmp_path / "norm.fst"), read_fst(d / "normalization.fst"))


def test_push_special_equalizes_state_sums():
    lm = read_fst(fixture_path("mono", "phone_lm.fst"))
    pushed = push_special(lm)
    p = np.exp(-pushed.weight.astype(np.float64))
    tot = np.bincount(pushed.src, weights=p, minlength=pushed.num_states)
    tot += np.exp(-pushed.final.astype(np.float64))
    # every state's outgoing probability (arcs + final) is the same lambda
    assert tot.max() / tot.min() < 1 + 1e-4


def test_flat_start_full_biphone_den_fst():
    """Flat start without alignments: chain topology + full biphone tree + phone LM."""
    seqs = [s for _, s in read_int_vector_archive(fixture_path("mono", "lm_phone_seqs.txt"))]
    topo = chain_topology(range(1, 18))
    tree = full_biphone_tree(topo)
    tm = make_transition_model(tree, topo)
    lm = estimate_phone_lm(seqs, 3, 2, 50)
    den, norm = make_den_fst(tree, tm, lm)
    assert den.is_acceptor() and not den.has_epsilons()
    seen = {(0, s[0]) for s in seqs} | {(a, b) for s in seqs for a, b in zip(s, s[1:])}
    expected = {tree.compute([l, p], c) + 1 for l, p in seen for c in (0, 1)}
    assert set(den.ilabel.tolist()) == expected
    graph = DenominatorGraph.from_fst(den, tm.num_pdfs)
    assert abs(float(graph.initial_probs.sum()) - 1.0) < 1e-5
    x = torch.randn(2, 20, tm.num_pdfs, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(denominator_logprob(graph, x, 0.1))
    assert norm.num_states == den.num_states and not norm.has_epsilons()


def test_right_context_tree_path():
    """A triphone tree (N=3, P=1) that ignores the right phone exercises the
    subsequential-symbol / context-epsilon path; it must give the biphone graph's
    denominator (the graphs differ in size, the distribution over pdf sequences not)."""
    tree = read_tree(fixture_path("biphone", "tree"))
    tm = read_transition_model(fixture_path("biphone", "trans.mdl"))
    lm = read_fst(fixture_path("biphone", "phone_lm.fst"))
    tri = ContextDependency(3, 1, tree.to_pdf)
    tm3 = make_transition_model(tri, tm.topology)
    assert tm3 == tm
    den3, norm3 = make_den_fst(tri, tm3, lm)
    den, _ = _graphs("biphone")
    x = 2 * torch.randn(2, 50, tm.num_pdfs, generator=torch.Generator().manual_seed(0))
    lp = [denominator_logprob(DenominatorGraph.from_fst(d, tm.num_pdfs), x, 0.1).item()
          for d in (den, den3)]
    assert abs(lp[0] - lp[1]) <= 1e-4 * abs(lp[0])
    assert norm3.num_states == den3.num_states


def test_bad_input():
    tree = read_tree(fixture_path("mono", "tree"))
    tm = read_transition_model(fixture_path("mono", "trans.mdl"))
    lm = read_fst(fixture_path("biphone", "phone_lm.fst"))  # has phones 18 and 19
    with pytest.raises(ValueError, match="not a phone of the transition model"):
        make_den_fst(tree, tm, lm)
    btm = read_transition_model(fixture_path("biphone", "trans.mdl"))
    with pytest.raises(ValueError, match="tree has no pdf"):
        make_den_fst(tree, btm, lm)
    empty = Fst.from_arcs(0, -1, [])
    with pytest.raises(ValueError, match="empty"):
        make_den_fst(tree, tm, empty)


def test_three_state_hmm_den_fst():
    """Multi-state HMMs (a plain 3-state topology): every phone emits >= 3 frames, so the
    shortest path through the den graph has 3 arcs per phone."""
    from test_hmm import _HMM3_TOPO
    import io
    from pkwrap.chain.tree import monophone_tree
    from pkwrap.kaldi.hmm import read_topology
    topo = read_topology(io.BytesIO(_HMM3_TOPO.encode()))
    tree = monophone_tree(topo)
    tm = make_transition_model(tree, topo)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 5, size=rng.integers(1, 6)).tolist() for _ in range(50)]
    den, norm = make_den_fst(tree, tm, estimate_phone_lm(seqs, 2, 1, 10))
    assert set(den.ilabel.tolist()) == set(range(1, 13))
    # pdf classes follow each other 0 -> 1 -> 2 within a phone
    pdf = den.ilabel - 1
    nxt_pdfs = {}
    for a in range(den.num_arcs):
        nxt_pdfs.setdefault(int(pdf[a]), set())
    for s in range(den.num_states):
        into = set(int(p) for p in pdf[den.nextstate == s])
        out = set(int(p) for p in pdf[den.state_offsets[s]:den.state_offsets[s + 1]])
        for p in into:
            nxt_pdfs[p] |= out
    for p, nxt in nxt_pdfs.items():
        if p % 3 != 2:  # inside a phone: only itself or the next pdf-class
            assert nxt <= {p, p + 1}
    graph = DenominatorGraph.from_fst(den, tm.num_pdfs)
    x = torch.zeros(1, 12, tm.num_pdfs)
    assert torch.isfinite(denominator_logprob(graph, x, 1e-5))
