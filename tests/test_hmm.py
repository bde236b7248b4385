"""Kaldi tree / topology / transition model I/O and construction vs Kaldi's files.

Fixtures: ``mono`` and ``biphone`` (tree, tree.txt, topo, trans.mdl, trans.mdl.txt,
show-transitions.txt, tree-info.txt, phones.txt), ``bench`` (binary tree + trans.mdl).
"""
import contextlib
import io
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path
from pkwrap.chain.tree import (chain_topology, chain_topology_text, full_biphone_tree,
                               make_transition_model, monophone_tree, read_phone_counts)
from pkwrap.kaldi.hmm import (KaldiFormatError, read_phone_symbols,
                              read_topology, read_transition_model, read_tree,
                              show_transitions, write_topology, write_transition_model,
                              write_tree)

SETUPS = ["mono", "biphone"]
REPO = Path(__file__).resolve().parent.parent


def _bytes(*parts):
    return fixture_path(*parts).read_bytes()


def _tree_info(setup):
    info = {}
    for line in fixture_path(setup, "tree-info.txt").read_text().splitlines():
        k, v = line.split()
        info[k] = int(v)
    return info


# ------------------------------------------------------------------------------- tree
@pytest.mark.parametrize("setup", SETUPS)
def test_tree_binary_text_roundtrip(setup):
    tree = read_tree(fixture_path(setup, "tree"))
    assert tree == read_tree(fixture_path(setup, "tree.txt"))
    # byte-identical to what copy-tree wrote, in both forms
    assert write_tree(tree) == _bytes(setup, "tree")
    assert write_tree(tree, binary=False) == _bytes(setup, "tree.txt")
    info = _tree_info(setup)
    assert tree.num_pdfs == info["num-pdfs"]
    assert tree.context_width == info["context-width"]
    assert tree.central_position == info["central-position"]


def test_bench_tree_roundtrip():
    tree = read_tree(fixture_path("bench", "tree"))
    assert write_tree(tree) == _bytes("bench", "tree")
    assert tree.num_pdfs == _tree_info("bench")["num-pdfs"] == 2051
    assert read_tree(io.BytesIO(write_tree(tree, binary=False))) == tree


def test_mono_tree_compute():
    tree = read_tree(fixture_path("mono", "tree"))
    for phone in range(1, 18):
        for pc in (0, 1):
            assert tree.compute([phone], pc) == 2 * (phone - 1) + pc
    assert tree.compute([18], 0) is None  # phone outside the table
    assert tree.compute([3], 2) is None   # pdf-class the topology does not have
    with pytest.raises(ValueError, match="context width"):
        tree.compute([1, 2], 0)


def _parse_show_transitions(setup):
    """(tstate, phone name, hmm state, fwd pdf, self-loop pdf, [(tid, p, is_self_loop)])"""
    out = []
    for line in fixture_path(setup, "show-transitions.txt").read_text().splitlines():
        m = re.match(r"Transition-state (\d+): phone = (\S+) hmm-state = (\d+) "
                     r"forward-pdf = (\d+) self-loop-pdf = (\d+)", line)
        if m:
            out.append(tuple(int(x) if i != 1 else x for i, x in enumerate(m.groups()))
                       + ([],))
            continue
        m = re.match(r" Transition-id = (\d+) p = (\S+) (\[self-loop\]|\[0 -> 1\])", line)
        assert m, line
        out[-1][-1].append((int(m.group(1)), float(m.group(2)), m.group(3) == "[self-loop]"))
    return out


def test_biphone_tree_compute_covers_transition_model():
    """Every (phone, forward pdf, self-loop pdf) Kaldi lists is what the tree computes in
    some left context, and nothing else (checked by brute force over contexts)."""
    tree = read_tree(fixture_path("biphone", "tree"))
    names = read_phone_symbols(fixture_path("biphone", "phones.txt"))
    ids = {v: k for k, v in names.items()}
    expected = {(ids[ph], f, s) for (_, ph, _, f, s, _) in _parse_show_transitions("biphone")}
    got = set()
    for phone in range(1, 20):
        for left in range(0, 20):
            got.add((phone, tree.compute([left, phone], 0), tree.compute([left, phone], 1)))
    assert got == expected


# ------------------------------------------------------------------------ topology
def test_topology_read_and_chain_topology():
    topo = read_topology(fixture_path("mono", "topo"))
    assert topo.phones == list(range(1, 18))
    entry = topo.topology_for_phone(5)
    assert [(s.forward_pdf_class, s.self_loop_pdf_class) for s in entry] == [(0, 1), (-1, -1)]
    assert entry[0].transitions == [(0, 0.5), (1, 0.5)]
    assert topo.num_pdf_classes(5) == 2 and not topo.is_hmm() and topo.min_length(5) == 1
    assert chain_topology(range(1, 18)) == topo
    assert chain_topology(range(1, 20)) == read_topology(fixture_path("biphone", "topo"))
    # binary and text forms round-trip
    for binary in (True, False):
        assert read_topology(io.BytesIO(write_topology(topo, binary=binary))) == topo
    with pytest.raises(ValueError, match="not in the topology"):
        topo.topology_for_phone(18)


