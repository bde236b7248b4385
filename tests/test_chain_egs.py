"""Chain egs against Kaldi: every archive's dump, byte-identical rewrites, merging like
nnet3-chain-merge-egs (regular, weighted, e2e), text form, scp offsets, bad input."""
import io
import itertools
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, fixture_path
from pkwrap.kaldi.chain_egs import (NnetChainExample, compact_fst_properties, copy_chain_egs,
                                    merge_chain_egs, merge_chain_egs_stream, merge_supervision,
                                    read_chain_egs, scale_supervision_weight,
                                    shift_chain_example_times, write_chain_egs)
from pkwrap.kaldi.fst import read_fst_text
from pkwrap.kaldi.io import KaldiFormatError
from pkwrap.kaldi.table import read_table

os.environ.setdefault("OMP_NUM_THREADS", "1")

ARCHIVES = ["mono/data/cegs_compress_true.ark", "mono/data/cegs_compress_false.ark",
            "mono/data/cegs_merged4.ark", "mono/data/cegs_weighted_merged2.ark",
            "biphone/data/cegs_compress_true.ark", "biphone/data/cegs_merged4.ark",
            "biphone/data/cegs_weighted_merged2.ark", "e2e/cegs_e2e.ark",
            "e2e/cegs_e2e_merged3.ark", "nnet3/egs/cegs_merged8.ark"]
_cache = {}


def egs_of(ark):
    if ark not in _cache:
        _cache[ark] = list(read_chain_egs("ark:%s" % fixture_path(ark)))
    return _cache[ark]


def fresh(ark):
    """A private copy (tests that modify egs must not touch the cache)."""
    return [(k, e.copy()) for k, e in egs_of(ark)]


def _dump_dir(ark):
    return fixture_path(os.path.dirname(ark), "dump_" + os.path.basename(ark)[:-4])


@pytest.mark.parametrize("ark", ARCHIVES)
def test_every_eg_equals_kaldi_dump(ark):
    dump = _dump_dir(ark)
    ref = json.loads((dump / "egs.json").read_text())
    egs = egs_of(ark)
    assert [k for k, _ in egs] == [j["key"] for j in ref]
    for k, ((key, eg), j) in enumerate(zip(egs, ref)):
        (inp,) = j["inputs"]
        x = eg.inputs[inp["name"]]
        assert x.dtype == torch.float32 and tuple(x.shape) == (inp["rows"], inp["cols"])
        # exact: these are Kaldi's own decoded floats (compressed ones included)
        assert np.array_equal(x.numpy(), np.load(dump / inp["npy"])), (ark, key)
        assert (inp["name"] in eg.stored_inputs) == (inp["storage"] == "compressed")
        assert eg.input_indexes[inp["name"]].dtype == np.int32
        assert eg.input_indexes[inp["name"]].tolist() == inp["indexes"]
        assert eg.output_name == j["output_name"]
        assert eg.output_indexes.tolist() == j["output_indexes"]
        assert eg.deriv_weights.dtype == torch.float32
        assert eg.deriv_weights.tolist() == pytest.approx(j["deriv_weights"], abs=0)
        s = eg.supervision
        assert (s.weight, s.num_sequences, s.frames_per_sequence, s.label_dim, s.e2e,
                len(s.e2e_fsts)) == (j["supervision_weight"], j["num_sequences"],
                                     j["frames_per_sequence"], j["label_dim"], j["e2e"],
                                     j["num_e2e_fsts"])
        assert (s.alignment_pdfs is None and not j["alignment_pdfs"]) or \
            s.alignment_pdfs.tolist() == j["alignment_pdfs"]
        text = (dump / ("eg%d_supervision_fst.txt" % k)).read_text()
        if s.e2e:
            parts = [p.split("\n", 1)[1] for p in text.split("# e2e_fsts[")[1:]]
            assert len(parts) == len(s.e2e_fsts)
            for p, f in zip(parts, s.e2e_fsts):
                assert read_fst_text(p) == f
        else:
            assert s.fst == read_fst_text(text)
            assert s.fst.num_states == j["supervision_fst_num_states"]


@pytest.mark.parametrize("ark", ARCHIVES)
def test_binary_rewrite_is_byte_identical(ark, tmp_path):
    out = tmp_path / "out.ark"
    assert write_chain_egs("ark:%s" % out, egs_of(ark)) == len(egs_of(ark))
    assert out.read_bytes() == fixture_path(ark).read_bytes()


