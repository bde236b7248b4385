"""pkwrap.decode: L, G, HCLG, mapped decoding, WER; scripts mkgraph / latgen-faster-mapped /
compute-wer.

Reference points: Kaldi's ``compile-train-graphs`` output (tests/fixtures/kaldi/e2e/graphs.fsts)
must equal our HCLG arc for arc; synthetic log-likelihoods that follow a known path through
the HMMs must decode to exactly that word sequence and alignment.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_path

kaldifst = pytest.importorskip("kaldifst")
pytest.importorskip("kaldi_decoder")

from pkwrap.decode import (DecodeError, DecodingGraph, GraphError, LexiconError,  # noqa: E402
                           ScoringError, SymbolTable, add_disambig_symbols,
                           build_decoding_graph, build_decoding_graph_from_lang, compose_lg,
                           compile_train_graph, compute_wer, decode, from_kaldifst,
                           make_arpa_grammar, make_lexicon_fst, make_phone_table,
                           make_word_loop_grammar, make_word_table, read_lexicon,
                           read_lexiconp, read_loglikes, write_int_vectors, write_lang_dir,
                           write_lattice_ark, write_loglikes_ark)
from pkwrap.kaldi.hmm import read_transition_model, read_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")

# made-up digit lexicon over the fixture phones P1..P16 (SIL is the optional silence);
# "four" has a pronunciation that is a prefix of another one, "five"/"fife" are homophones.
DIGIT_LEXICON = """\
zero P1 P2 P3
one P4 P5
two P6 P7
three P8 P2 P9
four P10 P11
four P10 P11 P3
five P12 P13 P14
fife P12 P13 P14
six P15 P16
seven P5 P6 P4
"""
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _setup(name):
    d = fixture_path(name)
    return read_tree(d / "tree"), read_transition_model(d / "trans.mdl"), \
        SymbolTable.read(d / "phones.txt")


@pytest.fixture(scope="module")
def mono():
    return _setup("mono")


@pytest.fixture(scope="module")
def biphone():
    return _setup("biphone")


@pytest.fixture(scope="module")
def lexicon(tmp_path_factory):
    p = tmp_path_factory.mktemp("lex") / "lexicon.txt"
    p.write_text(DIGIT_LEXICON)
    return read_lexicon(p)


@pytest.fixture(scope="module")
def digit_graph(mono, lexicon):
    tree, tm, phones = mono
    return build_decoding_graph(lexicon, phones, tree, tm, grammar=DIGITS + ["fife"],
                                sil_phone="SIL", sil_prob=0.5)


def synth_loglikes(tree, phones, phone_seq, frames_per_phone, seed=0, margin=8.0):
    """Log-likelihoods [T][P] whose best path goes through ``phone_seq``: each phone
    spends its frames in its single HMM state, forward pdf first (reordered topology),
    then its self-loop pdf; the right pdf gets 0, the others -margin - noise."""
    rng = np.random.default_rng(seed)
    rows, pdfs = [], []
    prev = 0
    for k, (p, n) in enumerate(zip(phone_seq, frames_per_phone)):
        ph = phones[p]
        window = [ph] if tree.context_width == 1 else [prev, ph]
        for f in range(n):
            pdf = tree.compute(window, 0 if f == 0 else 1)
            r = -margin - rng.random(tree.num_pdfs).astype(np.float32)
            r[pdf] = 0.0
            rows.append(r)
            pdfs.append(pdf)
        prev = ph
    return np.stack(rows).astype(np.float32), pdfs


def phones_of(lexicon, words, sil_after=()):
    pron = {}
    for w, _, p in lexicon:
        pron.setdefault(w, p)
    seq = []
    for i, w in enumerate(words):
        seq += pron[w]
        if i in sil_after:
            seq.append("SIL")
    return seq


# ------------------------------------------------------------------------------- lexicon

def test_disambig_symbols_like_add_lex_disambig(lexicon):
    lex, ndis = add_disambig_symbols(lexicon)
    got = {(w, " ".join(p)) for w, _, p in lex}
    # 'four P10 P11' is a prefix of 'four P10 P11 P3'; five/fife share a pronunciation
    assert ("four", "P10 P11 #1") in got and ("four", "P10 P11 P3") in got
    assert ("five", "P12 P13 P14 #1") in got and ("fife", "P12 P13 P14 #2") in got
    assert ("zero", "P1 P2 P3") in got and ndis == 2


def test_lexicon_fst_matches_make_lexicon_fst_py(mono):
    """Arcs of make_lexicon_fst.py --sil-prob=0.25 for a 2-word lexicon, written by hand."""
    _, _, phones = mono
    words = make_word_table(["A", "B"])
    lex = [("A", 1.0, ["P1", "P2"]), ("B", 0.5, ["P3"])]
    L = from_kaldifst(make_lexicon_fst(lex, phones, words, sil_phone="SIL", sil_prob=0.25))
    s, ns, lp = -np.log(0.25), -np.log(0.75), -np.log(0.5)
    sil, p1, p2, p3 = phones["SIL"], phones["P1"], phones["P2"], phones["P3"]
    A, B = words["A"], words["B"]
    want = {(0, 0, 0, ns, 1), (0, 0, 0, s, 2), (2, sil, 0, 0.0, 1),
            (1, p1, A, 0.0, 3), (3, p2, 0, ns, 1), (3, p2, 0, s, 2),
            (1, p3, B, lp + ns, 1), (1, p3, B, lp + s, 2)}
    got = {(int(a), int(i), int(o), float(w), int(d)) for a, i, o, w, d in
           zip(L.src, L.ilabel, L.olabel, L.weight, L.nextstate)}
    assert {g[:3] + g[4:] for g in got} == {x[:3] + x[4:] for x in want}
    wmap = {g[:3] + g[4:]: g[3] for g in got}
    for x in want:
        assert abs(wmap[x[:3] + x[4:]] - x[3]) < 1e-5
    assert L.start == 0 and np.isfinite(L.final).tolist() == [False, True, False, False]
    # no optional silence: one loop state, start and final
    L0 = from_kaldifst(make_lexicon_fst(lex, phones, words, sil_prob=0.0))
    assert L0.num_states == 2 and L0.final[0] == 0 and L0.num_arcs == 3


def test_train_graph_equals_kaldi_compile_train_graphs(mono):
    """compile-train-graphs --transition-scale=0 --self-loop-scale=0 on the e2e fixtures."""
    tree, tm, _ = mono
    e2e = fixture_path("e2e")
    L = kaldifst.StdVectorFst.read(str(e2e / "L.fst"))
    kaldi = {k: from_kaldifst(kaldifst.StdVectorFst(f)) for k, f in
             kaldifst.SequentialVectorFstReader("ark:%s" % (e2e / "graphs.fsts"))}
    lines = [ln.split() for ln in (e2e / "text.int").read_text().splitlines() if ln.strip()]
    assert len(lines) == len(kaldi) == 4
    for utt, *ws in lines:
        ours = from_kaldifst(compile_train_graph(L, [int(w) for w in ws], tree, tm))
        assert ours == kaldi[utt], utt


def _total_prob(kfst):
    """Sum over all successful paths of exp(-weight): solve alpha = e_start + alpha A."""
    f = from_kaldifst(kfst)
    A = np.zeros((f.num_states, f.num_states))
    np.add.at(A, (f.src, f.nextstate), np.exp(-f.weight.astype(np.float64)))
    e = np.zeros(f.num_states)
    e[f.start] = 1.0
    alpha = np.linalg.solve(np.eye(f.num_states) - A.T, e)
    return float(alpha @ np.exp(-f.final.astype(np.float64)))


@pytest.mark.parametrize("setup", ["mono", "biphone"])
def test_hclg_is_a_distribution(setup):
    """With a stochastic G, pron-probs summing to 1 per word, optional silence and the HMM
    (self-loop and transition scale 1), all paths of HCLG sum to probability 1: checks
    the weights of L, C, H and the self-loops together (the only loss is Kaldi's
    1/1024 weight quantization in minimize_encoded)."""
    tree, tm, phones = _setup(setup)
    lex = [("a", 0.6, ["P1", "P2"]), ("a", 0.4, ["P1"]), ("b", 1.0, ["P3"]),
           ("c", 1.0, ["P1", "P2", "P3"]), ("d", 1.0, ["P3"])]
    for sil_prob in (0.0, 0.3):
        g = build_decoding_graph(lex, phones, tree, tm, ["a", "b", "c", "d"],
                                 sil_phone="SIL", sil_prob=sil_prob)
        assert _total_prob(g.hclg) == pytest.approx(1.0, abs=5e-3)


def test_push_special_equalizes_state_sums(mono, lexicon):
    _, _, phones = mono
    words = make_word_table(w for w, _, _ in lexicon)
    lex, nd = add_disambig_symbols(lexicon)
    ptab = make_phone_table(phones, nd)
    L = make_lexicon_fst(lex, ptab, words, word_disambig_loops=True)
    G = make_word_loop_grammar(DIGITS, words, probs=[0.1] * 8, final_prob=0.05)
    lg0, lg = compose_lg(L, G, push=False), compose_lg(L, G)
    for f in (lg0, lg):
        assert _total_prob(f) == pytest.approx(_total_prob(lg0), rel=1e-4)
    f = from_kaldifst(lg)
    out = np.bincount(f.src, np.exp(-f.weight.astype(np.float64)), minlength=f.num_states)
    out += np.exp(-f.final.astype(np.float64))
    assert np.log(out.max() / out.min()) < 2e-3  # every state sums to the same lambda
    f0 = from_kaldifst(lg0)
    out0 = np.bincount(f0.src, np.exp(-f0.weight.astype(np.float64)), minlength=f0.num_states)
    assert np.log(out0.max() / out0.min()) > 0.1  # ... which it did not before


# ------------------------------------------------------------------------------- decoding

def test_digit_loop_decodes_known_path(mono, lexicon, digit_graph):
    tree, tm, phones = mono
    words = ["seven", "one", "one", "zero", "four", "three"]
    seq = ["SIL"] + phones_of(lexicon, words, sil_after={1, 5})
    x, pdfs = synth_loglikes(tree, phones, seq, [3 + (i % 3) for i in range(len(seq))])
    r = decode(x, digit_graph)
    assert r.words == words and r.reached_final
    assert [tm.transition_id_to_pdf(t) for t in r.alignment] == pdfs
    assert abs(r.acoustic_cost) < 1e-4 and r.cost == pytest.approx(r.graph_cost, abs=1e-3)
    # the same through the torch / batch-of-one path, and with an acoustic scale
    import torch
    assert decode(torch.from_numpy(x)[None], digit_graph, acoustic_scale=0.5).words == words


def test_four_with_two_pronunciations_and_homophones(mono, lexicon, digit_graph):
    tree, tm, phones = mono
    seq = ["P10", "P11", "P3", "P12", "P13", "P14", "P10", "P11"]  # four(long) five|fife four
    x, _ = synth_loglikes(tree, phones, seq, [4] * len(seq), seed=1)
    r = decode(x, digit_graph, lattice=True, nbest=4)
    assert r.words in (["four", "five", "four"], ["four", "fife", "four"])
    hyps = [" ".join(w) for w, _ in r.nbest]
    assert set(hyps[:2]) == {"four five four", "four fife four"}
    assert r.nbest[0][1] == pytest.approx(r.nbest[1][1], abs=1e-3)  # same path cost
    assert r.nbest[0][1] == pytest.approx(r.cost, abs=1e-3)


@pytest.mark.parametrize("kind", ["monophone", "full_biphone"])
def test_flat_start_trees_decode_digit_strings(mono, lexicon, kind):
    """The trees flat-start chain training builds (pkwrap.chain.tree), as the digits recipe
    uses them: random digit strings with optional silence decode exactly."""
    tree_mod = pytest.importorskip("pkwrap.chain.tree")
    _, _, phones = mono
    topo = tree_mod.chain_topology([i for _, i in phones if i > 0])
    tree = (tree_mod.monophone_tree(topo) if kind == "monophone"
            else tree_mod.full_biphone_tree(topo, ci_phones=[phones["SIL"]]))
    tm = tree_mod.make_transition_model(tree, topo)
    g = build_decoding_graph(lexicon, phones, tree, tm, grammar=DIGITS, sil_phone="SIL")
    rng = np.random.default_rng(5)
    for trial in range(8):
        words = [DIGITS[i] for i in rng.integers(0, len(DIGITS), 1 + trial % 6)]
        seq = ["SIL"] + phones_of(lexicon, words, sil_after={0, 3})
        x, pdfs = synth_loglikes(tree, phones, seq, rng.integers(1, 4, len(seq)), seed=trial)
        r = decode(x, g)
        assert r.words == words
        assert [tm.transition_id_to_pdf(t) for t in r.alignment] == pdfs


def test_biphone_arpa_grammar_known_path(biphone, tmp_path):
    tree, tm, phones = biphone
    lex = [("a", 1.0, ["P1", "P2"]), ("b", 1.0, ["P3"]), ("c", 1.0, ["P4", "P5", "P6"]),
           ("d", 1.0, ["P17", "P18"])]
    arpa = tmp_path / "lm.arpa"
    arpa.write_text("\\data\\\nngram 1=6\nngram 2=3\n\n\\1-grams:\n-1.0 </s>\n-99 <s> -0.5\n"
                    "-0.6 a -0.3\n-0.6 b -0.3\n-0.8 c -0.3\n-0.9 d -0.3\n\n\\2-grams:\n"
                    "-0.2 <s> c\n-0.3 c a\n-0.3 a b\n\n\\end\\\n")
    g = build_decoding_graph(lex, phones, tree, tm, grammar=str(arpa), sil_phone="SIL")
    words = ["c", "a", "b", "d", "d"]
    seq = ["SIL"] + phones_of(lex, words, sil_after={2})
    x, pdfs = synth_loglikes(tree, phones, seq, [3] * len(seq), seed=2)
    r = decode(x, g, beam=20.0)
    assert r.words == words
    assert [tm.transition_id_to_pdf(t) for t in r.alignment] == pdfs
    r2 = decode(x[:3 + 9 + 6], g)  # SIL c a: a prefix, which may end (c a, back-off </s>)
    assert r2.words == ["c", "a"]


def test_lang_dir_route_equals_direct(mono, lexicon, digit_graph, tmp_path):
    tree, tm, phones = mono
    write_lang_dir(tmp_path / "lang", lexicon, phones, grammar=DIGITS + ["fife"],
                   sil_phone="SIL", sil_prob=0.5)
    g = build_decoding_graph_from_lang(tmp_path / "lang", tree, tm)
    assert from_kaldifst(g.hclg) == from_kaldifst(digit_graph.hclg)
    g.write(tmp_path / "graph")
    g2 = DecodingGraph.read(tmp_path / "graph", tm)
    assert from_kaldifst(g2.hclg) == from_kaldifst(g.hclg) and g2.word_table == g.word_table
    # Kaldi's mkgraph.sh stores HCLG.fst as a const FST
    assert kaldifst.StdConstFst(g.hclg).write(str(tmp_path / "graph" / "HCLG.fst"))
    g3 = DecodingGraph.read(tmp_path / "graph", tm)
    assert from_kaldifst(g3.hclg) == from_kaldifst(g.hclg)


# ------------------------------------------------------------------------------- I/O, WER

def test_loglikes_ark_roundtrip_and_lattice_ark(mono, lexicon, digit_graph, tmp_path):
    import kaldiio
    tree, _, phones = mono
    x1, _ = synth_loglikes(tree, phones, ["SIL", "P4", "P5"], [3, 3, 3])
    x2, _ = synth_loglikes(tree, phones, ["P6", "P7"], [5, 2])
    write_loglikes_ark(str(tmp_path / "ll.ark"), {"u1": x1, "u2": x2},
                       scp=str(tmp_path / "ll.scp"))
    back = kaldiio.load_ark(str(tmp_path / "ll.ark"))
    got = dict(back)
    assert set(got) == {"u1", "u2"} and np.array_equal(got["u1"], x1)
    assert np.array_equal(dict(read_loglikes("scp:%s" % (tmp_path / "ll.scp")))["u2"], x2)
    with open(tmp_path / "words.ark", "wb") as f:
        write_int_vectors(f, [("u1", [3, 4, 5]), ("u2", [])], binary=True)
    w = dict(kaldiio.load_ark(str(tmp_path / "words.ark")))
    assert w["u1"].tolist() == [3, 4, 5] and w["u2"].tolist() == []
    r = decode(x1, digit_graph, lattice=True)
    write_lattice_ark(str(tmp_path / "lat.ark"), [("u1", r.lattice)], binary=True)
    write_lattice_ark(str(tmp_path / "lat.txt"), [("u1", r.lattice)], binary=False)
    raw = (tmp_path / "lat.ark").read_bytes()
    assert raw.startswith(b"u1 \0B") and b"lattice4" in raw[:64]
    txt = (tmp_path / "lat.txt").read_text().splitlines()
    assert txt[0] == "u1 " and txt[-1] == "" and all("," in ln for ln in txt[1:-1])


def test_wer_kaldi_format():
    refs = {"u1": "a b c d", "u2": "x y", "u3": "p q r"}
    hyps = {"u1": "a x c d e", "u2": "x y", "u3": "q r"}
    st = compute_wer(refs, hyps)
    assert str(st) == ("%WER 33.33 [ 3 / 9, 1 ins, 1 del, 1 sub ]\n%SER 66.67 [ 2 / 3 ]\n"
                       "Scored 3 sentences, 0 not present in hyp.\n")
    st = compute_wer(refs, {"u1": ["a", "b", "c", "d"]}, mode="all")
    assert str(st).splitlines()[0] == "%WER 55.56 [ 5 / 9, 0 ins, 5 del, 0 sub ] [PARTIAL]"
    assert compute_wer(refs, {"u2": "x"}, mode="present").words == 2
    with pytest.raises(ScoringError, match="u1"):
        compute_wer(refs, {"u2": "x y"})


# ------------------------------------------------------------------------------- bad input

def test_bad_input_is_reported(mono, lexicon, digit_graph, tmp_path):
    tree, tm, phones = mono
    words = make_word_table(w for w, _, _ in lexicon)
    with pytest.raises(LexiconError, match="'eleven'"):
        make_word_loop_grammar(["one", "eleven"], words)
    with pytest.raises(LexiconError, match=r"'eleven' have no pronunciation"):
        build_decoding_graph(lexicon, phones, tree, tm, grammar=["one", "eleven"],
                             word_table=make_word_table(DIGITS + ["eleven", "fife"]))
    with pytest.raises(LexiconError, match="word id 99 of the transcript"):
        compile_train_graph(make_lexicon_fst(lexicon, make_phone_table(phones), words),
                            [1, 99], tree, tm)
    with pytest.raises(LexiconError, match=r"phone 'XX' of word 'bad'"):
        build_decoding_graph(lexicon + [("bad", 1.0, ["P1", "XX"])], phones, tree, tm,
                             grammar=DIGITS)
    bad = tmp_path / "lexiconp.txt"
    bad.write_text("one 1.0 P4 P5\ntwo abc P6\n")
    with pytest.raises(LexiconError, match=r"lexiconp.txt:2: second field 'abc'"):
        read_lexiconp(bad)
    bad.write_text("one\n")
    with pytest.raises(LexiconError, match="empty pronunciation"):
        read_lexicon(bad)
    arpa = tmp_path / "oov.arpa"
    arpa.write_text("\\data\\\nngram 1=3\n\n\\1-grams:\n-1 </s>\n-99 <s>\n-0.5 eleven\n\n\\end\\\n")
    with pytest.raises(LexiconError, match=r"oov.arpa:7: word 'eleven'"):
        make_arpa_grammar(arpa, words)
    # kaldilm would abort the whole process on this one: caught before it runs
    arpa.write_text("\\data\\\nngram 1=3\n\n\\1-grams:\n-1 </s>\n-99 <s>\nxyz one\n\n\\end\\\n")
    with pytest.raises(GraphError, match=r"oov.arpa:7: log-prob 'xyz' is not a number"):
        make_arpa_grammar(arpa, words)
    x = np.zeros((10, tm.num_pdfs), np.float32)
    with pytest.raises(DecodeError, match="34 pdfs"):
        decode(x[:, :30], digit_graph)
    x[3, 2] = np.nan
    with pytest.raises(DecodeError, match="NaN"):
        decode(x, digit_graph)
    with pytest.raises(DecodeError, match="zero frames"):
        decode(x[:0], digit_graph)
    with pytest.raises(GraphError, match="empty transcript"):
        compile_train_graph(make_lexicon_fst(lexicon, make_phone_table(phones), words),
                            [], tree, tm)
    with pytest.raises(GraphError, match="lacks L_disambig.fst"):
        build_decoding_graph_from_lang(tmp_path, tree, tm)


# ------------------------------------------------------------------------------- scripts

def _run(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / args[0])] + list(args[1:]),
                          capture_output=True, text=True, env=env, **kw)


def test_scripts_mkgraph_latgen_compute_wer(mono, lexicon, tmp_path):
    tree, tm, phones = mono
    lang, model, graph = tmp_path / "lang", tmp_path / "model", tmp_path / "graph"
    write_lang_dir(lang, lexicon, phones, grammar=DIGITS, sil_phone="SIL")
    model.mkdir()
    (model / "tree").write_bytes(fixture_path("mono", "tree").read_bytes())
    (model / "final.mdl").write_bytes(fixture_path("mono", "trans.mdl").read_bytes())
    p = _run("mkgraph", str(lang), str(model), str(graph))
    assert p.returncode == 0, p.stderr
    assert (graph / "HCLG.fst").is_file() and (graph / "words.txt").is_file()
    utts = {"u1": ["two", "six"], "u2": ["three", "zero", "zero"]}
    mats = {}
    for i, (u, ws) in enumerate(utts.items()):
        mats[u] = synth_loglikes(tree, phones, phones_of(lexicon, ws), [3] * 10, seed=i)[0]
    write_loglikes_ark(str(tmp_path / "ll.ark"), mats)
    p = _run("latgen-faster-mapped", "--acoustic-scale=1.0",
             "--word-symbol-table=%s" % (graph / "words.txt"), str(model / "final.mdl"),
             str(graph / "HCLG.fst"), "ark:%s" % (tmp_path / "ll.ark"),
             "ark:%s" % (tmp_path / "lat.ark"), "ark,t:%s" % (tmp_path / "words.int"))
    assert p.returncode == 0, p.stderr
    assert "u2 three zero zero" in p.stderr and "Done 2 utterances, failed for 0" in p.stderr
    wt = SymbolTable.read(graph / "words.txt")
    ints = dict((ln.split()[0], ln.split()[1:]) for ln in
                (tmp_path / "words.int").read_text().splitlines())
    assert [wt.symbol(int(i)) for i in ints["u1"]] == utts["u1"]
    (tmp_path / "ref.txt").write_text("u1 two six\nu2 three zero one\n")
    (tmp_path / "hyp.txt").write_text(
        "".join("%s %s\n" % (u, " ".join(wt.symbol(int(i)) for i in v)) for u, v in ints.items()))
    p = _run("compute-wer", "--text", "--mode=present", "ark:%s" % (tmp_path / "ref.txt"),
             "ark:%s" % (tmp_path / "hyp.txt"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "%WER 20.00 [ 1 / 5, 0 ins, 0 del, 1 sub ]"
    p = _run("compute-wer", "ark:%s" % (tmp_path / "ref.txt"), "ark:/nonexistent")
    assert p.returncode != 0 and "/nonexistent" in p.stderr


def test_symbol_table_is_kaldis():
    """pkwrap.decode re-exports pkwrap.kaldi's SymbolTable; its errors are format errors."""
    import pkwrap.decode
    from pkwrap.kaldi import KaldiFormatError
    from pkwrap.kaldi.symbol_table import SymbolTable as KaldiSymbolTable, SymbolTableError

    assert SymbolTable is KaldiSymbolTable and pkwrap.decode.SymbolTableError is SymbolTableError
    t = make_phone_table(["SIL", "A"], num_disambig=2)
    assert t.symbols == ["<eps>", "SIL", "A", "#0", "#1", "#2"] and t.disambig_ids() == [3, 4, 5]
    assert make_phone_table(t).symbols == ["<eps>", "SIL", "A", "#0"]
    assert SymbolTable.is_disambig("#12") and not SymbolTable.is_disambig("#x")
    with pytest.raises(SymbolTableError, match="symbol 'B' is not in phones.txt"):
        t["B"]
    with pytest.raises(KaldiFormatError, match="invalid symbol 'a b'"):
        t.add("a b")