# ----------------------------------------------------------------- transition model
@pytest.mark.parametrize("setup", SETUPS)
def test_transition_model_io(setup):
    tm = read_transition_model(fixture_path(setup, "trans.mdl"))
    assert tm == read_transition_model(fixture_path(setup, "trans.mdl.txt"))
    assert write_transition_model(tm) == _bytes(setup, "trans.mdl")
    assert write_transition_model(tm, binary=False) == _bytes(setup, "trans.mdl.txt")
    assert tm.topology == read_topology(fixture_path(setup, "topo"))
    # a model file with more after the transition model (GMM / nnet3 final.mdl)
    assert read_transition_model(_bytes(setup, "trans.mdl") + b"<Nnet3> rest") == tm
    names = read_phone_symbols(fixture_path(setup, "phones.txt"))
    assert show_transitions(tm, names) == fixture_path(setup, "show-transitions.txt").read_text()


@pytest.mark.parametrize("setup", SETUPS)
def test_transition_model_lookups(setup):
    tm = read_transition_model(fixture_path(setup, "trans.mdl"))
    names = read_phone_symbols(fixture_path(setup, "phones.txt"))
    ids = {v: k for k, v in names.items()}
    listing = _parse_show_transitions(setup)
    assert tm.num_transition_states == len(listing)
    assert tm.num_transition_ids == sum(len(x[-1]) for x in listing)
    assert tm.num_pdfs == _tree_info(setup)["num-pdfs"]
    pdf_to_tids = tm.pdf_to_transition_ids
    for tstate, ph, hmm_state, fpdf, spdf, tids in listing:
        phone = ids[ph]
        assert tm.tuple_to_transition_state(phone, hmm_state, fpdf, spdf) == tstate
        for idx, (tid, p, self_loop) in enumerate(tids):
            assert tm.tuple_to_transition_id(phone, hmm_state, fpdf, spdf, idx) == tid
            assert tm.transition_id_to_phone(tid) == phone
            assert tm.transition_id_to_hmm_state(tid) == hmm_state
            assert tm.transition_id_to_transition_state(tid) == tstate
            assert tm.transition_id_to_transition_state_array[tid] == tstate
            assert tm.is_self_loop(tid) == self_loop
            assert tm.is_self_loop_array[tid] == self_loop
            assert tm.is_final(tid) == (not self_loop)
            pdf = spdf if self_loop else fpdf
            assert tm.transition_id_to_pdf(tid) == pdf
            assert tm.transition_id_to_pdf_class(tid) == (1 if self_loop else 0)
            assert tid in pdf_to_tids[pdf]
            assert tm.transition_prob(tid) == pytest.approx(p, rel=1e-6)
        assert tm.self_loop_of(tstate) == tids[0][0]
    assert tm.transition_id_to_transition_state_array[0] == 0 and not tm.is_self_loop_array[0]
    assert len(tm.is_self_loop_array) == tm.num_transition_ids + 1
    tm.is_self_loop_array[:] = True  # a copy: the model's own table is untouched
    assert not tm.is_self_loop_array[0]
    counts = np.zeros(tm.num_transition_ids + 1)
    counts[1:] = 1.0
    assert tm.pdf_counts(counts).sum() == tm.num_transition_ids
    with pytest.raises(ValueError, match="out of range"):
        tm.transition_id_to_pdf(tm.num_transition_ids + 1)
    with pytest.raises(ValueError, match="not in the transition model"):
        tm.tuple_to_transition_state(1, 0, 10**6, 0)


@pytest.mark.parametrize("setup", SETUPS + ["bench"])
def test_transition_model_from_tree_equals_kaldi(setup):
    """TransitionModel(ctx_dep, topo) as Kaldi builds it."""
    tree = read_tree(fixture_path(setup, "tree"))
    topo = read_topology(fixture_path(setup, "topo"))
    tm = make_transition_model(tree, topo)
    assert tm == read_transition_model(fixture_path(setup, "trans.mdl"))
    assert write_transition_model(tm) == _bytes(setup, "trans.mdl")