def test_compact_fst_properties_equal_kaldi_header():
    for ark in ARCHIVES:
        for _, eg in egs_of(ark):
            for f in ([eg.supervision.fst] if eg.supervision.fst else eg.supervision.e2e_fsts):
                assert compact_fst_properties(f) == f.properties


def test_modified_input_is_rewritten_not_reemitted(tmp_path):
    (key, eg), = fresh("mono/data/cegs_compress_true.ark")[:1]
    eg.inputs["input"][0, 0] += 1.0
    write_chain_egs("ark:%s" % (tmp_path / "a.ark"), [(key, eg)])
    (_, back), = read_chain_egs("ark:%s" % (tmp_path / "a.ark"))
    assert "input" not in back.stored_inputs  # written as a full matrix now
    assert torch.equal(back.inputs["input"], eg.inputs["input"])
    write_chain_egs("ark:%s" % (tmp_path / "c.ark"), [(key, eg)], compress=True)
    (_, c), = read_chain_egs("ark:%s" % (tmp_path / "c.ark"))
    assert c.stored_inputs["input"].format == 1
    assert (c.inputs["input"] - eg.inputs["input"]).abs().max() < 0.05


def _merged_ref(ark):
    (key, eg), = egs_of(ark)
    return key, eg


def test_merge_equals_kaldi_merged4_bytes(tmp_path):
    """nnet3-chain-merge-egs --minibatch-size=4 was run on the first 4 egs of the
    uncompressed archive: our merge is byte-identical."""
    egs = [e for _, e in egs_of("mono/data/cegs_compress_false.ark")[:4]]
    m = merge_chain_egs(egs)
    key, ref = _merged_ref("mono/data/cegs_merged4.ark")
    write_chain_egs("ark:%s" % (tmp_path / "m.ark"), [(key, m)])
    assert (tmp_path / "m.ark").read_bytes() == fixture_path("mono/data/cegs_merged4.ark").read_bytes()


@pytest.mark.parametrize("setup", ["mono", "biphone"])
def test_merge_of_compressed_egs_equals_kaldi_merged4(setup):
    egs = [e for _, e in egs_of("%s/data/cegs_compress_true.ark" % setup)[:4]]
    m = merge_chain_egs(egs)
    _, ref = _merged_ref("%s/data/cegs_merged4.ark" % setup)
    assert m.supervision.fst == ref.supervision.fst  # Concat + RmEpsilon + BFS order
    assert m.supervision.num_sequences == 4 and m.supervision.weight == 1.0
    assert np.array_equal(m.input_indexes["input"], ref.input_indexes["input"])
    assert np.array_equal(m.output_indexes, ref.output_indexes)
    assert torch.equal(m.deriv_weights, ref.deriv_weights)
    # Kaldi merged the uncompressed chunks: equal up to the compression error
    assert (m.inputs["input"] - ref.inputs["input"]).abs().max() < 0.05
    # merging decompresses: the rows are exactly the single egs' decoded rows
    assert torch.equal(m.inputs["input"], torch.cat([e.inputs["input"] for e in egs]))


@pytest.mark.parametrize("setup", ["mono", "biphone"])
def test_weighted_merge_equals_kaldi(setup, tmp_path):
    d = "%s/data/" % setup
    weights = read_table("ark,t:%s" % fixture_path(d + "egs_weights.txt"), "float")
    src = d + ("cegs_compress_false.ark" if setup == "mono" else "cegs_compress_true.ark")
    egs = [scale_supervision_weight(e, weights[k]) for k, e in fresh(src) if k in weights]
    m = merge_chain_egs(egs)
    key, ref = _merged_ref(d + "cegs_weighted_merged2.ark")
    assert m.supervision.weight == ref.supervision.weight == 0.5
    assert m.supervision.fst == ref.supervision.fst
    assert torch.equal(m.deriv_weights, ref.deriv_weights)
    if setup == "mono":
        write_chain_egs("ark:%s" % (tmp_path / "w.ark"), [(key, m)])
        assert (tmp_path / "w.ark").read_bytes() == fixture_path(d + "cegs_weighted_merged2.ark").read_bytes()


def test_e2e_merge_equals_kaldi_bytes(tmp_path):
    egs = [e for _, e in egs_of("e2e/cegs_e2e.ark")[:3]]
    m = merge_chain_egs(egs)
    assert m.supervision.e2e and len(m.supervision.e2e_fsts) == 3
    write_chain_egs("ark:%s" % (tmp_path / "e.ark"), [("merged-0-3", m)])
    assert (tmp_path / "e.ark").read_bytes() == fixture_path("e2e/cegs_e2e_merged3.ark").read_bytes()