# ------------------------------------------------------------------------------- lattices

def _nbest_by_determinization(lat, word_table, acoustic_scale, n):
    """Reference n-best: word acceptor -> rmepsilon -> determinize -> n shortest paths."""
    from pkwrap.decode.decoder import _parse_lattice_text
    start, arcs, finals = _parse_lattice_text(str(lat))
    states = sorted({start} | {a[0] for a in arcs} | {a[1] for a in arcs} | set(finals))
    remap = {s: k for k, s in enumerate(states)}
    f = kaldifst.StdVectorFst()
    for _ in states:
        f.add_state()
    f.start = remap[start]
    for s, d, _, o, g, a in arcs:
        f.add_arc(remap[s], kaldifst.StdArc(o, o, g + acoustic_scale * a, remap[d]))
    for s, (g, a) in finals.items():
        f.set_final(remap[s], g + acoustic_scale * a)
    kaldifst.rmepsilon(f)
    out = []
    for p in kaldifst.convert_nbest_to_vector(kaldifst.shortest_path(kaldifst.determinize(f),
                                                                     n=n)):
        _, _, osyms, w = kaldifst.get_linear_symbol_sequence(p)
        out.append(([word_table.symbol(i) for i in osyms], float(w.value)))
    return sorted(out, key=lambda t: t[1])


