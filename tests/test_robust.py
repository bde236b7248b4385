"""Bad input: one-line errors from the programs, outputs complete or absent, non-finite
values handled as Kaldi does, sizes checked before allocation, FSTs and egs validated.

Damaged inputs are made here from the Kaldi fixtures (truncations, bit flips, absurd
sizes, NaN/inf, negative ids, missing output directories, a full disk simulated by a
writer that fails).
"""
import copy
import errno
import io
import itertools
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, fixture_path, script_env
from pkwrap.cli import FileError, describe_error, run_program
from pkwrap.kaldi import io as kio
from pkwrap.kaldi.chain_egs import (FST_HOLDER, read_chain_egs, write_chain_egs,
                                    copy_chain_egs)
from pkwrap.kaldi.fst import Fst, FstFormatError, read_fst, read_fst_text, write_fst
from pkwrap.kaldi.io import KaldiFormatError, atomic_output, atomic_outputs
from pkwrap.kaldi.table import RandomAccessTableReader, TableWriter

MONO = fixture_path("mono")
EGS = MONO / "data" / "cegs_compress_false.ark"


def _leftovers(d):
    return sorted(p.name for p in d.iterdir())


def _prog(name, *args):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / name)] + [str(a) for a in args],
                       capture_output=True, text=True, env=script_env(), timeout=120)
    return r.returncode, r.stderr


class _FullDisk:
    """A file object that fails with ENOSPC once ``limit`` bytes were written."""

    def __init__(self, f, limit):
        self.f, self.limit, self.n = f, limit, 0

    def write(self, b):
        self.n += len(b)
        if self.n > self.limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, k):
        return getattr(self.f, k)


@pytest.fixture
def full_disk(monkeypatch):
    """Every AtomicFile opened from now on fails after ``limit`` bytes."""
    real = os.fdopen

    def set_limit(limit):
        monkeypatch.setattr(kio.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), limit))
    return set_limit


# ------------------------------------------------------------------------ one error path
def test_run_program_turns_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv("PKWRAP_VERBOSE", raising=False)

    def fails(exc):
        def main(argv):
            raise exc
        return main

    cases = [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "in.ark"),
         "prog: in.ark: No such file or directory"),
        (FileError("out.ark", os.strerror(errno.ENOSPC), errno.ENOSPC),
         "prog: out.ark: No space left on device"),
        (KaldiFormatError("x.ark, key 'a': truncated (at byte 5)"),
         "prog: x.ark, key 'a': truncated (at byte 5)"),
    ]
    for exc, msg in cases:
        with pytest.raises(SystemExit) as e:
            run_program(fails(exc), "prog", [])
        assert str(e.value.code) == msg
    with pytest.raises(SystemExit) as e:
        run_program(fails(KeyboardInterrupt()), "prog", [])
    assert e.value.code == 130
    with pytest.raises(SystemExit) as e:  # a bug: named as one, traceback on request
        run_program(fails(AttributeError("'NoneType' object has no attribute 'x'")), "prog", [])
    assert "internal error: AttributeError" in str(e.value.code)
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_program(fails(ValueError("bad")), "prog", ["--verbose"])
    assert "Traceback" in capsys.readouterr().err
    seen = []
    assert run_program(lambda argv: seen.append(argv) or 3, "prog", ["a", "--verbose=1"]) == 3
    assert seen == [["a"]]
    e = UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte")
    assert "offset 2" in describe_error(e)


def test_read_text_names_the_file(tmp_path):
    p = tmp_path / "words.txt"
    p.write_bytes(b"a 1\n\xff\xfe 2\n")
    with pytest.raises(FileError, match=r"words.txt: not UTF-8 text \(byte 0xff at offset 4\)"):
        kio.read_text(p)


def test_scripts_fail_with_one_line(tmp_path):
    # missing input, truncated input, non-existent output directory: one line, status 1
    bad = tmp_path / "tree"
    bad.write_bytes(fixture_path("mono", "tree").read_bytes()[:40])
    for args, want in [
        (("copy-tree", tmp_path / "nope", tmp_path / "t"), "nope: cannot read a Kaldi tree: No such file"),
        (("copy-tree", bad, tmp_path / "t"), "tree"),
        (("copy-transition-model", MONO / "trans.mdl", tmp_path / "no" / "dir" / "m"),
         "no/dir/m: No such file or directory"),
    ]:
        rc, err = _prog(*args)
        assert rc == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(args[0] + ": ") and want in lines[0], err
    assert _leftovers(tmp_path) == ["tree"]


def test_two_output_program_leaves_neither(tmp_path):
    """chain-make-den-fst writes both FSTs or none: here the second location is a
    directory that does not exist."""
    den, norm = tmp_path / "den.fst", tmp_path / "missing" / "norm.fst"
    rc, err = _prog("chain-make-den-fst", MONO / "tree", MONO / "trans.mdl",
                    MONO / "phone_lm.fst", den, norm)
    assert rc == 1 and "missing/norm.fst" in err and "Traceback" not in err
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------ atomic outputs
def test_atomic_output_full_disk(tmp_path, full_disk):
    fst = read_fst(MONO / "den.fst")
    out = tmp_path / "den.fst"
    out.write_bytes(b"old")
    full_disk(100)
    with pytest.raises(FileError, match="den.fst: No space left on device"):
        write_fst(fst, out)
    assert _leftovers(tmp_path) == ["den.fst"] and out.read_bytes() == b"old"