def test_merge_rejects_mismatches():
    e2e = [e for _, e in fresh("e2e/cegs_e2e.ark")]
    with pytest.raises(ValueError, match="frames_per_sequence differ"):
        merge_chain_egs([e2e[0], e2e[3]])  # 50 vs 70 frames
    reg = [e for _, e in fresh("mono/data/cegs_compress_true.ark")[:2]]
    scale_supervision_weight(reg[1], 0.5)
    with pytest.raises(ValueError, match="weights differ"):
        merge_chain_egs(reg)
    with pytest.raises(ValueError, match="e2e with regular"):
        merge_supervision([reg[0].supervision, e2e[0].supervision])
    merged = egs_of("mono/data/cegs_merged4.ark")[0][1]
    with pytest.raises(ValueError, match="already merged"):
        merge_chain_egs([merged, merged])


def test_merger_minibatch_rules_and_keys():
    egs = egs_of("mono/data/cegs_compress_true.ark")  # 19 egs, all 170 input frames
    stats = {}
    out = list(merge_chain_egs_stream(egs, "8,2:3", stats=stats))
    assert [k for k, _ in out] == ["merged-0-8", "merged-1-8", "merged-2-3"]
    assert stats == {"num_read": 19, "num_written": 3, "num_discarded": 0}
    assert out[2][1].supervision.num_sequences == 3
    out = list(merge_chain_egs_stream(egs, "5", stats=stats))
    assert len(out) == 3 and stats["num_discarded"] == 4


def test_text_example_reads_and_writes_like_kaldi(tmp_path):
    for setup in ("mono", "biphone"):
        (key, t), = read_chain_egs("ark,t:%s" % fixture_path(setup, "data", "eg_text_example.txt"))
        ref = dict(egs_of("%s/data/cegs_compress_true.ark" % setup))[key]
        assert np.array_equal(t.output_indexes, ref.output_indexes)
        assert np.array_equal(t.input_indexes["input"], ref.input_indexes["input"])
        f, g = t.supervision.fst, ref.supervision.fst
        assert np.array_equal(f.ilabel, g.ilabel) and np.array_equal(f.nextstate, g.nextstate)
        np.testing.assert_allclose(f.weight, g.weight, rtol=1e-6)
        assert torch.equal(t.deriv_weights, ref.deriv_weights)
    # Kaldi wrote mono's text example from the uncompressed archive: same bytes
    (key, eg), = [(k, e) for k, e in egs_of("mono/data/cegs_compress_false.ark") if k == "utt00-12"]
    write_chain_egs("ark,t:%s" % (tmp_path / "t.txt"), [(key, eg)])
    assert (tmp_path / "t.txt").read_bytes() == \
        fixture_path("mono/data/eg_text_example.txt").read_bytes()
    write_chain_egs("ark:%s" % (tmp_path / "t2.txt"), [(key, eg)], binary=False)
    assert (tmp_path / "t2.txt").read_bytes() == (tmp_path / "t.txt").read_bytes()
    (_, e2e), = egs_of("e2e/cegs_e2e.ark")[:1]
    write_chain_egs("ark,t:%s" % (tmp_path / "e.txt"), [("e", e2e)])
    (_, back), = read_chain_egs("ark,t:%s" % (tmp_path / "e.txt"))
    assert back.supervision.e2e and len(back.supervision.e2e_fsts) == 1
    np.testing.assert_allclose(back.inputs["input"], e2e.inputs["input"], rtol=1e-6, atol=1e-6)


def test_scp_with_offsets_and_stdin(tmp_path, monkeypatch):
    egs = egs_of("mono/data/cegs_compress_true.ark")[:5]
    ark, scp = tmp_path / "e.ark", tmp_path / "e.scp"
    write_chain_egs("ark,scp:%s,%s" % (ark, scp), egs)
    lines = scp.read_text().splitlines()
    assert lines[0] == "utt00-12 %s:9" % ark
    sub = tmp_path / "sub.scp"
    sub.write_text("\n".join(lines[3:0:-1]) + "\n")  # reversed order, by offset
    got = list(read_chain_egs("scp:%s" % sub))
    assert [k for k, _ in got] == [egs[3][0], egs[2][0], egs[1][0]]
    assert torch.equal(got[0][1].inputs["input"], egs[3][1].inputs["input"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ark.read_bytes())))
    assert [k for k, _ in read_chain_egs("ark:-")] == [k for k, _ in egs]