# ---------------------------------------------------------- flat-start tree builders
def test_monophone_tree_equals_kaldi():
    topo = read_topology(fixture_path("mono", "topo"))
    tree = monophone_tree(topo)
    assert write_tree(tree) == _bytes("mono", "tree")
    # shared phones: one pdf pair for {2, 3}
    shared = monophone_tree(topo, shared_phones=[[1]] + [[2, 3]] + [[p] for p in range(4, 18)])
    assert shared.num_pdfs == 32
    assert shared.compute([2], 1) == shared.compute([3], 1) != shared.compute([4], 1)


def test_full_biphone_tree():
    topo = chain_topology(range(1, 6))
    tree = full_biphone_tree(topo)
    assert (tree.context_width, tree.central_position) == (2, 1)
    assert tree.num_pdfs == 5 * 6 * 2
    seen = set()
    for phone in range(1, 6):
        for left in range(0, 6):
            pair = (tree.compute([left, phone], 0), tree.compute([left, phone], 1))
            assert pair[1] == pair[0] + 1
            seen.add(pair)
        # allocated phone by phone, no-left-context first
        assert tree.compute([0, phone], 0) == 12 * (phone - 1)
    assert len(seen) == 30
    tm = make_transition_model(tree, topo)
    assert tm.num_pdfs == 60 and tm.num_transition_states == 30
    assert read_tree(io.BytesIO(write_tree(tree, binary=False))) == tree

    # silence (1) context-independent: one pdf pair, and as left context it shares the
    # utterance-start pdfs
    ci = full_biphone_tree(topo, ci_phones=[1])
    assert ci.num_pdfs == 2 + 4 * 5 * 2
    assert ci.compute([3, 1], 0) == ci.compute([0, 1], 0) == 0
    assert ci.compute([1, 2], 0) == ci.compute([0, 2], 0)
    assert ci.compute([3, 2], 0) != ci.compute([0, 2], 0)

    # counts: rare biphones back off to the phone's monophone pdfs, rare phones to one pair
    bi = {(l, r): 500 for l in range(0, 6) for r in range(1, 6)}
    bi[(2, 3)] = 3
    bi.update({(l, 5): 0 for l in range(0, 6)})
    small = full_biphone_tree(topo, biphone_counts=bi, mono_counts={3: 1000, 5: 1})
    mono3 = small.compute([2, 3], 0)
    assert mono3 not in {small.compute([l, 3], 0) for l in (0, 1, 3, 4, 5)}
    assert small.compute([1, 5], 0) == small.compute([4, 5], 0)