def test_lattice_decoding_at_acoustic_scale_0_1_is_bounded(biphone, lexicon):
    """Random log-likelihoods at acoustic scale 0.1 on a biphone digit loop: nearly every
    word sequence lies within the lattice beam. Determinizing the word lattice for the
    n-best list never finished here (minutes); the A* n-best must, and its best path must
    be FasterDecoder's. A short utterance checks the n-best against determinization."""
    tree, tm, phones = biphone
    g = build_decoding_graph(lexicon, phones, tree, tm, grammar=DIGITS, sil_phone="SIL",
                             sil_prob=0.5)
    x = np.random.default_rng(7).normal(size=(100, tree.num_pdfs)).astype(np.float32) * 3.0
    best = decode(x, g, acoustic_scale=0.1, beam=16.0)
    r = decode(x, g, acoustic_scale=0.1, beam=16.0, lattice_beam=10.0, lattice=True, nbest=5)
    assert r.lattice is not None and r.words == best.words and r.alignment == best.alignment
    assert abs(r.cost - best.cost) < 1e-3 * max(1.0, abs(best.cost))
    assert len(r.nbest) == 5 and r.nbest[0][0] == best.words
    assert abs(r.nbest[0][1] - best.cost) < 1e-2
    costs = [c for _, c in r.nbest]
    assert costs == sorted(costs) and len({tuple(w) for w, _ in r.nbest}) == 5
    # n-best against determinization, where that is affordable
    r = decode(x[:30], g, acoustic_scale=1.0, lattice_beam=6.0, lattice=True, nbest=8)
    ref = _nbest_by_determinization(r.lattice, g.word_table, 1.0, 8)
    assert len(r.nbest) == len(ref) == 8
    assert np.allclose([c for _, c in r.nbest], [c for _, c in ref], atol=1e-2)
    assert r.nbest[0][0] == ref[0][0] == r.words