def test_bad_archives_give_clear_errors(tmp_path):
    raw = fixture_path("mono/data/cegs_compress_true.ark").read_bytes()
    second = raw.index(b"utt00-171 ")
    p = tmp_path / "bad.ark"
    # truncated in the middle of the second eg's compressed features
    p.write_bytes(raw[:second + 2000])
    with pytest.raises(KaldiFormatError, match=r"bad\.ark, key 'utt00-171'.*truncated"):
        list(read_chain_egs("ark:%s" % p))
    # truncated inside the supervision FST
    p.write_bytes(raw[:raw.index(b"<DW2>") - 30])
    with pytest.raises(KaldiFormatError, match="key 'utt00-12'.*truncated"):
        list(read_chain_egs("ark:%s" % p))
    # corrupt token
    p.write_bytes(raw.replace(b"<NumOutputs>", b"<NumOutputz>", 1))
    with pytest.raises(KaldiFormatError, match="expected token '<NumOutputs>', got '<NumOutputz>'"):
        list(read_chain_egs("ark:%s" % p))
    # corrupt Index vector byte
    i = raw.index(b"<I1V> ") + 6 + 5 + 3
    p.write_bytes(raw[:i] + b"\x80" + raw[i + 1:])
    with pytest.raises(KaldiFormatError, match="unexpected byte -128 in Index vector"):
        list(read_chain_egs("ark:%s" % p))
    # corrupt FST magic
    j = raw.index(b"<End2End> F") + len(b"<End2End> F")
    p.write_bytes(raw[:j] + b"\0\0\0\0" + raw[j + 4:])
    with pytest.raises(KaldiFormatError, match="not an OpenFst FST"):
        list(read_chain_egs("ark:%s" % p))
    # not binary and not text eg
    p.write_bytes(b"key garbage")
    with pytest.raises(KaldiFormatError, match="expected token '<Nnet3ChainEg>'"):
        list(read_chain_egs("ark:%s" % p))
    # scp with a missing archive / offset past the end
    scp = tmp_path / "x.scp"
    scp.write_text("utt00-12 %s:%d\n" % (fixture_path("mono/data/cegs_compress_true.ark"),
                                         len(raw) + 1))
    with pytest.raises(KaldiFormatError, match="key 'utt00-12': offset .* past the end"):
        list(read_chain_egs("scp:%s" % scp))


def test_shift_times_like_kaldi():
    (_, eg), = fresh("mono/data/cegs_compress_true.ark")[:1]
    t_in, t_out = eg.input_indexes["input"][:, 1].copy(), eg.output_indexes[:, 1].copy()
    shift_chain_example_times(eg, 1)  # 1/3 rounds to 0 output frames
    assert np.array_equal(eg.input_indexes["input"][:, 1], t_in + 1)
    assert np.array_equal(eg.output_indexes[:, 1], t_out)
    shift_chain_example_times(eg, 2)  # 2/3 rounds to one subsampled frame (3)
    assert np.array_equal(eg.output_indexes[:, 1], t_out + 3)