# ----------------------------------------------------------------------- bad input
def test_truncated_and_corrupt_files(tmp_path):
    data = _bytes("biphone", "tree")
    for cut in (1, 10, 40, len(data) // 2, len(data) - 3):
        p = tmp_path / ("tree_cut%d" % cut)
        p.write_bytes(data[:cut])
        with pytest.raises(KaldiFormatError, match=str(p)):
            read_tree(p)
    text = _bytes("biphone", "tree.txt")
    p = tmp_path / "tree_bad.txt"
    p.write_bytes(text.replace(b"SE 0", b"XE 0", 1))
    with pytest.raises(KaldiFormatError, match="EventMap"):
        read_tree(p)
    p.write_bytes(b"")
    with pytest.raises(KaldiFormatError, match="empty"):
        read_tree(p)
    mdl = _bytes("mono", "trans.mdl")
    p = tmp_path / "trans_cut.mdl"
    p.write_bytes(mdl[:len(mdl) - 40])
    with pytest.raises(KaldiFormatError, match="trans_cut.mdl"):
        read_transition_model(p)
    topo = fixture_path("mono", "topo").read_text()
    p = tmp_path / "topo"
    p.write_text(topo.replace("<State> 1 </State>", "<State> 2 </State>"))
    with pytest.raises(KaldiFormatError, match="in order"):
        read_topology(p)
    p.write_text(topo.replace("<Transition> 1 0.5 </State>", "</State>"))
    with pytest.raises(KaldiFormatError, match="input transitions|final|pdf-classes|topo"):
        read_topology(p)
    with pytest.raises(KaldiFormatError, match="cannot read"):
        read_tree(tmp_path / "missing")


def test_cli_flat_start_tree(tmp_path):
    """chain-gen-topo + chain-init-tree --type=mono reproduce Kaldi's mono topo/tree/model
    (the scripts' main() run in-process)."""
    assert chain_topology_text(range(2, 18), [1]) == fixture_path("mono", "topo").read_text()
    gen_topo = runpy.run_path(str(REPO / "scripts" / "chain-gen-topo"), run_name="cli")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        gen_topo["main"]([":".join(str(p) for p in range(2, 18)), "1"])
    (tmp_path / "topo").write_text(out.getvalue())
    init_tree = runpy.run_path(str(REPO / "scripts" / "chain-init-tree"), run_name="cli")
    init_tree["main"](["--type=mono", str(tmp_path / "topo"), str(tmp_path / "mdl"),
                       str(tmp_path / "tree")])
    assert (tmp_path / "mdl").read_bytes() == _bytes("mono", "trans.mdl")
    assert (tmp_path / "tree").read_bytes() == _bytes("mono", "tree")
    with pytest.raises(SystemExit, match="chain-init-tree: .*no-such-topo"):
        init_tree["main"](["--type=mono", str(tmp_path / "no-such-topo"), "m", "t"])
    counts = tmp_path / "counts"
    counts.write_text("0 2 150\n2 3 5\n3 40\n")
    assert read_phone_counts(counts) == ({(0, 2): 150, (2, 3): 5}, {3: 40})
    counts.write_text("0 2 x\n")
    with pytest.raises(ValueError, match="counts:1"):
        read_phone_counts(counts)


_HMM3_TOPO = """<Topology>
<TopologyEntry>
<ForPhones>
1 2 3 4
</ForPhones>
<State> 0 <PdfClass> 0 <Transition> 0 0.75 <Transition> 1 0.25 </State>
<State> 1 <PdfClass> 1 <Transition> 1 0.75 <Transition> 2 0.25 </State>
<State> 2 <PdfClass> 2 <Transition> 2 0.75 <Transition> 3 0.25 </State>
<State> 3 </State>
</TopologyEntry>
</Topology>
"""


def test_plain_hmm_topology_triples():
    """A classic 3-state HMM topology (forward = self-loop pdf-class): <PdfClass>,
    <Triples>; Kaldi's ComputeTuplesIsHmm path."""
    topo = read_topology(io.BytesIO(_HMM3_TOPO.encode()))
    assert topo.is_hmm() and topo.num_pdf_classes(2) == 3 and topo.min_length(2) == 3
    assert read_topology(io.BytesIO(write_topology(topo))) == topo
    tree = monophone_tree(topo)
    assert tree.num_pdfs == 12
    tm = make_transition_model(tree, topo)
    assert tm.num_transition_states == 12 and tm.num_transition_ids == 24
    assert tm.tuples[:3] == [(1, 0, 0, 0), (1, 1, 1, 1), (1, 2, 2, 2)]
    text = write_transition_model(tm, binary=False)
    assert b"<Triples> 12" in text and b"<PdfClass> 1" in text
    assert read_transition_model(io.BytesIO(write_transition_model(tm))) == tm
    back = read_transition_model(io.BytesIO(text))  # text keeps 7 digits, as Kaldi's
    assert back.tuples == tm.tuples and back.topology == tm.topology
    np.testing.assert_allclose(back.log_probs, tm.log_probs, rtol=1e-6)
    tid = tm.tuple_to_transition_id(2, 1, 4, 4, 1)  # phone 2, state 1 -> state 2
    assert (tm.transition_id_to_pdf(tid), tm.is_self_loop(tid), tm.is_final(tid)) == \
        (4, False, False)
    assert tm.transition_prob(tid) == pytest.approx(0.25)


def test_one_format_error_and_phone_symbols(tmp_path):
    """hmm's errors are kaldi.io's KaldiFormatError; phones.txt goes through SymbolTable and
    its errors name the file and line."""
    import pkwrap.kaldi.io
    from pkwrap.kaldi.symbol_table import SymbolTable, SymbolTableError

    assert KaldiFormatError is pkwrap.kaldi.io.KaldiFormatError
    path = fixture_path("mono", "phones.txt")
    names = read_phone_symbols(path)
    assert names == {i: s for s, i in SymbolTable.read(path)}
    assert names[0] == "<eps>" and list(names) == sorted(names)
    p = tmp_path / "phones.txt"
    for text, msg in [("<eps> 0\nSIL\n", r"phones.txt:2: expected 'symbol id'"),
                      ("<eps> 0\nSIL one\n", r"phones.txt:2: id 'one' is not an integer"),
                      ("<eps> 0\nSIL 0\n", r"id 0 used by both '<eps>' and 'SIL'"),
                      ("\n", "empty symbol table")]:
        p.write_text(text)
        with pytest.raises(SymbolTableError, match=msg):
            read_phone_symbols(p)
    assert issubclass(SymbolTableError, KaldiFormatError)
    # the table size of a TE node is a uint32 (size byte -4), as Kaldi writes it
    tree = _bytes("biphone", "tree")
    i = tree.index(b"TE ") + 8
    assert tree[i:i + 1] == b"\xfc"
    with pytest.raises(KaldiFormatError, match="expected uint32.*while reading a TE size"):
        read_tree(tree[:i] + b"\x04" + tree[i + 1:])