def test_atomic_outputs_all_or_none(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(RuntimeError):
        with atomic_outputs(a, b) as (fa, fb):
            fa.write(b"x")
            fb.write(b"y")
            raise RuntimeError("second output failed")
    assert _leftovers(tmp_path) == []
    with atomic_outputs(a, b) as (fa, fb):
        fa.write(b"x")
        assert _leftovers(tmp_path) == ["a.tmp.%d" % os.getpid(), "b.tmp.%d" % os.getpid()]
        fb.write(b"y")
    assert a.read_bytes() == b"x" and b.read_bytes() == b"y"
    with atomic_output(os.devnull) as f:  # not a regular file: written in place
        f.write(b"z")


def test_table_writer_leaves_nothing_on_failure(tmp_path, full_disk):
    ark, scp = tmp_path / "m.ark", tmp_path / "m.scp"
    with pytest.raises(ValueError):
        with TableWriter("ark,scp:%s,%s" % (ark, scp), "matrix") as w:
            w["a"] = np.zeros((2, 3), np.float32)
            assert not ark.exists()  # nothing under the final name before the end
            w["bad key"] = np.zeros((2, 3), np.float32)
    assert _leftovers(tmp_path) == []
    full_disk(50)
    with pytest.raises(FileError, match="m.ark: No space left on device"):
        with TableWriter("ark:%s" % ark, "matrix") as w:
            w["a"] = np.zeros((20, 3), np.float32)
    assert _leftovers(tmp_path) == []


def test_pipe_output_failure_names_the_command():
    with pytest.raises(OSError, match="'exit 3' failed with exit status 3"):
        with TableWriter("ark:| exit 3", "matrix") as w:
            w["a"] = np.zeros((1, 1), np.float32)


def test_copy_egs_from_truncated_input_leaves_no_output(tmp_path):
    data = EGS.read_bytes()
    bad = tmp_path / "in.ark"
    bad.write_bytes(data[:len(data) * 2 // 3])
    outs = [tmp_path / "o1.ark", tmp_path / "o2.ark"]
    with pytest.raises(KaldiFormatError, match="in.ark"):
        copy_chain_egs("ark:%s" % bad, ["ark:%s" % o for o in outs])
    assert _leftovers(tmp_path) == ["in.ark"]


def test_checkpoint_is_a_torch_file_with_a_digest(tmp_path, full_disk):
    from pkwrap.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    p = tmp_path / "final.pt"
    st = {"model": {"w": torch.arange(6.0)}, "step": 7}
    save_checkpoint(str(p), st)
    assert torch.load(p, weights_only=False)["step"] == 7  # plain torch.load works
    assert torch.equal(load_checkpoint(str(p))["model"]["w"], st["model"]["w"])
    data = bytearray(p.read_bytes())
    for damaged, msg in [(data[:-30], "truncated"), (data[:-20], "truncated"),
                         (data[:200] + bytes([data[200] ^ 1]) + data[201:], "sha256 mismatch")]:
        q = tmp_path / "bad.pt"
        q.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(str(q))
    # the earlier format (private header) is still read
    import hashlib
    buf = io.BytesIO()
    torch.save(st, buf)
    payload = buf.getvalue()
    old = tmp_path / "old.pt"
    old.write_bytes(b"PKWRAPCKPT1\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n"
                    + b"%d\n" % len(payload) + payload)
    assert load_checkpoint(str(old))["step"] == 7
    # a full disk leaves the previous checkpoint and no temporary file
    full_disk(1000)
    with pytest.raises(FileError, match="final.pt: No space left on device"):
        save_checkpoint(str(p), {"model": {"w": torch.zeros(10000)}})
    assert sorted(_leftovers(tmp_path)) == ["bad.pt", "final.pt", "old.pt"]
    assert load_checkpoint(str(p))["step"] == 7


# ------------------------------------------------------------------------ non-finite values
def _loss_setup():
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    key, eg = next(iter(read_chain_egs("ark:%s" % EGS)))
    sup = eg.supervision
    S, T, P = sup.num_sequences, sup.frames_per_sequence, sup.label_dim
    loss = ChainLoss(DenominatorGraph.from_fst(MONO / "den.fst", P),
                     ChainOptions(l2_regularize=5e-4), num_threads=1)
    X = torch.randn(S, T, P, generator=torch.Generator().manual_seed(0))
    return loss, sup, X


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_chain_loss_nonfinite_output_fails_like_kaldi(bad):
    loss, sup, X = _loss_setup()
    ok = loss(X.clone().requires_grad_(), sup)
    assert ok.ok and np.isfinite(ok.objf)
    X[0, 1, 2] = bad  # a pdf the numerator may not even visit
    X.requires_grad_()
    res = loss(X, sup)
    assert not res.ok
    assert res.objf == pytest.approx(-10.0 * res.weight)
    assert res.l2_term == 0.0 and res.out_of_range_term == 0.0
    res.loss.backward()
    assert torch.isfinite(res.loss) and torch.count_nonzero(X.grad) == 0


def test_nan_minibatch_does_not_poison_momentum():
    from pkwrap.optim import NGSGD
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = NGSGD(lin.parameters(), lr=0.1, momentum=0.5)
    for step, bad in enumerate([False, True, False, False]):
        opt.zero_grad()
        (lin(torch.randn(5, 4)) ** 2).sum().backward()
        if bad:
            lin.weight.grad[0, 0] = float("nan")
        before = lin.weight.detach().clone()
        with pytest.warns(UserWarning) if bad else _no_warning():
            opt.step()
        changed = not torch.equal(before, lin.weight)
        assert changed != bad, step
        assert all(torch.isfinite(p).all() for p in lin.parameters())
        assert all(torch.isfinite(s["delta"]).all() for s in opt.state.values())
    assert opt.num_skipped == 1


class _no_warning:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *a):
        self._w.__exit__(*a)
        return False


@pytest.mark.parametrize("kw", [dict(l2_regularize=float("nan")), dict(xent_regularize=float("inf")),
                                dict(out_of_range_regularize=-1.0),
                                dict(leaky_hmm_coefficient=float("nan"))])
def test_chain_options_validated(kw):
    from pkwrap.chain import ChainOptions
    with pytest.raises(ValueError, match=list(kw)[0]):
        ChainOptions(**kw)


@pytest.mark.parametrize("kw", [dict(max_change=float("nan")), dict(lr=float("inf")),
                                dict(momentum=float("nan")), dict(max_param_change=float("inf"))])
def test_ngsgd_options_validated(kw):
    from pkwrap.optim import NGSGD
    with pytest.raises(ValueError, match=list(kw)[0]):
        NGSGD(torch.nn.Linear(2, 2).parameters(), **kw)
    with pytest.raises(ValueError, match="max_change of group 'g'"):
        NGSGD([{"params": torch.nn.Linear(2, 2).parameters(), "name": "g",
                "max_change": float("nan")}])


# ------------------------------------------------------------------------ sizes
def test_binary_fst_sizes_checked_before_allocation(tmp_path):
    data = bytearray(fixture_path("mono", "den.fst").read_bytes())
    # header: magic, "vector", "standard", version, flags, properties, start, #states, #arcs
    assert struct.unpack_from("<q", data, 50)[0] == read_fst(MONO / "den.fst").num_states
    for off, value, msg in [(50, 2 ** 40, "more than the .* bytes left"),
                            (58, 2 ** 40, "more than the .* bytes left"),
                            (66 + 4, 2 ** 40, "claims .* arcs")]:
        d = bytearray(data)
        struct.pack_into("<q", d, off, value)
        p = tmp_path / "d.fst"
        p.write_bytes(bytes(d))
        with pytest.raises(FstFormatError, match=msg):
            read_fst(p)
    p.write_bytes(bytes(data[:len(data) // 2]))
    with pytest.raises(FstFormatError, match="d.fst"):
        read_fst(p)


def test_egs_index_vector_size_flip():
    data = bytearray(EGS.read_bytes())
    i = data.index(b"<I1V> ") + len(b"<I1V> ")
    assert data[i] == 4
    struct.pack_into("<i", data, i + 1, 2 ** 31 - 1)
    with pytest.raises(KaldiFormatError, match="Index-vector size 2147483647"):
        list(read_chain_egs_buffer(bytes(data)))


def read_chain_egs_buffer(data):
    from pkwrap.kaldi.chain_egs import CHAIN_EG_HOLDER
    from pkwrap.kaldi.table import _iter_archive
    return _iter_archive(data, "damaged.ark", CHAIN_EG_HOLDER)


@pytest.mark.parametrize("text,msg", [
    ("0 1 3 3 0.5\n1 2000000000 4 4\n2000000000\n", "state id 2000000000 is out of range"),
    ("0 1 3 3\n1\n-1 5.0\n", "negative state id -1"),
    ("0 1 -3 -3\n1\n", "label"),
    ("0 1 3 3 nan\n1\n", "weight nan"),
    ("0 1 3 3 5000000000\n1\n", None),  # a weight, fine
])
def test_text_fst_ids_bounded(text, msg):
    if msg is None:
        assert read_fst_text(text, name="t.fst").num_states == 2
        return
    with pytest.raises(FstFormatError, match=msg):
        read_fst_text(text, name="t.fst")


def test_topology_and_transition_model_ids_bounded(tmp_path):
    from pkwrap.kaldi.hmm import read_topology, read_transition_model
    topo = fixture_path("mono", "topo").read_text()
    first = topo.split("<ForPhones>")[1].split()[0]
    bad = topo.replace("<ForPhones>\n%s " % first, "<ForPhones>\n200000000 ", 1)
    assert bad != topo
    with pytest.raises(KaldiFormatError, match="phone id 200000000"):
        read_topology(io.BytesIO(bad.encode()))
    txt = fixture_path("mono", "trans.mdl.txt").read_text()
    assert "<Tuples> 17 \n1 0 0 1 \n" in txt
    p = tmp_path / "m.txt"
    p.write_text(txt.replace("<Tuples> 17 \n1 0 0 1 \n", "<Tuples> 17 \n1 0 0 300000000 \n"))
    with pytest.raises(KaldiFormatError, match="pdf 300000000, out of range"):
        read_transition_model(str(p))


# ------------------------------------------------------------------------ semantics
def _den_with(tmp_path, edit):
    fst = read_fst(MONO / "den.fst")
    edit(fst)
    p = tmp_path / "den.fst"
    from pkwrap.kaldi.fst import write_fst_binary
    with open(p, "wb") as f:
        write_fst_binary(fst, f)
    return p


def test_fst_arc_to_missing_state_rejected_everywhere(tmp_path):
    from pkwrap.decode.graph import GraphError, _read_any_fst
    p = _den_with(tmp_path, lambda f: f.nextstate.__setitem__(3, f.num_states + 5))
    with pytest.raises(FstFormatError, match="goes to state %d, which does not exist"
                       % (read_fst(MONO / "den.fst").num_states + 5)):
        read_fst(p)
    with pytest.raises(GraphError, match="den.fst: arc .* does not exist"):
        _read_any_fst(p)  # read by OpenFst (kaldifst), then validated


def test_decoding_graph_labels_within_transition_model(tmp_path):
    import kaldifst
    from pkwrap.decode.graph import DecodingGraph, GraphError
    from pkwrap.decode.lexicon import SymbolTable
    from pkwrap.kaldi.hmm import read_transition_model
    tm = read_transition_model(MONO / "trans.mdl")
    g = kaldifst.StdVectorFst()
    s0, s1 = g.add_state(), g.add_state()
    g.start = s0
    g.set_final(s1, 0.0)
    ntid = len(tm.transition_id_to_pdf_array)
    g.add_arc(s0, kaldifst.StdArc(ntid + 10, 1, 0.0, s1))
    with pytest.raises(GraphError, match="input label %d, outside \\[0, %d\\)" % (ntid + 10, ntid)):
        DecodingGraph(g, SymbolTable(), SymbolTable(), tm, name="HCLG.fst")


def test_den_fst_start_state_without_arcs(tmp_path):
    from pkwrap.chain import DenominatorGraph
    fst = read_fst(MONO / "den.fst")
    start = fst.start
    arcs = [(int(fst.src[i]), int(fst.ilabel[i]), int(fst.olabel[i]), float(fst.weight[i]),
             int(fst.nextstate[i])) for i in range(fst.num_arcs) if fst.src[i] != start]
    finals = {s: float(w) for s, w in enumerate(fst.final) if np.isfinite(w)}
    finals[start] = 0.0
    p = tmp_path / "den.fst"
    write_fst(Fst.from_arcs(fst.num_states, start, arcs, finals), p)
    with pytest.raises(ValueError, match="start state %d has no arcs" % start):
        DenominatorGraph.from_fst(p, 200)


def _rewrite_first_eg(tmp_path, edit, text=False):
    key, eg = next(iter(read_chain_egs("ark:%s" % EGS)))
    edit(eg)
    p = tmp_path / "e.ark"
    write_chain_egs(("ark,t:%s" if text else "ark:%s") % p, [(key, eg)])
    return p


@pytest.mark.parametrize("text", [False, True])
def test_egs_with_epsilon_or_bad_label_rejected(tmp_path, text):
    def eps(eg):
        f = eg.supervision.fst
        f.ilabel[2] = f.olabel[2] = 0
    p = _rewrite_first_eg(tmp_path, eps, text)
    with pytest.raises(KaldiFormatError, match="e.ark, key .*input label 0, outside \\[1, "):
        list(read_chain_egs("ark:%s" % p))

    def big(eg):
        f = eg.supervision.fst
        f.ilabel[2] = f.olabel[2] = eg.supervision.label_dim + 1
    p = _rewrite_first_eg(tmp_path, big, text)
    with pytest.raises(KaldiFormatError, match="input label 35, outside \\[1, 35\\)"):
        list(read_chain_egs("ark:%s" % p))


def test_egs_not_time_synchronous_rejected(tmp_path):
    def skip(eg):
        f = eg.supervision.fst
        assert (f.src[0], f.nextstate[0], f.src[4], f.nextstate[4]) == (0, 1, 2, 4)
        f.nextstate[0] = 4  # state 4 is two frames from the start
    p = _rewrite_first_eg(tmp_path, skip)
    with pytest.raises(KaldiFormatError, match="time-synchronous|frames"):
        list(read_chain_egs("ark:%s" % p))


def test_egs_nonfinite_deriv_weights_rejected(tmp_path):
    def dw(eg):
        n = len(eg.output_indexes)
        w = torch.ones(n)
        w[1] = float("inf")
        eg.deriv_weights = w
    p = _rewrite_first_eg(tmp_path, dw)
    with pytest.raises(KaldiFormatError, match="deriv_weights"):
        list(read_chain_egs("ark:%s" % p))


def test_e2e_egs_negative_self_loop_rejected(tmp_path):
    key, eg = next(iter(read_chain_egs("ark:%s" % fixture_path("e2e", "cegs_e2e.ark"))))
    f = eg.supervision.e2e_fsts[0]
    loops = np.flatnonzero(f.nextstate == f.src)
    assert len(loops)
    f.weight[loops[0]] = -3.0
    p = tmp_path / "e.ark"
    write_chain_egs("ark:%s" % p, [(key, eg)])
    with pytest.raises(KaldiFormatError, match="self-loop of negative cost"):
        list(read_chain_egs("ark:%s" % p))


def test_truncated_graphs_archive_is_an_error(tmp_path):
    data = fixture_path("e2e", "graphs.fsts").read_bytes()
    assert len(RandomAccessTableReader("ark:%s" % fixture_path("e2e", "graphs.fsts"),
                                       FST_HOLDER)) > 1
    p = tmp_path / "graphs.fsts"
    p.write_bytes(data[:len(data) - 37])
    with pytest.raises(KaldiFormatError, match="graphs.fsts"):
        RandomAccessTableReader("ark:%s" % p, FST_HOLDER)
    # and a round trip through pkwrap's writer is what Kaldi wrote
    out = tmp_path / "copy.fsts"
    from pkwrap.kaldi.table import SequentialTableReader
    with TableWriter("ark:%s" % out, FST_HOLDER) as w:
        for k, f in SequentialTableReader("ark:%s" % fixture_path("e2e", "graphs.fsts"),
                                          FST_HOLDER):
            w[k] = f
    assert out.read_bytes() == data


# ------------------------------------------------------------------------ trainer
def _trainer_setup(tmp_path, time_strides=(1, 3), **cfg):
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import TDNNFModel
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train import TrainConfig, Trainer
    from pkwrap.train.data import EgsDataset
    data = EgsDataset.from_kaldi(str(EGS))
    torch.manual_seed(0)
    model = TDNNFModel(34, feat_dim=40, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=4,
                       time_strides=time_strides, prefinal_dim=8, prefinal_big_dim=16,
                       use_idct=False)
    loss = ChainLoss(DenominatorGraph.from_fst(str(MONO / "den.fst"), 34), ChainOptions())
    conf = dict(minibatch_size="1", checkpoint_every=0, log_every=2, progress_bar=False,
                tensorboard=False, max_steps=6)
    conf.update(cfg)
    return lambda m=model: Trainer(m, loss, NGSGD(kaldi_param_groups(m), lr=0.002), data,
                                   TrainConfig(str(tmp_path / "exp"), **conf)), data, model


def test_trainer_reports_too_little_egs_context_before_training(tmp_path):
    make, data, _ = _trainer_setup(tmp_path, time_strides=(1, 3, 3, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="training egs, eg '%s': chunk of .* too short for the "
                       "model .* --left-context >= " % data.keys[0]):
        make()
    assert not (tmp_path / "exp" / "checkpoints").exists()


def test_trainer_combine_mode(tmp_path):
    """combine_mode="average": final.pt holds the average of the last combine_last
    checkpoints, batchnorm statistics included, logged as such; a bad mode is refused."""
    from pkwrap.train import TrainConfig
    from pkwrap.train.checkpoint import list_checkpoints, load_checkpoint
    from pkwrap.train.diagnostics import average_state_dicts
    make, data, model = _trainer_setup(tmp_path, checkpoint_every=2, combine_last=3,
                                       keep_last=3, combine_mode="average")
    tr = make()
    tr.valid_data = data
    tr.train()
    ckpts = [load_checkpoint(p)["model"] for _, p in list_checkpoints(str(tmp_path / "exp" /
                                                                          "checkpoints"))]
    assert len(ckpts) == 3
    avg = average_state_dicts(ckpts)
    final = load_checkpoint(str(tmp_path / "exp" / "final.pt"))["model"]
    weights = [k for k in avg if k.endswith("weight")]
    assert weights and all(torch.allclose(final[k], avg[k]) for k in avg
                           if avg[k].is_floating_point())
    assert not torch.allclose(final[weights[0]], ckpts[-1][weights[0]])
    log = (tmp_path / "exp" / "log" / "train.0.log").read_text()
    assert "combined the last 3 of 3 checkpoints (average)" in log
    # no valid egs: the same average, with no objective to show
    make = _trainer_setup(tmp_path / "b", checkpoint_every=2, combine_last=3, keep_last=3,
                          combine_mode="average")[0]
    make().train()
    final2 = load_checkpoint(str(tmp_path / "b" / "exp" / "final.pt"))["model"]
    assert all(torch.equal(final2[k], final[k]) for k in weights)
    with pytest.raises(ValueError, match="combine_mode must be 'valid' or 'average'"):
        TrainConfig(str(tmp_path / "x"), combine_mode="avg")


class _Poisoned(torch.nn.Module):
    """The wrapped model's output with +inf in one place: every minibatch fails."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        y = self.m(x)
        y = y["output"] if isinstance(y, dict) else y[0] if isinstance(y, tuple) else y
        return y + torch.where(torch.arange(y.shape[-1]) == 3, float("inf"), 0.0)


def test_trainer_counts_failed_minibatches_and_aborts(tmp_path):
    make, data, model = _trainer_setup(tmp_path, min_minibatches_before_abort=4,
                                       max_failed_fraction=0.5)
    tr = make(_Poisoned(model))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"training aborted at step 4: 4 of 4 steps skipped "
                                           r"\(4 of 4 minibatches over 1 rank\(s\) had a "
                                           r"non-finite .* max_failed_fraction=0.5"):
        tr.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    log = (tmp_path / "exp" / "log" / "train.0.log").read_text()
    assert log.count("non-finite objective or gradient") == 4


@pytest.mark.slow
def test_nonfinite_minibatch_on_one_rank_skipped_by_both(tmp_path):
    """2 ranks (torchrun, gloo on the CPU): NaN, +inf and -inf outputs on one rank's
    minibatch; both ranks skip those steps together and stay identical, clean steps
    still update, each failed minibatch is counted once (tests/ddp_scripts/
    nonfinite_skip_worker.py has the checks)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    worker = REPO / "tests" / "ddp_scripts" / "nonfinite_skip_worker.py"
    env = dict(script_env(), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(worker), str(tmp_path / "exp")],
                       capture_output=True, text=True, env=env, timeout=180)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "NONFINITE-DDP-OK skipped=3" in p.stdout


def test_trainer_reports_unused_egs_inputs(tmp_path):
    make, data, _ = _trainer_setup(tmp_path, max_steps=0)
    for eg in data.examples:
        eg.inputs["ivector"] = torch.zeros(1, 10)
    make()
    log = (tmp_path / "exp" / "log" / "train.0.log").read_text()
    assert "input(s) ivector that the model does not consume" in log


# ------------------------------------------------ classes found by bench/fuzz_inputs.py
def test_failed_program_leaves_no_output(tmp_path):
    """A program that fails, by an exception or by returning a non-zero status (Kaldi's
    "nothing was done"), leaves none of its outputs: neither committed archives nor
    temporaries of outputs still open."""
    out, other = tmp_path / "a.ark", tmp_path / "b.ark"

    def nothing_done(argv):
        with TableWriter("ark:%s" % out, "matrix") as w:
            w["u"] = np.zeros((1, 1), np.float32)
        assert out.exists()
        return 1

    assert run_program(nothing_done, "prog", []) == 1
    assert _leftovers(tmp_path) == []

    def dies_with_an_output_open(argv):
        with TableWriter("ark:%s" % out, "matrix") as w:
            w["u"] = np.zeros((1, 1), np.float32)
        kio.AtomicFile(other).write(b"x")  # opened, never committed nor discarded
        raise ValueError("bad input")

    with pytest.raises(SystemExit, match="prog: bad input"):
        run_program(dies_with_an_output_open, "prog", [])
    assert _leftovers(tmp_path) == []
    assert run_program(lambda argv: TableWriter("ark:%s" % out, "matrix").close(),
                       "prog", []) is None
    assert _leftovers(tmp_path) == ["a.ark"]  # success keeps it


def test_sigterm_removes_temporaries(tmp_path):
    code = ("import os, signal, time\n"
            "from pkwrap.cli import run_program\n"
            "from pkwrap.kaldi.io import AtomicFile\n"
            "def main(argv):\n"
            "    f = AtomicFile(%r)\n"
            "    f.write(b'partial')\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "run_program(main, 'prog', [])\n" % str(tmp_path / "out.ark"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=script_env(), timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "prog: terminated (SIGTERM)", r.stderr
    assert _leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_writers_are_swept(tmp_path):
    out = tmp_path / "x.ark"
    dead = 4194000
    while True:  # a pid that does not exist here
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    (tmp_path / ("x.ark.tmp.%d" % dead)).write_bytes(b"left by kill -9")
    (tmp_path / ("x.ark.tmp.%d" % os.getppid())).write_bytes(b"a live writer's")
    with atomic_output(out) as f:
        f.write(b"new")
    assert _leftovers(tmp_path) == ["x.ark", "x.ark.tmp.%d" % os.getppid()]


def test_fst_files_checked_before_openfst_reads_them(tmp_path):
    """Vector FSTs are read and validated by pkwrap before kaldifst (OpenFst) reads them;
    const FSTs get their header sizes checked: absurd sizes are errors naming the file,
    not allocations, crashes or OpenFst's own multi-line messages."""
    pytest.importorskip("kaldifst")
    from pkwrap.decode.graph import GraphError, _read_any_fst
    from pkwrap.kaldi.fst import check_fst_file
    raw = (MONO / "den.fst").read_bytes()
    o = 4
    for _ in range(2):
        (n,) = struct.unpack("<i", raw[o:o + 4])
        o += 4 + n
    hdr = o + 16  # start, num_states, num_arcs
    for off, v, what in ((hdr + 8, 1 << 40, "states"), (hdr + 8, -5, "start"),
                         (hdr, 1 << 40, "start")):
        bad = bytearray(raw)
        bad[off:off + 8] = struct.pack("<q", v)
        p = tmp_path / "bad.fst"
        p.write_bytes(bytes(bad))
        with pytest.raises(GraphError, match="bad.fst: .*%s" % what):
            _read_any_fst(p)
    p.write_bytes(raw[:100])
    with pytest.raises(FstFormatError, match="bad.fst"):
        check_fst_file(p)
    # a const FST (Kaldi's HCLG.fst) declaring 2^40 states in a few bytes
    p.write_bytes(raw[:4] + struct.pack("<i", 5) + b"const" + raw[o - 12:o] +
                  struct.pack("<iiQqqq", 2, 0, 0, 0, 1 << 40, 3) + b"\0" * 64)
    with pytest.raises(FstFormatError, match="bad.fst: const FST header"):
        check_fst_file(p)


@pytest.mark.parametrize("reader", ["symbols", "lexicon", "transcripts", "arpa"])
def test_text_readers_name_the_file_on_bad_bytes(tmp_path, reader):
    from pkwrap.decode import read_lexicon
    from pkwrap.decode.scoring import read_transcripts
    from pkwrap.kaldi.symbol_table import SymbolTable
    p = tmp_path / "in.txt"
    p.write_bytes(b"a 1\n\xff\xfe 2\n")
    if reader == "arpa":
        pytest.importorskip("kaldifst")
        from pkwrap.decode.graph import make_arpa_grammar
        words = SymbolTable.from_symbols(["<eps>", "a", "#0", "<s>", "</s>"])
        f = lambda: make_arpa_grammar(p, words)  # noqa: E731
    else:
        f = {"symbols": lambda: SymbolTable.read(p), "lexicon": lambda: read_lexicon(p),
             "transcripts": lambda: read_transcripts(p)}[reader]
    with pytest.raises(FileError, match=r"in.txt: not UTF-8 text"):
        f()


def test_wspecifier_with_empty_file_name():
    from pkwrap.kaldi.table import parse_wspecifier
    for spec in ("ark:", "ark,t: ", "ark,scp:"):
        with pytest.raises(ValueError, match="empty file name"):
            parse_wspecifier(spec)


def test_compressed_matrix_payload_checked_before_allocation():
    from pkwrap import _pkwrap
    # format 2 (uint16), min, range, 2^30 x 2^30: the header asks for 8 EiB, 10 bytes follow
    data = struct.pack("<iffii", 2, 0.0, 1.0, 1 << 30, 1 << 30) + b"\0" * 10
    with pytest.raises(ValueError, match="wants"):
        _pkwrap.decompress_matrix(np.frombuffer(data, np.uint8))


def test_topology_probabilities_must_be_probabilities(tmp_path):
    from pkwrap.kaldi.hmm import read_topology
    text = fixture_path("mono", "topo").read_text()
    import re as _re
    m = _re.search(r"<Transition> (\d+) ([0-9.]+)", text)
    p = tmp_path / "topo"
    p.write_text(text[:m.start(2)] + "1e38" + text[m.end(2):])
    with pytest.raises(KaldiFormatError, match=r"topo.*transition probability"):
        read_topology(p)


def test_lang_dir_labels_and_disambig_checked(tmp_path):
    pytest.importorskip("kaldifst")
    from pkwrap.decode import (GraphError, SymbolTable, build_decoding_graph_from_lang,
                               read_lexicon, write_lang_dir)
    from pkwrap.kaldi.hmm import read_transition_model, read_tree
    lex = tmp_path / "lexicon.txt"
    lex.write_text("one P4 P5\ntwo P6 P7\n")
    lang = tmp_path / "lang"
    write_lang_dir(lang, read_lexicon(lex), SymbolTable.read(MONO / "phones.txt"),
                   grammar=["one", "two"], sil_phone="SIL")
    tree, tm = read_tree(MONO / "tree"), read_transition_model(MONO / "trans.mdl")
    build_decoding_graph_from_lang(lang, tree, tm)  # fine as written
    (lang / "phones" / "disambig.int").write_text("")
    with pytest.raises(GraphError, match="disambig.int: lists"):
        build_decoding_graph_from_lang(lang, tree, tm)


def test_nothing_done_is_one_line_naming_the_input(tmp_path):
    """Kaldi's "nothing was done" failure (exit status 1): one line naming the input, no
    output left (Kaldi would leave an empty archive)."""
    empty = tmp_path / "empty.ark"
    empty.write_bytes(b"")
    out = "ark:%s" % (tmp_path / "out.ark")
    for args in (("nnet3-chain-copy-egs", "ark:%s" % empty, out),
                 ("nnet3-chain-merge-egs", "ark:%s" % empty, out),
                 ("chain-get-supervision", MONO / "tree", MONO / "trans.mdl",
                  "ark:%s" % empty, out),
                 ("nnet3-chain-get-egs", MONO / "normalization.fst", "ark:%s" % empty,
                  "ark:%s" % empty, out)):
        rc, err = _prog(*args)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith(args[0] + ": ark:") \
            and "empty.ark" in lines[0], err
    assert _leftovers(tmp_path) == ["empty.ark"]


def test_python_warnings_are_one_line(capsys):
    import warnings

    def main(argv):
        warnings.warn("two\nlines")
    run_program(main, "prog", [])
    assert capsys.readouterr().err == "WARNING (prog): two lines\n"


def test_specifiers_parsed_by_the_shared_parser(tmp_path):
    from pkwrap.chain.phone_lm import read_int_vector_archive
    seqs = tmp_path / "seqs.txt"
    seqs.write_text("u1 1 2 3\nu2 1 99999999999 3\n")
    with pytest.raises(ValueError, match="unknown option"):
        list(read_int_vector_archive("ark,foo:%s" % seqs))
    with pytest.raises(ValueError, match="seqs.txt:2: .*int32"):
        list(read_int_vector_archive("ark:%s" % seqs))
    rc, err = _prog("compute-wer", "ark,foo:%s" % seqs, "ark:%s" % seqs)
    assert rc == 1 and "unknown option" in err and len(err.strip().splitlines()) == 1


def test_transition_probabilities_sum_to_one(tmp_path):
    """A model whose transition-state probabilities do not sum to one is refused (it made
    mkgraph's weight pushing run forever)."""
    from pkwrap.kaldi.hmm import read_transition_model, write_transition_model
    tm = read_transition_model(MONO / "trans.mdl")
    lp = tm.log_probs.copy()
    lp[-1] = -1e-20  # probability 1 for a transition that had 0.5
    tm.log_probs = lp
    p = tmp_path / "bad.mdl"
    write_transition_model(tm, str(p))
    with pytest.raises(KaldiFormatError, match="bad.mdl: .*sum to"):
        read_transition_model(p)


def test_fst_accepting_and_multi_line_errors():
    from pkwrap.kaldi.fst import validate_fst
    f = read_fst(MONO / "phone_lm.fst")
    none_final = Fst(f.num_states, f.start, np.full_like(f.final, np.inf), f.state_offsets,
                     f.ilabel, f.olabel, f.weight, f.nextstate)
    validate_fst(none_final, "lm")  # well-formed ...
    with pytest.raises(FstFormatError, match="lm: no final state"):
        validate_fst(none_final, "lm", accepting=True)  # ... but accepts nothing
    assert describe_error(RuntimeError("lib.cc:12\n[E] it broke\n")) == "lib.cc:12 [E] it broke"


def test_library_log_warnings_are_one_kaldi_style_line(capsys, monkeypatch):
    """A library warning (logging) inside a program is one 'WARNING (prog): ...' line, as
    Kaldi prints its own (it used to come out bare, without level or program)."""
    import logging
    from pkwrap.cli import run_program
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a program (no pytest)

    def main(argv):
        logging.getLogger("pkwrap.test").warning("utterance u1: L o G is empty:\n  check G")
        return 0

    assert run_program(main, "prog", []) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["WARNING (prog): utterance u1: L o G is empty: check G"]
    assert logging.lastResort is not None and "prog" not in logging.lastResort.format(
        logging.makeLogRecord({"msg": "x", "levelname": "WARNING"}))  # restored

    def main2(argv):  # a program that configures logging itself keeps its own format
        logging.basicConfig(format="LOG %(message)s", level=logging.INFO, force=True)
        logging.getLogger("pkwrap.test").info("combined")
        return 0

    try:
        assert run_program(main2, "prog", []) == 0
        assert "LOG combined" in capsys.readouterr().err
    finally:
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)


# ------------------------- classes found when the harness covered the lattice recipe and
# pkwrap-chain-train (bench/fuzz_inputs.py --programs apply-cmvn-online,...)
SMALL_EGS = REPO / "tests" / "fixtures" / "kaldi_recipe_egs_small"
SMALL_LAT = REPO / "tests" / "fixtures" / "kaldi_recipe_small"


@pytest.mark.parametrize("content, msg", [
    (b"", r"empty \(expected a number\)"), (b"abc\n", "expected an integer number, got 'abc'"),
    (b"\xff2\n", r"not UTF-8 text \(byte 0xff at offset 0\)"), (b"0\n", "0 is less than 1"),
])
def test_one_number_files_name_the_file(tmp_path, content, msg):
    """num_jobs, ivector_period, frame_shift, an egs dir's info/*: one reader
    (kio.read_number_file) whose errors name the file."""
    p = tmp_path / "num_jobs"
    p.write_bytes(content)
    with pytest.raises(FileError, match="num_jobs: " + msg):
        kio.read_number_file(p, int, minimum=1)
    assert kio.read_number_file(_write(tmp_path / "fs", b"0.01\n"), float) == 0.01


def _write(p, data):
    p.write_bytes(data)
    return p


def test_text_inputs_of_online_cmvn_name_the_file(tmp_path):
    """The online-CMVN config, spk2utt: bad bytes, bad options give one line naming
    the file; an empty config is Kaldi's defaults."""
    from pkwrap.kaldi.cmvn import OnlineCmvnOptions, read_spk2utt
    conf = _write(tmp_path / "cmvn.conf", b"--cmn-window=600\n--speaker\xff-frames=6\n")
    with pytest.raises(FileError, match=r"cmvn.conf: not UTF-8"):
        OnlineCmvnOptions.from_string("--config=%s" % conf)
    conf.write_text("--speaker-frames=6\n")  # global-frames 200 > speaker-frames 6
    with pytest.raises(ValueError, match=r"cmvn.conf: online CMVN options need"):
        OnlineCmvnOptions.from_string("--config=%s" % conf)
    conf.write_text("")
    assert OnlineCmvnOptions.from_string("--config=%s" % conf) == OnlineCmvnOptions()
    with pytest.raises(FileError, match=r"spk2utt: not UTF-8"):
        read_spk2utt(_write(tmp_path / "spk2utt", b"s1 u1\n\xfe u2\n"))
    rc, err = _prog("apply-cmvn-online", "--spk2utt=ark:%s" % (tmp_path / "spk2utt"),
                    SMALL_LAT / "exp/chain/tdnn/egs/global_cmvn.stats",
                    "ark:%s" % EGS, "ark:%s" % (tmp_path / "o.ark"))
    assert rc == 1 and err.strip().splitlines() == [
        "apply-cmvn-online: %s: not UTF-8 text (byte 0xfe at offset 6)" % (tmp_path / "spk2utt")]


def test_nothing_done_names_the_input_lattice_programs(tmp_path):
    """apply-cmvn-online and lattice-align-phones with nothing to do: Kaldi's exit status
    1, as one line naming the input, and no output left."""
    empty = _write(tmp_path / "empty.ark", b"")
    out = "ark:%s" % (tmp_path / "out.ark")
    for args in (("apply-cmvn-online", SMALL_LAT / "exp/chain/tdnn/egs/global_cmvn.stats",
                  "ark:%s" % empty, out),
                 ("lattice-align-phones", SMALL_LAT / "exp/chain/lats/final.mdl",
                  "ark:%s" % empty, out)):
        rc, err = _prog(*args)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith(
            "%s: ark:%s: " % (args[0], empty)), err
    assert _leftovers(tmp_path) == ["empty.ark"]


def test_lattice_transition_ids_checked_against_the_model():
    """A lattice whose transition-ids are not the model's (a flipped bit) is one
    utterance's error (PhoneAlignError, reported and skipped), not an IndexError."""
    from pkwrap.kaldi.hmm import read_transition_model
    from pkwrap.kaldi.lattice import PhoneAlignError, phone_align_lattice, read_compact_lattices
    tm = read_transition_model(SMALL_LAT / "exp/chain/lats/final.mdl")
    key, lat = next(iter(read_compact_lattices(str(SMALL_LAT / "exp/chain/lats/lat.1.gz"))))
    phone_align_lattice(lat, tm, key=key)
    s = next(i for i, a in enumerate(lat.arcs) if a and len(a[0][3]))
    lat.arcs[s][0][3][0] = tm.num_transition_ids + 1 << 20
    with pytest.raises(PhoneAlignError, match="utterance %s: state %d: transition-id %d out "
                       r"of range \[1, %d\]" % (key, s, tm.num_transition_ids + 1 << 20,
                                               tm.num_transition_ids)):
        phone_align_lattice(lat, tm, key=key)


def test_gzipped_archives_read_in_process(tmp_path):
    """ali.N.gz / lat.N.gz are decompressed in this process: a damaged one is one error
    naming it (no gunzip message before it)."""
    from pkwrap.chain.supervision import INT_VECTOR_HOLDER
    from pkwrap.kaldi.table import read_archive_file
    ali = (SMALL_EGS / "tree" / "ali.1.gz").read_bytes()
    assert len(list(read_archive_file(SMALL_EGS / "tree" / "ali.1.gz", INT_VECTOR_HOLDER))) > 0
    bad = bytearray(ali)
    bad[len(bad) // 2] ^= 0x10
    p = _write(tmp_path / "ali.1.gz", bytes(bad))
    with pytest.raises(FileError, match="ali.1.gz: cannot decompress"):
        list(read_archive_file(p, INT_VECTOR_HOLDER))
    with pytest.raises(FileError, match="ali.1.gz: cannot decompress"):
        list(read_archive_file(_write(p, ali[:len(ali) // 2]), INT_VECTOR_HOLDER))
    with pytest.raises(FileError, match=r"ali.1.gz: empty file \(not gzip data\)"):
        list(read_archive_file(_write(p, b""), INT_VECTOR_HOLDER))


def test_config_without_input_or_output_node_refused(tmp_path):
    """Kaldi's Nnet::Check: a network has input and output nodes; an empty config made an
    empty network that was written and could not be read back."""
    from pkwrap.nnet3 import nnet3_from_config
    for text, what in (("", "input node (an empty config)"),
                       ("input-node name=input dim=4\n", "output node (nodes: input)")):
        with pytest.raises(KaldiFormatError,
                           match=re.escape("final.config: the network has no " + what)):
            nnet3_from_config(_write(tmp_path / "final.config", text.encode()))
    rc, err = _prog("nnet3-init", tmp_path / "final.config", tmp_path / "0.raw")
    assert rc == 1 and "final.config: the network has no output node" in err
    assert not (tmp_path / "0.raw").exists()


def test_normalization_fst_labels_within_the_supervision(tmp_path):
    """A normalization FST with a label beyond the supervision's pdfs (another tree, or
    a flipped bit) is an error, not silently dropped paths."""
    from pkwrap.chain.supervision import add_weight_to_supervision, read_supervisions
    norm = read_fst(MONO / "normalization.fst")
    _, sup = next(iter(read_supervisions("ark:" + str(_sup_ark(tmp_path)))))
    add_weight_to_supervision(sup, norm, "u")
    norm = copy.deepcopy(norm)
    norm.ilabel[-1] = norm.olabel[-1] = 2000000000
    norm.name = "bad_norm.fst"
    with pytest.raises(ValueError, match="bad_norm.fst: normalization FST has label "
                       "2000000000 but the supervision has %d pdfs" % sup.label_dim):
        add_weight_to_supervision(sup, norm, "u")


def _sup_ark(tmp_path):
    out = tmp_path / "sup.ark"
    lines = (MONO / "data" / "phones_with_lengths.txt").read_text().splitlines()[:1]
    (tmp_path / "pwl.txt").write_text(lines[0] + "\n")
    rc, err = _prog("chain-get-supervision", "--frame-subsampling-factor=3", MONO / "tree",
                    MONO / "trans.mdl", "ark,t:%s" % (tmp_path / "pwl.txt"), "ark:%s" % out)
    assert rc == 0, err
    return out


def test_resumable_program_keeps_completed_outputs(tmp_path):
    """A resumable program (pkwrap-chain-train) that fails keeps the files it completed
    (stages, checkpoints: a rerun continues from them); temporaries are removed."""
    done, tmp = tmp_path / "den.fst", tmp_path / "ckpt.pt"

    def fails_late(argv):
        with atomic_output(done) as f:
            f.write(b"complete")
        kio.AtomicFile(tmp).write(b"half")  # never committed
        raise ValueError("egs/cegs.2.ark: truncated")

    with pytest.raises(SystemExit, match="prog: egs/cegs.2.ark: truncated"):
        run_program(fails_late, "prog", [], resumable=True)
    assert _leftovers(tmp_path) == ["den.fst"]
    with pytest.raises(SystemExit):
        run_program(fails_late, "prog", [])  # an ordinary program leaves nothing
    assert _leftovers(tmp_path) == []


def _chain_train_dir(tmp_path):
    import shutil
    root = tmp_path / "recipe"
    shutil.copytree(SMALL_EGS / "tree", root / "exp/chain/tree")
    shutil.copytree(SMALL_EGS / "configs", root / "exp/chain/tdnn/configs")
    shutil.copytree(SMALL_EGS / "egs", root / "egs")
    return root


def _chain_train(root, *extra):
    args = ["--stage=-10", "--chain.xent-regularize", "0.1", "--trainer.srand=0",
            "--trainer.num-epochs=0.5", "--trainer.optimization.num-jobs-final=1",
            "--trainer.num-chunk-per-minibatch=4", "--egs.chunk-width=140,100,160",
            "--egs.dir=egs", "--cleanup.remove-egs=false", "--use-gpu=no",
            "--tree-dir=exp/chain/tree", "--dir=exp/chain/tdnn", "--pkwrap.num-threads=1",
            "--feat-dir=data/train_hires", "--lat-dir=exp/chain/lats",
            "--pkwrap.checkpoint-every=2"] + list(extra)
    r = subprocess.run([sys.executable, "-m", "pkwrap.train.chain_train"] + args,
                       cwd=str(root), capture_output=True, text=True, env=script_env(),
                       timeout=300)
    return r.returncode, [ln for ln in r.stderr.splitlines()
                          if ln.startswith("pkwrap-chain-train: ")]


@pytest.mark.parametrize("name, data, msg", [
    ("exp/chain/tree/num_jobs", b"", "exp/chain/tree/num_jobs: empty (expected a number)"),
    ("exp/chain/tree/phones.txt", b"", "exp/chain/tree/phones.txt: empty symbol table"),
    ("exp/chain/tdnn/configs/final.config", b"",
     "exp/chain/tdnn/configs/final.config: the network has no input node"),
])
def test_chain_train_damaged_exp_dir_one_line(tmp_path, name, data, msg):
    """pkwrap-chain-train on a damaged tree/exp/egs dir: exit 1, one line naming the file,
    and what stays in the exp dir reads back."""
    root = _chain_train_dir(tmp_path)
    _write(root / name, data)
    rc, lines = _chain_train(root, "--exit-stage=0")
    assert rc == 1 and len(lines) == 1 and msg in lines[0], lines
    d = root / "exp/chain/tdnn"
    assert not [p for p in d.rglob("*") if ".tmp" in p.name]
    if (d / "0.mdl").exists():
        from pkwrap.nnet3 import read_nnet3
        read_nnet3(str(d / "0.mdl"))


@pytest.mark.slow
def test_chain_train_failure_keeps_checkpoints_and_resumes(tmp_path):
    """A run that fails at its end (a truncated combine.cegs) keeps its graphs, models
    and checkpoints (before, a failure deleted every file the run had written, so
    nothing could be resumed); with the file repaired, the same command continues from
    the last checkpoint and writes final.mdl."""
    root = _chain_train_dir(tmp_path)
    good = (root / "egs/combine.cegs").read_bytes()
    _write(root / "egs/combine.cegs", good[:len(good) // 2])
    one_iteration = "--trainer.num-epochs=0.2"  # 0.2 x 2 archives x 3 shifts: 1 iteration
    rc, lines = _chain_train(root, one_iteration)
    assert rc == 1 and len(lines) == 1 and "egs/combine.cegs" in lines[0], lines
    d = root / "exp/chain/tdnn"
    for name in ("den.fst", "normalization.fst", "phone_lm.fst", "0.mdl", "1.mdl"):
        assert (d / name).is_file(), name
    assert list((d / "checkpoints").glob("ckpt-*.pt")) and not (d / "final.mdl").exists()
    _write(root / "egs/combine.cegs", good)
    rc, lines = _chain_train(root, one_iteration, "--stage=0")
    assert rc == 0, lines
    assert (d / "final.mdl").is_file()
    assert "resum" in (d / "log" / "train.0.log").read_text().lower()


def test_log_file_write_error_names_the_file(tmp_path):
    """A training log that cannot be written (full disk) stops with one error naming the
    log file, not logging's "--- Logging error ---" traceback and an unnamed OSError."""
    from pkwrap.train.metrics import setup_logger
    log = setup_logger(str(tmp_path / "log"), 0, console=False)
    h = log.handlers[0]
    h.stream = _FullDisk(h.stream, 0)
    try:
        with pytest.raises(FileError, match=r"log/train.0.log: No space left on device"):
            log.info("step 1")
    finally:
        h.stream = h.stream.f
        for x in list(log.handlers):
            log.removeHandler(x)
            x.close()


def test_egs_refuse_nonfinite_ivectors(tmp_path):
    """Online i-vectors with NaN/inf are refused like such features (the utterance is
    reported and skipped; with nothing left, one line naming the input)."""
    sup = _sup_ark(tmp_path)
    key = (tmp_path / "pwl.txt").read_text().split()[0]
    feats = dict(np.load(MONO / "data" / "feats.npz"))[key].astype(np.float32)
    with TableWriter("ark:%s" % (tmp_path / "feats.ark"), "matrix") as w:
        w.write_item(key, feats)
    iv = np.zeros((feats.shape[0] // 10 + 1, 4), np.float32)
    for bad in (np.inf,):  # (NaN: the same np.isfinite check)
        iv[1, 2] = bad
        with TableWriter("ark:%s" % (tmp_path / "iv.ark"), "matrix") as w:
            w.write_item(key, iv)
        rc, err = _prog("nnet3-chain-get-egs", "--online-ivectors=ark:%s" % (tmp_path / "iv.ark"),
                        "--online-ivector-period=10", "--left-context=10",
                        "--right-context=10", "--num-frames=150", "--frame-subsampling-factor=3",
                        MONO / "normalization.fst", "ark:%s" % (tmp_path / "feats.ark"),
                        "ark:%s" % sup, "ark:%s" % (tmp_path / "egs.ark"))
        assert rc == 1 and "online i-vectors contain NaN or inf" in err, err
        assert not (tmp_path / "egs.ark").exists()


def test_egs_with_nonfinite_inputs_refused_on_read(tmp_path):
    """An eg whose input matrix holds NaN/inf is an error naming the file and key when
    read (nnet3-chain-copy-egs copied it silently), as get-egs refuses such features."""
    text = (MONO / "data" / "eg_text_example.txt").read_text()
    lines = text.splitlines(True)
    i = next(i for i, ln in enumerate(lines) if ln.startswith("<NnetIo> input")) + 2
    toks = lines[i].split(" ")
    toks[2] = "inf"  # (the line starts with two spaces)
    lines[i] = " ".join(toks)
    bad = _write(tmp_path / "bad.ark", "".join(lines).encode())
    with pytest.raises(KaldiFormatError, match=r"bad.ark.*input 'input' has NaN or infinite"):
        list(read_chain_egs("ark,t:%s" % bad))