def _run_script(name, argv):
    old = sys.argv
    sys.argv = [name] + argv
    try:
        runpy.run_path(str(FIXTURES.parent.parent.parent / "scripts" / name), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = old
    return 0


def test_cli_copy_with_weights_then_merge_equals_kaldi(tmp_path):
    d = fixture_path("mono/data")
    write_chain_egs("ark,scp:%s,%s" % (tmp_path / "sub.ark", tmp_path / "sub.scp"),
                    itertools.islice(egs_of("mono/data/cegs_compress_false.ark"), 4))
    assert _run_script("nnet3-chain-copy-egs", [
        "--weights=ark,t:%s" % (d / "egs_weights.txt"), "scp:%s" % (tmp_path / "sub.scp"),
        "ark:%s" % (tmp_path / "w.ark")]) == 0
    assert _run_script("nnet3-chain-merge-egs", [
        "--minibatch-size=2", "ark:%s" % (tmp_path / "w.ark"), "ark:%s" % (tmp_path / "m.ark")]) == 0
    assert (tmp_path / "m.ark").read_bytes() == (d / "cegs_weighted_merged2.ark").read_bytes()
    assert _run_script("nnet3-chain-merge-egs", [
        "--minibatch-size=4", "scp:%s" % (tmp_path / "sub.scp"), "ark:%s" % (tmp_path / "4.ark")]) == 0
    assert (tmp_path / "4.ark").read_bytes() == (d / "cegs_merged4.ark").read_bytes()
    code = _run_script("nnet3-chain-merge-egs", ["ark:%s" % (tmp_path / "nope.ark"), "ark:/dev/null"])
    assert code not in (0, None)
    st = copy_chain_egs("scp:%s" % (tmp_path / "sub.scp"),
                        ["ark:%s" % (tmp_path / "a.ark"), "ark:%s" % (tmp_path / "b.ark")])
    assert st["num_written"] == 4
    assert [k for k, _ in read_chain_egs("ark:%s" % (tmp_path / "b.ark"))] == ["utt00-171", "utt01-0"]


def _random_fst(rng, n_states):
    """A random acceptor with finals that also have arcs and duplicate arcs."""
    from pkwrap.kaldi.fst import Fst
    arcs = []
    for s in range(n_states - 1):
        for _ in range(rng.integers(1, 4)):
            d = int(rng.integers(s + 1, n_states))
            lab = int(rng.integers(1, 5))
            arcs.append((s, lab, lab, float(np.float32(rng.random() * 3)), d))
        if rng.random() < 0.2:
            arcs.append(arcs[-1][:3] + (float(np.float32(rng.random())),) + arcs[-1][4:])
    finals = {n_states - 1: 0.0}
    for s in rng.integers(0, n_states - 1, 2):
        finals[int(s)] = float(np.float32(rng.random()))
    return Fst.from_arcs(n_states, 0, arcs, finals)


def test_native_fst_merge_equals_python_reference():
    from pkwrap.kaldi.chain_egs import merge_supervision_fsts
    rng = np.random.default_rng(7)
    pool = [e.supervision.fst for _, e in egs_of("biphone/data/cegs_compress_true.ark")]
    for trial in range(20):
        if trial % 2:
            fsts = [pool[i] for i in rng.integers(0, len(pool), rng.integers(1, 9))]
        else:
            fsts = [_random_fst(rng, int(rng.integers(2, 9))) for _ in range(rng.integers(1, 5))]
        assert merge_supervision_fsts(fsts, native=True) == \
            merge_supervision_fsts(fsts, native=False), trial


def test_supervision_archives_round_trip(tmp_path):
    """chain-get-supervision archives (binary and its text copy) read and re-write to
    Kaldi's bytes with read_supervision / write_supervision."""
    from pkwrap.kaldi.chain_egs import read_supervision, write_supervision
    from pkwrap.kaldi.table import Holder, SequentialTableReader, TableWriter
    h = Holder(read_supervision, write_supervision)
    d = fixture_path("mono/data")
    b = list(SequentialTableReader("ark:%s" % (d / "supervision.ark"), h))
    t = list(SequentialTableReader("ark,t:%s" % (d / "supervision.txt"), h))
    assert [k for k, _ in b] == [k for k, _ in t] and len(b) > 5
    for (_, x), (_, y) in zip(b, t):
        assert (x.num_sequences, x.frames_per_sequence, x.label_dim) == \
            (y.num_sequences, y.frames_per_sequence, y.label_dim)
        assert np.array_equal(x.fst.ilabel, y.fst.ilabel)
        np.testing.assert_allclose(x.fst.weight, y.fst.weight, rtol=1e-6)
    for spec, ref in (("ark:%s", "supervision.ark"), ("ark,t:%s", "supervision.txt")):
        out = tmp_path / ref
        with TableWriter(spec % out, h) as w:
            for k, s in b:
                w[k] = s
        assert out.read_bytes() == (d / ref).read_bytes()


def test_modify_context_like_kaldi():
    from pkwrap.kaldi.chain_egs import modify_chain_example_context
    (_, eg), = fresh("mono/data/cegs_compress_true.ark")[:1]
    full = eg.inputs["input"].clone()
    t = eg.input_indexes["input"][:, 1].copy()  # -10 .. 159, outputs at 0 .. 147
    modify_chain_example_context(eg, 4, 20)    # right side has only 12: kept
    assert eg.input_indexes["input"][:, 1].tolist() == list(range(-4, 160))
    assert torch.equal(eg.inputs["input"], full[6:])
    assert "input" not in eg.stored_inputs     # filtered rows are written full
    (_, eg2), = fresh("mono/data/cegs_compress_true.ark")[:1]
    modify_chain_example_context(eg2, 10, 12)  # keeps everything: stays compressed
    assert "input" in eg2.stored_inputs and np.array_equal(eg2.input_indexes["input"][:, 1], t)
    merged = egs_of("mono/data/cegs_merged4.ark")[0][1]
    with pytest.raises(ValueError, match="already merged"):
        modify_chain_example_context(merged.copy(), 2, 2)
