#!/usr/bin/env python3
"""Bad-input fuzz harness for the ``scripts/`` programs (issue 12).

Derives about a thousand damaged inputs from the Kaldi fixtures in ``tests/fixtures/``
(truncations at many offsets, bit flips, wrong tokens, absurd sizes in headers, NaN/inf
in matrices and weights, negative/huge ids in text tables and FSTs, out-of-range arcs,
bad rspecifiers/wspecifiers, missing inputs, missing/read-only/full output locations,
empty files, the wrong binary/text form, damaged gzip behind ``ark:gunzip -c ...|``) and
runs every program that reads those formats on them, each case in its own process with a
timeout and RLIMIT_AS. Also ``pkwrap-chain-train`` (``python -m pkwrap.train.chain_train``)
on a damaged tree dir, egs dir and exp dir (configs, and a run stopped after iteration 1 that
is resumed): its exp dir is input and output, so after a failure the files it completed may
stay (each must read back), the files it was given must still be there, and log/ and
tensorboard/ do not count. Every outcome is classified:

  OK-success      exit 0 and the outputs are there, non-empty, readable and finite
  OK-clean-error  exit 1 and the last stderr line is one ``prog: ...`` line naming a
                  file (or specifier) of the command; nothing left in the output dir
  DEFECT          CRASH (signal), HANG (timeout), MEMORY (MemoryError / bad_alloc /
                  RLIMIT), TRACEBACK, UNCLEAR (multi-line, no file named, "internal
                  error", unexpected exit status), SILENT (exit 0 on an input that must
                  fail, or NaN/inf in what it wrote or printed), PARTIAL (an output left
                  after a failure, an empty output, a leftover temporary file)

Usage:
  python3 bench/fuzz_inputs.py [--out /tmp/pkwrap_fuzz] [--jobs 2] [--programs a,b]
                               [--max-cases N] [--timeout 60] [--keep]

Prints a table by class and program; writes ``<out>/report.json`` and, for each defect,
``<out>/defects/<case>/`` with the damaged input(s) and ``repro.sh``. Read-only and full
output directories are tmpfs mounts (read-only, or 4 KiB) made with ``unshare -rm``; a
full disk is also simulated with RLIMIT_FSIZE (2 KiB per file). Each case runs in a fork
of a warm worker interpreter (``--subprocess``: a fresh interpreter, as the repro does).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import math
import multiprocessing
import os
import random
import re
import resource
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "kaldi"
SCRIPTS = REPO / "scripts"
MEM_LIMIT = 4 << 30
FSIZE_LIMIT = 2048   # "full disk" by RLIMIT_FSIZE: every file written stops at 2 KiB

# ============================================================================ base inputs


def build_base(base: Path) -> Dict[str, str]:
    """Copy / derive the undamaged inputs into ``base``; returns name -> path."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    from pkwrap.kaldi.table import TableWriter
    base.mkdir(parents=True, exist_ok=True)
    B: Dict[str, str] = {}

    def cp(name, src):
        dst = base / name
        shutil.copyfile(src, dst)
        B[name] = str(dst)

    mono = FIX / "mono"
    for f in ("tree", "trans.mdl", "phone_lm.fst", "den.fst", "normalization.fst",
              "phones.txt", "topo", "tree.txt", "trans.mdl.txt", "den.fst.txt"):
        cp(f, mono / f)
    cp("phone_lm.fst.txt", mono / "phone_lm.fst.txt")
    cp("lm_phone_seqs.txt", mono / "lm_phone_seqs.txt")
    lines = (mono / "data" / "phones_with_lengths.txt").read_text().splitlines()[:3]
    (base / "phones_with_lengths.txt").write_text("\n".join(lines) + "\n")
    B["phones_with_lengths.txt"] = str(base / "phones_with_lengths.txt")
    utts = [ln.split()[0] for ln in lines]
    feats = dict(np.load(mono / "data" / "feats.npz"))
    with TableWriter("ark:%s" % (base / "feats.ark"), "matrix") as w:
        for k in utts:
            w.write_item(k, feats[k])
    B["feats.ark"] = str(base / "feats.ark")
    _run_ok(["chain-get-supervision", "--frame-subsampling-factor=3", B["tree"], B["trans.mdl"],
             "ark,t:" + B["phones_with_lengths.txt"], "ark:%s" % (base / "sup.ark")])
    B["sup.ark"] = str(base / "sup.ark")
    # egs: the Kaldi recipe's (input + ivector, 64 pdfs) and a text eg
    rec = FIX / "kaldi_recipe"
    cp("cegs.ark", rec / "egs" / "cegs.1.ark")
    cp("rec_den.fst", rec / "den.fst")
    txt = (mono / "data" / "eg_text_example.txt").read_text()
    (base / "cegs_text.ark").write_text(txt)
    B["cegs_text.ark"] = str(base / "cegs_text.ark")
    cp("egs_weights.txt", mono / "data" / "egs_weights.txt")
    with open(B["cegs.ark"], "rb") as f, gzip.open(base / "cegs.ark.gz", "wb") as g:
        g.write(f.read())
    B["cegs.ark.gz"] = str(base / "cegs.ark.gz")
    # e2e
    e2e = FIX / "e2e"
    cp("L.fst", e2e / "L.fst")
    cp("L.fst.txt", e2e / "L.fst.txt")
    cp("text.int", e2e / "text.int")
    cp("graphs.fsts", e2e / "graphs.fsts")
    fe = dict(np.load(e2e / "feats.npz"))
    with TableWriter("ark:%s" % (base / "feats_e2e.ark"), "matrix") as w:
        for k in sorted(fe):
            w.write_item(k, fe[k])
    B["feats_e2e.ark"] = str(base / "feats_e2e.ark")
    # decoding: lang dir, model dir, graph, log-likelihoods
    from pkwrap.decode import (SymbolTable, read_lexicon, write_lang_dir,
                               write_loglikes_ark)
    from pkwrap.kaldi.hmm import read_transition_model
    lex = base / "lexicon.txt"
    lex.write_text("zero P1 P2 P3\none P4 P5\ntwo P6 P7\nthree P8 P2 P9\nfour P10 P11\n"
                   "six P15 P16\n")
    B["lexicon.txt"] = str(lex)
    lang, model, graph = base / "lang", base / "model", base / "graph"
    write_lang_dir(lang, read_lexicon(lex), SymbolTable.read(mono / "phones.txt"),
                   grammar=["zero", "one", "two", "three", "four", "six"], sil_phone="SIL")
    model.mkdir(exist_ok=True)
    shutil.copyfile(mono / "tree", model / "tree")
    shutil.copyfile(mono / "trans.mdl", model / "final.mdl")
    _run_ok(["mkgraph", str(lang), str(model), str(graph)])
    B["lang"], B["model"], B["HCLG.fst"] = str(lang), str(model), str(graph / "HCLG.fst")
    B["words.txt"] = str(graph / "words.txt")
    tm = read_transition_model(mono / "trans.mdl")
    rng = np.random.RandomState(0)
    write_loglikes_ark(str(base / "loglikes.ark"),
                       {"u%d" % i: (rng.randn(20, tm.num_pdfs) * 3 - 5).astype(np.float32)
                        for i in range(2)})
    B["loglikes.ark"] = str(base / "loglikes.ark")
    (base / "ref.txt").write_text("u1 two six\nu2 three zero one\nu3 one\n")
    (base / "hyp.txt").write_text("u1 two six\nu2 three zero zero\nu3 one one\n")
    B["ref.txt"], B["hyp.txt"] = str(base / "ref.txt"), str(base / "hyp.txt")
    # nnet3
    n3 = FIX / "nnet3_io" / "P3_lda_tdnn"
    cp("final.mdl", FIX / "nnet3_io" / "P1_tdnnf" / "final.mdl")
    cp("lda.mat", n3 / "configs" / "lda.mat")
    cfg = (n3 / "configs" / "final.config").read_text()
    cfg = re.sub(r"matrix=\S*lda\.mat", "matrix=lda.mat", cfg)  # cwd: the case dir
    (base / "final.config").write_text(cfg)
    B["final.config"] = str(base / "final.config")
    _run_ok(["nnet3-init", "--srand=1", B["final.config"], str(base / "init.raw")], cwd=base)
    B["init.raw"] = str(base / "init.raw")
    # LDA stage (train.py stages -4/-2): tests/fixtures/kaldi_lda (Kaldi's stats and init.raw,
    # 40-dim input + 40-dim i-vector, 64 pdfs: it reads cegs.ark)
    lda = REPO / "tests" / "fixtures" / "kaldi_lda"
    cp("lda_init.raw", lda / "init.raw")
    cp("lda_stats", lda / "lda_stats")
    cp("lda_stats.rp4", lda / "lda_stats.rp4")
    f = np.load(FIX / "nnet3_io" / "inputs" / "feats_utt1_95.npy")
    iv = np.load(FIX / "nnet3_io" / "inputs" / "ivector_utt_utt1_95.npy")
    with TableWriter("ark:%s" % (base / "nfeats.ark"), "matrix") as w:
        w.write_item("utt1", f[:40].astype(np.float32))
    with TableWriter("ark:%s" % (base / "ivec.ark"), "vector") as w:
        w.write_item("utt1", iv.reshape(-1).astype(np.float32))
    B["nfeats.ark"], B["ivec.ark"] = str(base / "nfeats.ark"), str(base / "ivec.ark")
    # the lattice recipe (tests/fixtures/kaldi_recipe_small): online CMVN, phone-aligned
    # lattices, supervision from lattices, egs with online i-vectors
    _build_lattice_recipe(base, B)
    _build_chain_train(base, B)
    # pkwrap models for compute-prob / combine (64 pdfs: the recipe egs and den.fst)
    import torch
    from pkwrap.nn import TDNNFModel
    from pkwrap.train import save_model
    spec = {"factory": "pkwrap.nn:TDNNFModel",
            "kwargs": dict(num_pdfs=64, feat_dim=40, tdnn_dim=16, tdnnf_dim=16,
                           bottleneck_dim=8, time_strides=[1, 0, 3], prefinal_dim=16,
                           prefinal_big_dim=16, use_idct=False)}
    for i in (1, 2):
        torch.manual_seed(i)
        m = TDNNFModel(**spec["kwargs"]).train()
        with torch.no_grad():  # batchnorm statistics, as after training
            m(torch.randn(2, 60, 40))
        from pkwrap.train.context import probe_model_context
        save_model(str(base / ("m%d.pt" % i)), m, spec,
                   model_context=probe_model_context(m, 40))
        B["m%d.pt" % i] = str(base / ("m%d.pt" % i))
    return B


def _build_lattice_recipe(base: Path, B: Dict[str, str]) -> None:
    import numpy as np
    from pkwrap.kaldi.lattice import COMPACT_LATTICE_HOLDER, read_compact_lattices
    from pkwrap.kaldi.table import TableWriter, read_table
    R = REPO / "tests" / "fixtures" / "kaldi_recipe_small"

    def cp(name, src):
        shutil.copyfile(src, base / name)
        B[name] = str(base / name)

    cp("global_cmvn.stats", R / "exp/chain/tdnn/egs/global_cmvn.stats")
    cp("lat.mdl", R / "exp/chain/lats/final.mdl")
    cp("rtree", R / "exp/chain/tdnn/tree")
    cp("r0.trans_mdl", R / "exp/chain/tdnn/0.trans_mdl")
    cp("rnorm.fst", R / "exp/chain/tdnn/normalization.fst")
    (base / "cmvn.conf").write_text("--norm-means=true\n--norm-vars=false\n--cmn-window=600\n"
                                    "--speaker-frames=600\n--global-frames=200\n")
    B["cmvn.conf"] = str(base / "cmvn.conf")
    # 4 utterances of 2 speakers (each speaker's second utterance backs off to the first)
    spk = {"s019": ["s019-0000", "s019-0001"], "s021": ["s021-0000", "s021-0001"]}
    utts = [u for us in spk.values() for u in us]
    (base / "spk2utt").write_text("".join("%s %s\n" % (s, " ".join(us))
                                          for s, us in spk.items()))
    B["spk2utt"] = str(base / "spk2utt")
    cwd = os.getcwd()
    os.chdir(R)
    try:
        feats = read_table("scp:data/train_hires/feats.scp")
        ivs = read_table("scp:exp/nnet3/ivectors_train_hires/ivector_online.scp")
    finally:
        os.chdir(cwd)
    with TableWriter("ark:%s" % (base / "rfeats.ark"), "matrix") as w:
        for u in utts:
            w.write_item(u, np.asarray(feats[u], dtype=np.float32))
    B["rfeats.ark"] = str(base / "rfeats.ark")
    with TableWriter("ark,scp:%s,%s" % (base / "ivec_online.ark", base / "ivec_online.scp"),
                     "matrix") as w:
        for u in utts:
            w.write_item(u, np.asarray(ivs[u], dtype=np.float32))
    B["ivec_online.ark"], B["ivec_online.scp"] = (str(base / "ivec_online.ark"),
                                                  str(base / "ivec_online.scp"))
    lats = dict(read_compact_lattices("ark:gunzip -c %s |" % (R / "exp/chain/lats/lat.1.gz")))
    with TableWriter("ark:%s" % (base / "lats.ark"), COMPACT_LATTICE_HOLDER) as w:
        for u in utts:
            w.write_item(u, lats[u])
    B["lats.ark"] = str(base / "lats.ark")
    with open(B["lats.ark"], "rb") as f, gzip.open(base / "lats.ark.gz", "wb") as g:
        g.write(f.read())
    B["lats.ark.gz"] = str(base / "lats.ark.gz")
    _run_ok(["lattice-align-phones", "--replace-output-symbols=true", B["lat.mdl"],
             "ark:" + B["lats.ark"], "ark:%s" % (base / "plats.ark")])
    B["plats.ark"] = str(base / "plats.ark")
    _run_ok(["chain-get-supervision", "--lattice-input=true", "--frame-subsampling-factor=3",
             B["rtree"], B["r0.trans_mdl"], "ark:" + B["plats.ark"],
             "ark:%s" % (base / "rsup.ark")])
    B["rsup.ark"] = str(base / "rsup.ark")
    _run_ok(["apply-cmvn-online", "--config=" + B["cmvn.conf"], "--spk2utt=ark:" + B["spk2utt"],
             B["global_cmvn.stats"], "ark:" + B["rfeats.ark"],
             "ark:%s" % (base / "cmvn_feats.ark")])
    B["cmvn_feats.ark"] = str(base / "cmvn_feats.ark")


# pkwrap-chain-train on tests/fixtures/kaldi_recipe_egs_small (as tests/test_chain_train.py)
CHAIN_TRAIN_ARGS = [
    "--stage=-10", "--chain.xent-regularize", "0.1", "--chain.leaky-hmm-coefficient=0.1",
    "--chain.apply-deriv-weights=false", "--trainer.srand=0", "--trainer.num-epochs=0.5",
    "--trainer.optimization.num-jobs-initial=1", "--trainer.optimization.num-jobs-final=1",
    "--trainer.num-chunk-per-minibatch=4", "--egs.chunk-width=140,100,160",
    "--cleanup.remove-egs=false", "--use-gpu=no", "--feat-dir=data/train_hires",
    "--lat-dir=exp/chain/lats", "--pkwrap.num-threads=1", "--pkwrap.checkpoint-every=2",
    "--egs.dir={egs_dir}", "--tree-dir={tree_dir}", "--dir={out}"]


def _build_chain_train(base: Path, B: Dict[str, str]) -> None:
    """tree dir, egs dir, a fresh exp dir (configs/ only) and an exp dir after iterations
    0 and 1 (a run stopped by --exit-stage=2: the graphs, 0.mdl, 1.mdl, checkpoints;
    resumed with --stage=0)."""
    S = REPO / "tests" / "fixtures" / "kaldi_recipe_egs_small"
    for name, src in (("tree_dir", S / "tree"), ("egs_dir", S / "egs")):
        shutil.copytree(src, base / name)
        B[name] = str(base / name)
    exp = base / "exp"
    shutil.copytree(S / "configs", exp / "configs")
    # final.config names exp/chain/tdnn/configs/idct.mat: relative to the exp dir here
    cfg = (exp / "configs" / "final.config").read_text()
    (exp / "configs" / "final.config").write_text(
        re.sub(r"matrix=\S*idct\.mat", "matrix=out/configs/idct.mat", cfg))
    B["exp"] = str(exp)
    done = base / "exp_it2"
    shutil.copytree(exp, done)
    args = [a.replace("{egs_dir}", B["egs_dir"]).replace("{tree_dir}", B["tree_dir"])
            .replace("{out}", "out") for a in CHAIN_TRAIN_ARGS]
    work = base / "ct_work"
    work.mkdir()
    shutil.copytree(exp, work / "out")
    r = subprocess.run([sys.executable, "-m", "pkwrap.train.chain_train"] + args +
                       ["--exit-stage=2"], capture_output=True, text=True, env=_env(),
                       timeout=600, cwd=str(work))
    if r.returncode != 0:
        raise SystemExit("fuzz setup: pkwrap-chain-train failed:\n%s" % r.stderr[-3000:])
    shutil.rmtree(done)
    shutil.copytree(work / "out", done, ignore=shutil.ignore_patterns("tensorboard"))
    shutil.rmtree(work)
    B["exp_it2"] = str(done)


def _run_ok(cmd, cwd=None):
    r = subprocess.run([sys.executable, str(SCRIPTS / cmd[0])] + cmd[1:], capture_output=True,
                       text=True, env=_env(), timeout=300, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit("fuzz setup: %s failed:\n%s" % (" ".join(cmd), r.stderr))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO),
                PYTHONDONTWRITEBYTECODE="1", PKWRAP_VERBOSE="0")

# ============================================================================ damage


def _truncations(data: bytes, rng, n) -> List[tuple]:
    L = len(data)
    offs = sorted(set([0, 1, 3, 7, 15, 40, L // 2, L - 1, L - 5] +
                      [rng.randrange(1, max(2, L)) for _ in range(n)]))
    return [("trunc@%d" % o, data[:o]) for o in offs if 0 <= o < L][: n + 4]


def _bitflips(data: bytes, rng, n) -> List[tuple]:
    out = []
    for _ in range(n):
        # bias to the first KiB, where the headers are
        o = rng.randrange(min(len(data), 1024)) if rng.random() < 0.6 else rng.randrange(len(data))
        b = bytearray(data)
        b[o] ^= 1 << rng.randrange(8)
        out.append(("flip@%d" % o, bytes(b)))
    return out


ABSURD = [0x7FFFFFFF, -1, -2147483648, 1 << 28, 0]


def _int_fields(data: bytes, rng, n) -> List[tuple]:
    """Kaldi binary int32s are '\\x04' + 4 bytes: set some to absurd values."""
    pos = [m.start() for m in re.finditer(b"\x04", data[:200000]) if m.start() + 5 <= len(data)]
    out = []
    if not pos:
        return out
    for _ in range(n):
        p = rng.choice(pos[:400] if rng.random() < 0.7 else pos)
        v = rng.choice(ABSURD)
        b = bytearray(data)
        b[p + 1:p + 5] = struct.pack("<i", v)
        out.append(("int@%d=%d" % (p, v), bytes(b)))
    return out


def _float_pokes(data: bytes, rng, n) -> List[tuple]:
    out = []
    for _ in range(n):
        o = rng.randrange(len(data) // 2, len(data) - 4) if len(data) > 16 else 0
        v = rng.choice([float("nan"), float("inf"), -float("inf"), 1e38])
        b = bytearray(data)
        b[o:o + 4] = struct.pack("<f", v)
        out.append(("float@%d=%s" % (o, v), bytes(b)))
    return out


BAD_TOKENS = ["-1", "2000000000", "-2000000000", "abc", "nan", "inf", "-inf", "1e39",
              "99999999999999999999", "0x10", "1.5", ""]


def _token_edits(text: str, rng, n) -> List[tuple]:
    lines = text.splitlines(True)
    out = []
    for _ in range(n):
        li = rng.randrange(len(lines))
        toks = lines[li].split(" ")
        ti = rng.randrange(len(toks))
        t = rng.choice(BAD_TOKENS)
        nl = toks[ti].endswith("\n")
        toks[ti] = t + ("\n" if nl else "")
        new = lines[:li] + [" ".join(toks)] + lines[li + 1:]
        out.append(("tok@%d.%d=%s" % (li, ti, t or "<del>"), "".join(new).encode()))
    return out


def _line_edits(text: str, rng) -> List[tuple]:
    lines = text.splitlines(True)
    out = []
    if len(lines) > 1:
        i = rng.randrange(len(lines))
        out.append(("del-line%d" % i, "".join(lines[:i] + lines[i + 1:]).encode()))
        out.append(("dup-line%d" % i, "".join(lines[:i + 1] + lines[i:]).encode()))
    i = rng.randrange(len(lines))
    out.append(("nonutf8@line%d" % i,
                "".join(lines[:i]).encode() + b"\xff\xfe\x80" + "".join(lines[i:]).encode()))
    out.append(("crlf", text.replace("\n", "\r\n").encode()))
    out.append(("garbage", bytes(random.Random(7).randrange(256) for _ in range(300))))
    return out


def _text_trunc(text: str, rng, n) -> List[tuple]:
    b = text.encode()
    return [("ttrunc@%d" % o, b[:o]) for o in sorted(set(rng.randrange(1, len(b)) for _ in range(n)))]


def damage(kind: str, path: str, rng, n: int) -> List[tuple]:
    """(label, bytes, must_fail) variants of the file at ``path`` of format ``kind``."""
    data = Path(path).read_bytes()
    out: List[tuple] = [("empty", b"", True)]
    if kind in ("kbin", "ofst", "pt", "gz"):
        k = max(1, n // 4)
        out += [(a, b, a.startswith("trunc")) for a, b in _truncations(data, rng, k)]
        out += [(a, b, False) for a, b in _bitflips(data, rng, k)]
        if kind == "kbin":
            out += [(a, b, False) for a, b in _int_fields(data, rng, k)]
            out += [(a, b, False) for a, b in _float_pokes(data, rng, max(1, k // 2))]
        if kind == "ofst":
            out += _fst_semantic(path)
    else:  # text
        text = data.decode("utf-8", errors="replace")
        k = max(1, n // 3)
        out += [(a, b, False) for a, b in _token_edits(text, rng, k)]
        out += [(a, b, False) for a, b in _line_edits(text, rng)]
        out += [(a, b, False) for a, b in _text_trunc(text, rng, max(1, k // 2))]
    return out


def _fst_semantic(path) -> List[tuple]:
    """FSTs that parse but are wrong: arcs to missing states, NaN/inf/negative weights,
    negative/huge labels, a start state without arcs, no final state, absurd header."""
    sys.path.insert(0, str(REPO))
    import copy

    import numpy as np
    from pkwrap.kaldi.fst import read_fst, write_fst_binary
    f = read_fst(path)
    out = []

    def emit(label, g, must_fail=True):
        b = io.BytesIO()
        write_fst_binary(g, b)
        out.append((label, b.getvalue(), must_fail))

    if f.num_arcs:
        g = copy.deepcopy(f); g.nextstate = g.nextstate.copy(); g.nextstate[0] = f.num_states + 5
        emit("arc-to-missing-state", g)
        g = copy.deepcopy(f); g.nextstate = g.nextstate.copy(); g.nextstate[-1] = -3
        emit("arc-to-negative-state", g)
        g = copy.deepcopy(f); g.weight = g.weight.copy(); g.weight[0] = np.nan
        emit("nan-arc-weight", g)
        g = copy.deepcopy(f); g.weight = g.weight.copy(); g.weight[len(g.weight) // 2] = -np.inf
        emit("neg-inf-arc-weight", g)
        g = copy.deepcopy(f); g.ilabel = g.ilabel.copy(); g.ilabel[0] = -7
        emit("negative-ilabel", g)
        g = copy.deepcopy(f); g.ilabel = g.ilabel.copy(); g.olabel = g.olabel.copy()
        g.ilabel[-1] = 2000000000; g.olabel[-1] = 2000000000
        emit("huge-label", g)
        # start state without arcs: drop its arcs
        s = f.start
        if s >= 0:
            b0, e0 = int(f.state_offsets[s]), int(f.state_offsets[s + 1])
            keep = np.r_[0:b0, e0:f.num_arcs]
            g = copy.deepcopy(f)
            g.ilabel, g.olabel = f.ilabel[keep], f.olabel[keep]
            g.weight, g.nextstate = f.weight[keep], f.nextstate[keep]
            cnt = np.diff(f.state_offsets).copy(); cnt[s] = 0
            g.state_offsets = np.r_[0, np.cumsum(cnt)].astype(np.int64)
            g.properties = 0
            emit("start-without-arcs", g, False)
    g = copy.deepcopy(f); g.final = np.full_like(f.final, np.inf)
    emit("no-final-state", g, False)
    g = copy.deepcopy(f); g.final = g.final.copy(); g.final[np.isfinite(g.final)] = np.nan
    emit("nan-final-weight", g)
    g = copy.deepcopy(f); g.start = f.num_states + 1
    emit("start-out-of-range", g)
    # header fields: num_states / num_arcs absurd
    b = io.BytesIO(); write_fst_binary(f, b); raw = bytearray(b.getvalue())
    o = 4
    for _ in range(2):
        (ln,) = struct.unpack("<i", raw[o:o + 4]); o += 4 + ln
    hdr = o + 4 + 4 + 8  # start, numstates, numarcs follow
    # (OpenFst's VectorFst ignores num_arcs; pkwrap checks a positive one: either is fine)
    for lab, off, v, must in (("hdr-numstates=2^40", hdr + 8, 1 << 40, True),
                              ("hdr-numstates=-5", hdr + 8, -5, True),
                              ("hdr-numarcs=2^40", hdr + 16, 1 << 40, False),
                              ("hdr-start=2^40", hdr, 1 << 40, True)):
        r = bytearray(raw); r[off:off + 8] = struct.pack("<q", v)
        out.append((lab, bytes(r), must))
    # first state's narcs absurd
    r = bytearray(raw); r[hdr + 24 + 4:hdr + 24 + 12] = struct.pack("<q", 1 << 34)
    out.append(("state0-narcs=2^34", bytes(r), True))
    return out

# ============================================================================ programs


@dataclass
class Prog:
    name: str
    args: List[str]                       # templates: {name} = base input, {out} = out dir
    inputs: Dict[str, str]                # input name -> kind (kbin/ofst/text/pt/gz)
    outputs: List[str] = field(default_factory=list)  # files under {out} on success
    out_kind: Dict[str, str] = field(default_factory=dict)
    stdout_check: bool = False            # the numbers printed must be finite
    weight: float = 1.0                   # relative number of cases
    rspec: List[int] = field(default_factory=list)   # arg positions that are rspecifiers
    wspec: List[int] = field(default_factory=list)   # arg positions that are wspecifiers
    module: str = ""                      # run as ``python -m module`` (not scripts/<name>)
    seed_out: str = ""                    # a base dir copied into {out} before the run (an
    #   exp dir that is input and output: its files are not "left"; on failure, files
    #   the run completed may stay if they read back, and the seeded ones must stay)
    outdirs: tuple = ("missing", "readonly", "full", "fsize")
    empty_ok: tuple = ()                  # inputs that may be empty (a Kaldi config file)
    fallback: tuple = ()                  # inputs whose damage may be survived (a bad
    #   checkpoint: the trainer warns and resumes from the previous one)


PROGS = [
    Prog("chain-make-den-fst", ["{tree}", "{trans.mdl}", "{phone_lm.fst}", "{out}/den.fst",
                                "{out}/normalization.fst"],
         {"tree": "kbin", "trans.mdl": "kbin", "phone_lm.fst": "ofst"},
         ["den.fst", "normalization.fst"], {"den.fst": "fst", "normalization.fst": "fst"}),
    Prog("chain-est-phone-lm", ["ark,t:{lm_phone_seqs.txt}", "{out}/phone_lm.fst"],
         {"lm_phone_seqs.txt": "text"}, ["phone_lm.fst"], {"phone_lm.fst": "fst"}, rspec=[0]),
    Prog("copy-tree", ["--binary=false", "{tree}", "{out}/tree.txt"], {"tree": "kbin"},
         ["tree.txt"], {"tree.txt": "text"}),
    Prog("copy-transition-model", ["{trans.mdl}", "{out}/trans.mdl"], {"trans.mdl": "kbin"},
         ["trans.mdl"]),
    Prog("show-transitions", ["{phones.txt}", "{trans.mdl}"],
         {"phones.txt": "text", "trans.mdl": "kbin"}, stdout_check=True),
    Prog("compile-train-graphs", ["{tree}", "{trans.mdl}", "{L.fst}", "ark,t:{text.int}",
                                  "ark:{out}/graphs.fsts"],
         {"tree": "kbin", "trans.mdl": "kbin", "L.fst": "ofst", "text.int": "text"},
         ["graphs.fsts"], rspec=[3], wspec=[4]),
    Prog("latgen-faster-mapped", ["--word-symbol-table={words.txt}", "{trans.mdl}",
                                  "{HCLG.fst}", "ark:{loglikes.ark}", "ark:{out}/lat.ark",
                                  "ark,t:{out}/words.txt"],
         {"words.txt": "text", "trans.mdl": "kbin", "HCLG.fst": "ofst", "loglikes.ark": "kbin"},
         ["lat.ark", "words.txt"], rspec=[3], wspec=[4, 5], weight=2),
    Prog("mkgraph", ["{lang}", "{model}", "{out}/graph"],
         {"lang/L_disambig.fst": "ofst", "lang/G.fst": "ofst", "lang/phones.txt": "text",
          "lang/words.txt": "text", "lang/phones/disambig.int": "text", "model/tree": "kbin",
          "model/final.mdl": "kbin"},
         ["graph/HCLG.fst"], {"graph/HCLG.fst": "fst"}),
    Prog("nnet3-chain-copy-egs", ["ark:{cegs.ark}", "ark:{out}/copy.ark"], {"cegs.ark": "kbin"},
         ["copy.ark"], {"copy.ark": "egs"}, rspec=[0], wspec=[1], weight=2),
    Prog("nnet3-chain-copy-egs", ["--weights=ark,t:{egs_weights.txt}", "ark,t:{cegs_text.ark}",
                                  "ark:{out}/copy.ark"],
         {"egs_weights.txt": "text", "cegs_text.ark": "text"}, ["copy.ark"], {"copy.ark": "egs"},
         rspec=[1], wspec=[2]),
    Prog("nnet3-chain-copy-egs", ["ark:gunzip -c {cegs.ark.gz} |", "ark:{out}/copy.ark"],
         {"cegs.ark.gz": "gz"}, ["copy.ark"], {"copy.ark": "egs"}),
    Prog("nnet3-chain-merge-egs", ["--minibatch-size=4", "ark:{cegs.ark}", "ark:{out}/m.ark"],
         {"cegs.ark": "kbin"}, ["m.ark"], {"m.ark": "egs"}, rspec=[1], wspec=[2], weight=2),
    Prog("nnet3-chain-get-egs", ["--left-context=10", "--right-context=10", "--num-frames=150",
                                 "--frame-subsampling-factor=3", "{normalization.fst}",
                                 "ark:{feats.ark}", "ark:{sup.ark}", "ark:{out}/cegs.ark"],
         {"normalization.fst": "ofst", "feats.ark": "kbin", "sup.ark": "kbin"},
         ["cegs.ark"], {"cegs.ark": "egs"}, rspec=[5, 6], wspec=[7], weight=2),
    Prog("nnet3-chain-e2e-get-egs", ["--num-frames=150,210", "--left-context=10",
                                     "--right-context=10", "--frame-subsampling-factor=3",
                                     "{normalization.fst}", "ark:{feats_e2e.ark}",
                                     "ark:{graphs.fsts}", "{trans.mdl}", "ark:{out}/e2e.ark"],
         {"normalization.fst": "ofst", "feats_e2e.ark": "kbin", "graphs.fsts": "kbin",
          "trans.mdl": "kbin"}, ["e2e.ark"], {"e2e.ark": "egs"}, rspec=[5, 6], wspec=[8]),
    Prog("nnet3-chain-compute-prob", ["--feat-dim=40", "--xent-regularize=0.1", "{m1.pt}",
                                      "{rec_den.fst}", "ark:{cegs.ark}"],
         {"m1.pt": "pt", "rec_den.fst": "ofst", "cegs.ark": "kbin"}, stdout_check=True,
         rspec=[4], weight=0.25),
    Prog("nnet3-chain-combine", ["--max-objective-evaluations=3", "{rec_den.fst}", "{m1.pt}",
                                 "{m2.pt}", "ark:{cegs.ark}", "{out}/comb.pt"],
         {"m2.pt": "pt", "cegs.ark": "kbin"},  # den.fst / models: compute-prob's cases
         ["comb.pt"], stdout_check=True, weight=0.15),
    Prog("nnet3-info", ["{final.mdl}"], {"final.mdl": "kbin"}, stdout_check=False),
    Prog("nnet3-copy", ["{init.raw}", "{out}/copy.raw"], {"init.raw": "kbin"}, ["copy.raw"]),
    Prog("nnet3-am-copy", ["--binary=false", "{final.mdl}", "{out}/final.txt"],
         {"final.mdl": "kbin"}, ["final.txt"]),
    Prog("nnet3-compute", ["--ivectors=ark:{ivec.ark}", "{final.mdl}", "ark:{nfeats.ark}",
                           "ark:{out}/out.ark"],
         {"final.mdl": "kbin", "nfeats.ark": "kbin", "ivec.ark": "kbin"}, ["out.ark"],
         {"out.ark": "matrix"}, rspec=[2], wspec=[3]),
    Prog("nnet3-init", ["--srand=1", "{final.config}", "{out}/0.raw"],
         {"final.config": "text", "lda.mat": "text"}, ["0.raw"]),
    Prog("nnet3-chain-acc-lda-stats", ["--rand-prune=0", "{lda_init.raw}", "ark:{cegs.ark}",
                                       "{out}/1.lda_stats"],
         {"lda_init.raw": "kbin", "cegs.ark": "kbin"}, ["1.lda_stats"], rspec=[2]),
    Prog("sum-lda-accs", ["{out}/lda_stats", "{lda_stats}", "{lda_stats.rp4}"],
         {"lda_stats": "kbin", "lda_stats.rp4": "kbin"}, ["lda_stats"]),
    Prog("nnet-get-feature-transform", ["--write-within-covar={out}/within_covar",
                                        "{out}/lda.mat", "{lda_stats}"],
         {"lda_stats": "kbin"}, ["lda.mat", "within_covar"]),
    Prog("chain-get-supervision", ["--frame-subsampling-factor=3", "{tree}", "{trans.mdl}",
                                   "ark,t:{phones_with_lengths.txt}", "ark:{out}/sup.ark"],
         {"tree": "kbin", "trans.mdl": "kbin", "phones_with_lengths.txt": "text"},
         ["sup.ark"], rspec=[3], wspec=[4]),
    Prog("compute-wer", ["--text", "--mode=strict", "ark:{ref.txt}", "ark:{hyp.txt}"],
         {"ref.txt": "text", "hyp.txt": "text"}, stdout_check=True, rspec=[2, 3]),
    # --- programs of the lattice recipe (tests/fixtures/kaldi_recipe_small)
    Prog("apply-cmvn-online", ["--config={cmvn.conf}", "--spk2utt=ark:{spk2utt}",
                               "{global_cmvn.stats}", "ark:{rfeats.ark}", "ark:{out}/cmvn.ark"],
         {"cmvn.conf": "text", "spk2utt": "text", "global_cmvn.stats": "text",
          "rfeats.ark": "kbin"}, ["cmvn.ark"], {"cmvn.ark": "matrix"}, rspec=[3], wspec=[4],
         empty_ok=("cmvn.conf",)),
    Prog("apply-cmvn-online", ["{global_cmvn.stats}", "ark:{rfeats.ark}", "ark:{out}/cmvn.ark"],
         {"global_cmvn.stats": "text"}, ["cmvn.ark"], {"cmvn.ark": "matrix"}, weight=0.5),
    Prog("lattice-align-phones", ["--replace-output-symbols=true", "{lat.mdl}",
                                  "ark:{lats.ark}", "ark:{out}/plats.ark"],
         {"lat.mdl": "kbin", "lats.ark": "kbin"}, ["plats.ark"], {"plats.ark": "lat"},
         rspec=[2], wspec=[3], weight=1.5),
    Prog("lattice-align-phones", ["{lat.mdl}", "ark:gunzip -c {lats.ark.gz} |",
                                  "ark:{out}/plats.ark"],
         {"lats.ark.gz": "gz"}, ["plats.ark"], {"plats.ark": "lat"}),
    Prog("chain-get-supervision", ["--lattice-input=true", "--frame-subsampling-factor=3",
                                   "{rtree}", "{r0.trans_mdl}", "ark:{plats.ark}",
                                   "ark:{out}/sup.ark"],
         {"plats.ark": "kbin", "rtree": "kbin", "r0.trans_mdl": "text"}, ["sup.ark"],
         {"sup.ark": "sup"}, rspec=[4], wspec=[5], weight=1.5),
    Prog("nnet3-chain-get-egs", ["--online-ivectors=ark:{ivec_online.ark}",
                                 "--online-ivector-period=10", "--left-context=12",
                                 "--right-context=12", "--num-frames=140,100,160",
                                 "--frame-subsampling-factor=3", "{rnorm.fst}",
                                 "ark:{cmvn_feats.ark}", "ark:{rsup.ark}", "ark:{out}/cegs.ark"],
         {"ivec_online.ark": "kbin", "rnorm.fst": "ofst", "cmvn_feats.ark": "kbin",
          "rsup.ark": "kbin"}, ["cegs.ark"], {"cegs.ark": "egs"}, rspec=[7, 8], wspec=[9],
         weight=1.5),
    Prog("nnet3-chain-get-egs", ["--online-ivectors=scp:{ivec_online.scp}",
                                 "--online-ivector-period=10", "--left-context=12",
                                 "--right-context=12", "--num-frames=140,100,160",
                                 "--frame-subsampling-factor=3", "{rnorm.fst}",
                                 "ark:{cmvn_feats.ark}", "ark:{rsup.ark}", "ark:{out}/cegs.ark"],
         {"ivec_online.scp": "text"}, ["cegs.ark"], {"cegs.ark": "egs"}, weight=0.5),
    # --- pkwrap-chain-train (Kaldi's steps/nnet3/chain/train.py): stages -6..0 on a fresh
    # exp dir; the training iterations on a damaged egs dir; a resumed run (--stage=0)
    Prog("pkwrap-chain-train", CHAIN_TRAIN_ARGS + ["--exit-stage=0"],
         {"tree_dir/tree": "kbin", "tree_dir/final.mdl": "kbin", "tree_dir/ali.1.gz": "gz",
          "tree_dir/num_jobs": "text", "tree_dir/phones.txt": "text",
          "exp/configs/final.config": "text", "exp/configs/idct.mat": "text",
          "egs_dir/info/feat_dim": "text", "egs_dir/info/left_context": "text",
          "egs_dir/info/num_pdfs": "text", "egs_dir/global_cmvn.stats": "text"},
         ["den.fst", "normalization.fst", "phone_lm.fst", "0.mdl", "0.trans_mdl"],
         {"den.fst": "fst", "normalization.fst": "fst", "phone_lm.fst": "fst", "0.mdl": "nnet3"},
         weight=0.5, module="pkwrap.train.chain_train", seed_out="exp", outdirs=("fsize",)),
    Prog("pkwrap-chain-train", CHAIN_TRAIN_ARGS + ["--exit-stage=1"],
         {"egs_dir/cegs.1.ark": "kbin", "egs_dir/valid_diagnostic.cegs": "kbin",
          "egs_dir/info/num_archives": "text", "egs_dir/info/frames_per_eg": "text"},
         ["0.mdl"], {"0.mdl": "nnet3"}, weight=0.3,
         module="pkwrap.train.chain_train", seed_out="exp", outdirs=()),
    Prog("pkwrap-chain-train", [a.replace("--stage=-10", "--stage=0") for a in CHAIN_TRAIN_ARGS],
         # (what a resumed run reads: 0.mdl, den.fst, the newest checkpoint; the
         # models combined at the end, here only 3.mdl, are written by this run)
         {"exp_it2/den.fst": "ofst", "exp_it2/0.mdl": "kbin",
          "exp_it2/checkpoints/ckpt-00000009.pt": "pt"},
         ["final.mdl", "accuracy.report"], {"final.mdl": "nnet3"}, weight=0.3,
         module="pkwrap.train.chain_train", seed_out="exp_it2", outdirs=("fsize",),
         fallback=("exp_it2/checkpoints/ckpt-00000009.pt",)),
]

# ============================================================================ cases


@dataclass
class Case:
    id: str
    prog: str
    argv: List[str]
    files: Dict[str, bytes]       # case-dir relative name -> content (damaged inputs)
    subst: Dict[str, str]         # input name -> case-dir relative name
    outputs: List[str]
    out_kind: Dict[str, str]
    stdout_check: bool
    what: str
    must_fail: bool = False
    outdir: str = "normal"        # normal | missing | readonly | full | fsize
    names: List[str] = field(default_factory=list)  # strings an error should name
    module: str = ""              # Prog.module
    seed_out: str = ""            # Prog.seed_out


def _fill(args, B, subst, case_dir="{case}"):
    out = []
    for a in args:
        def rep(m):
            k = m.group(1)
            if k == "out":
                return case_dir + "/out"
            if k in subst:
                return case_dir + "/" + subst[k]
            return B.get(k, m.group(0))
        out.append(re.sub(r"\{([^{}]+)\}", rep, a))
    return out


def make_cases(B: Dict[str, str], per_input: int, seed: int = 12) -> List[Case]:
    rng = random.Random(seed)
    cases: List[Case] = []
    n = collections.Counter()

    def new_id(prog):
        n[prog] += 1
        return "%s.%03d" % (prog, n[prog])

    for p in PROGS:
        for inp, kind in p.inputs.items():
            top = inp.split("/")[0]
            k = max(2, int(per_input * p.weight))
            src = B[top] if "/" not in inp else os.path.join(B[top], inp.split("/", 1)[1])
            variants = damage(kind, src, rng, k)
            if kind == "gz" and not p.module:   # damaged gzip behind a pipe
                variants = [(a, b, True) for a, b, _ in variants]
            if "/" in inp and p.module:  # a file of a directory input missing
                variants = variants + [("missing", None, False)]
            for label, data, must in variants:
                if (label == "empty" and inp in p.empty_ok) or inp in p.fallback:
                    must = False
                if inp == "lda.mat":  # named by the config, relative to the case dir
                    files, subst = {"lda.mat": data}, {"lda.mat": "lda.mat"}
                elif top == p.seed_out:  # a file of the exp dir seeded into {out}
                    files, subst = {"out/" + inp.split("/", 1)[1]: data}, {}
                elif "/" in inp:  # a file inside a directory input: copy the directory
                    files = _copy_dir(B[top], "in_" + top, {inp.split("/", 1)[1]: data})
                    subst = {top: "in_" + top}
                else:
                    files = {"in_" + inp: data}
                    subst = {inp: "in_" + inp}
                cases.append(Case(new_id(p.name), p.name, p.args, files, subst, p.outputs,
                                  p.out_kind, p.stdout_check, "%s:%s" % (inp, label), must,
                                  names=[os.path.basename(inp), "in_" + top],
                                  module=p.module, seed_out=p.seed_out))
            # missing input, a directory in its place, the wrong kind of file
            if "/" not in inp:
                cases.append(Case(new_id(p.name), p.name, p.args, {}, {inp: "missing_" + inp},
                                  p.outputs, p.out_kind, p.stdout_check, "%s:missing" % inp,
                                  True, names=["missing_" + inp]))
                cases.append(Case(new_id(p.name), p.name, p.args, {"dir_" + inp + "/x": b""},
                                  {inp: "dir_" + inp}, p.outputs, p.out_kind, p.stdout_check,
                                  "%s:is-a-directory" % inp, True, names=["dir_" + inp]))
                for other in ("tree", "den.fst.txt", "cegs.ark", "phones.txt", "final.mdl"):
                    if other != inp and rng.random() < 0.5:
                        # pkwrap reads fstprint text FSTs too: another FST in text form
                        # may be accepted
                        # (phones.txt is a valid "key int" text table: a transcript
                        # archive in its place may compile)
                        ok_alike = (kind == "ofst" and other == "den.fst.txt") or \
                            (p.name in ("nnet3-copy", "nnet3-info") and other == "final.mdl") \
                            or (kind == "text" and other == "phones.txt")
                        cases.append(Case(new_id(p.name), p.name, p.args,
                                          {"wrong_" + inp: Path(B[other]).read_bytes()},
                                          {inp: "wrong_" + inp}, p.outputs, p.out_kind,
                                          p.stdout_check, "%s:is-%s" % (inp, other),
                                          not ok_alike, names=["wrong_" + inp]))
        # specifiers
        for i in p.rspec:
            for bad in ("scp:{case}/none.scp", "ark,foo:" + "{x}", "ark:", "arkk:{x}",
                        "ark:{case}/nonexistent.ark", "ark:cat {case}/nonexistent |",
                        "ark:exit 3 |", "{x}"):
                argv = list(p.args)
                orig = argv[i]
                xpath = orig.split(":", 1)[1] if ":" in orig else orig
                argv[i] = bad.replace("{x}", xpath)
                cases.append(Case(new_id(p.name), p.name, argv, {}, {}, p.outputs, p.out_kind,
                                  p.stdout_check, "rspec:%s" % bad, bad != "{x}",
                                  names=["none.scp", "nonexistent", "ark", "exit 3", ":"]))
        for i in p.wspec:
            for bad in ("ark,foo:{out}/w.ark", "ark:", "{out}/w.ark", "ark:{out}/nodir/w.ark",
                        "ark:| exit 3", "scp:{out}/w.scp"):
                argv = list(p.args)
                argv[i] = bad
                cases.append(Case(new_id(p.name), p.name, argv, {}, {}, [], {},
                                  p.stdout_check, "wspec:%s" % bad, True,
                                  names=["w.ark", "ark", "nodir", "exit 3", "w.scp", ":"]))
        # output locations
        if p.outputs:
            for od in p.outdirs:
                # a full disk may still hold a small output: then it must be complete
                cases.append(Case(new_id(p.name), p.name, p.args, {}, {}, p.outputs,
                                  p.out_kind, p.stdout_check, "outdir:%s" % od,
                                  od == "readonly",  # a program may create a missing dir
                                  outdir=od, names=["out/"], module=p.module,
                                  seed_out=p.seed_out))
        cases.append(Case(new_id(p.name), p.name, p.args, {}, {}, p.outputs, p.out_kind,
                          p.stdout_check, "undamaged", False, module=p.module,
                          seed_out=p.seed_out))
    return cases


def _copy_dir(src, rel, replace):
    files = {}
    for root, _, fs in os.walk(src):
        for f in fs:
            full = os.path.join(root, f)
            r = os.path.relpath(full, src)
            files[rel + "/" + r] = replace.get(r, Path(full).read_bytes()) \
                if r not in replace else replace[r]
    return files

# ============================================================================ running


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    os.setsid()


def _fsize_limits():
    _limits()
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def run_case(args) -> dict:
    try:
        return _run_case(*args)
    except Exception as e:  # noqa: BLE001 - a harness bug must not stop the run
        case = args[0]
        return {"cls": "HARNESS", "kind": "", "why": repr(e), "id": case.id, "prog": case.prog,
                "what": case.what}


# torch's thread pools in a forked training program can stall: these start fresh
NO_FORK = {"nnet3-chain-combine", "nnet3-chain-compute-prob", "nnet3-compute",
           "pkwrap-chain-train"}


def _run_case(case, B, root, timeout, unshare_ok, no_fork=False) -> dict:
    cdir = Path(root) / "cases" / case.id
    if cdir.exists():
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    if case.prog == "nnet3-init" and "lda.mat" not in case.subst:
        shutil.copyfile(B["lda.mat"], cdir / "lda.mat")
    outdir = cdir / "out"
    if case.seed_out and case.outdir != "missing":
        shutil.copytree(B[case.seed_out], outdir)
    for rel, data in case.files.items():
        f = cdir / rel
        if data is None:  # a file of a directory input removed
            if f.exists():
                f.unlink()
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    seeded = _listdir(outdir) if case.seed_out and outdir.exists() else []
    if case.outdir != "missing":
        outdir.mkdir(exist_ok=True)
    argv = [a.replace("{case}", str(cdir)) for a in _fill(case.argv, B, case.subst, str(cdir))]
    argv = [a.replace("{out}", str(outdir)) for a in argv]
    cmd = [sys.executable] + (["-m", case.module] if case.module else
                              [str(SCRIPTS / case.prog)]) + argv
    listing = cdir / "listing.txt"
    pre = _limits
    if case.outdir in ("readonly", "full") and unshare_ok:
        opts = "ro,size=4k" if case.outdir == "readonly" else "size=4k"
        # list and copy what the program left on the tmpfs before the namespace ends
        sh = ("mount -t tmpfs -o %s tmpfs %s || exit 99; %s; rc=$?; "
              "(cd %s && find . -type f | sed 's|^./||') > %s; cp -a %s/. %s/; exit $rc"
              % (opts, shlex.quote(str(outdir)), " ".join(shlex.quote(c) for c in cmd),
                 shlex.quote(str(outdir)), shlex.quote(str(listing)),
                 shlex.quote(str(outdir)), shlex.quote(str(cdir / "out_copy"))))
        run = ["unshare", "-rm", "sh", "-c", sh]
    else:
        if case.outdir in ("full", "fsize", "readonly"):
            pre = _fsize_limits
        run = cmd
    t0 = time.time()
    if _FORK and run is cmd and not no_fork and case.prog not in NO_FORK:
        rc, so, se = _fork_run(cmd[1], argv, cdir, timeout, pre is _fsize_limits)
    else:
        try:
            r = subprocess.run(run, capture_output=True, env=_env(), timeout=timeout,
                               preexec_fn=pre, cwd=str(cdir), stdin=subprocess.DEVNULL)
            rc, so, se = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, so, se = None, e.stdout or b"", e.stderr or b""
    dt = time.time() - t0
    if listing.exists():
        left = [x for x in listing.read_text().split("\n") if x]
        outdir = cdir / "out_copy"
    else:
        left = _listdir(outdir) if outdir.exists() else []
    lost: List[str] = []
    if case.seed_out:  # the exp dir: what the run wrote, and seeded files it removed
        now = set(left)
        lost = [x for x in seeded if x not in now and not x.startswith("log/")]
        if any(x.startswith("checkpoints/") for x in now):  # retention keeps newer ones
            lost = [x for x in lost if not x.startswith("checkpoints/")]
        seeded_set = set(seeded)
        left = [x for x in left if x not in seeded_set
                and not x.startswith(("log/", "tensorboard/"))]
    res = classify(case, rc, so.decode("utf-8", "replace"), se.decode("utf-8", "replace"),
                   left, outdir, argv, lost)
    res.update(id=case.id, prog=case.prog, what=case.what, seconds=round(dt, 2),
               cmd=cmd, rc=rc)
    if res["cls"] == "DEFECT":
        res["stderr"] = se.decode("utf-8", "replace")[-3000:]
        res["stdout"] = so.decode("utf-8", "replace")[-500:]
        d = Path(root) / "defects" / case.id
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(cdir, d, symlinks=True)
        (d / "repro.sh").write_text(
            "#!/bin/sh\n# %s: %s -> %s\ncd %s && mkdir -p out && PYTHONPATH=%s %s\n"
            % (case.id, case.what, res["why"], shlex.quote(str(cdir)), REPO,
               " ".join(shlex.quote(c) for c in cmd)))
    shutil.rmtree(cdir, ignore_errors=True)
    return res


_FORK = False


def _worker_init(fork: bool):
    """Pool worker: with ``fork``, import what the programs import once, so that each
    case is a fork of a warm interpreter rather than a cold start (the programs still
    run in their own process: a crash or a memory blowup only ends that process)."""
    global _FORK
    _FORK = fork
    os.environ.update(_env())
    if fork:
        sys.path.insert(0, str(REPO))
        import numpy  # noqa: F401
        import torch  # noqa: F401
        import pkwrap.chain, pkwrap.decode, pkwrap.kaldi.chain_egs, pkwrap.nnet3  # noqa
        import pkwrap.train  # noqa: F401
        for m in ("kaldifst", "kaldi_decoder", "kaldilm"):
            try:
                __import__(m)
            except ImportError:
                pass


def _fork_run(script: str, argv: List[str], cdir: Path, timeout: float, fsize: bool):
    """Run ``script argv`` as ``__main__`` in a forked child; (rc, stdout, stderr)."""
    import runpy
    so_p, se_p = cdir / ".stdout", cdir / ".stderr"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.setsid()
            resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
            if fsize:
                resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
            os.chdir(str(cdir))
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(str(so_p), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open(str(se_p), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.argv = [script] + list(argv)
            code = 0
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: B902 - as the interpreter would
                import traceback
                traceback.print_exc()
                code = 1
            import atexit
            atexit._run_exitfuncs()
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except Exception:  # noqa: BLE001
                    pass
        finally:
            os._exit(code)
    t_end = time.time() + timeout
    rc = None
    while True:
        p, st = os.waitpid(pid, os.WNOHANG)
        if p:
            rc = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
            break
        if time.time() > t_end:
            for kill in (os.killpg, os.kill):  # (a child stuck before setsid: no group)
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    so = so_p.read_bytes() if so_p.exists() else b""
    se = se_p.read_bytes() if se_p.exists() else b""
    return rc, so, se


def _listdir(d: Path) -> List[str]:
    out = []
    for root, dirs, fs in os.walk(d):
        for f in fs:
            out.append(os.path.relpath(os.path.join(root, f), d))
    return out


NONFINITE = re.compile(r"(?<![A-Za-z])(nan|-?inf(inity)?)(?![A-Za-z])", re.I)
ERRLINE = re.compile(r"^([\w.-]+): (.+)$")
ERRORISH = re.compile(r"error|Traceback|Exception|\[E\]|\bfailed\b|cannot|invalid|"
                      r"RuntimeWarning|UserWarning", re.I)
LOGLINE = re.compile(r"^(LOG|WARNING|VLOG|INFO)\b|^\s*$|^[\w.-]+: (warning|note): ", re.I)


def classify(case: Case, rc, so: str, se: str, left: List[str], outdir: Path,
             argv: List[str], lost: Optional[List[str]] = None) -> dict:
    def D(kind, why):
        return {"cls": "DEFECT", "kind": kind, "why": why}

    if rc is None:
        return D("HANG", "timed out")
    if rc == 99 and case.outdir in ("readonly", "full"):
        return {"cls": "SKIP", "kind": "", "why": "mount failed"}
    if rc < 0 or rc >= 128:
        sig = -rc if rc < 0 else rc - 128
        if sig == signal.SIGKILL or "bad_alloc" in se:
            return D("MEMORY", "killed by signal %d" % sig)
        return D("CRASH", "signal %d" % sig)
    if "Traceback (most recent call last)" in se:
        return D("TRACEBACK", se.strip().splitlines()[-1][:200])
    if "MemoryError" in se or "bad_alloc" in se or "out of memory" in se.lower() \
            or "Cannot allocate memory" in se:
        return D("MEMORY", se.strip().splitlines()[-1][:200] if se.strip() else "")
    tmp = [x for x in left if ".tmp" in x or x.startswith(".")]
    if rc == 0:
        if case.must_fail:
            return D("SILENT", "exit 0 on an input that must fail")
        if tmp:
            return D("PARTIAL", "temporary file left: %s" % tmp)
        for o in case.outputs:
            if o not in left:
                return D("PARTIAL", "output %s missing after exit 0" % o)
            f = outdir / o
            if f.stat().st_size == 0:
                return D("PARTIAL", "output %s empty" % o)
            bad = check_output(f, case.out_kind.get(o))
            if bad:
                return D("SILENT", "%s: %s" % (o, bad))
        if case.stdout_check:
            for ln in (so + "\n" + se).splitlines():
                if ("objective" in ln or "log-probability" in ln or "WER" in ln) and \
                        NONFINITE.search(ln):
                    return D("SILENT", "non-finite number printed: %s" % ln.strip()[:150])
        return {"cls": "OK-success", "kind": "", "why": ""}
    # a failure
    lines = [ln for ln in se.splitlines() if ln.strip()]
    if rc != 1:
        return D("UNCLEAR", "exit status %d: %s" % (rc, (lines or [""])[-1][:200]))
    if not lines:
        return D("UNCLEAR", "exit 1 with nothing on stderr")
    last = lines[-1]
    # what a pipe's command (``ark:gunzip -c x |``) says on stderr is its own
    pipe_cmds = tuple(w.split()[0] + ":" for a in argv if "|" in a
                      for w in [a.split(":", 1)[-1].strip(" |")] if w.split())
    if "gunzip:" in pipe_cmds:
        pipe_cmds += ("gzip:",)
    # log lines (Kaldi's LOG/WARNING, progress, a decoder's "utt words") may come
    # before the error line; a second line that reads as an error may not
    others = [ln for ln in lines[:-1] if ERRORISH.search(ln) and not LOGLINE.search(ln)
              and not (pipe_cmds and ln.startswith(pipe_cmds))]
    if lost:
        return D("PARTIAL", "after a failure the exp dir lost %s" % lost[:4])
    if left and case.seed_out:
        # a resumable program keeps the stages it completed: each must be complete
        for x in left:
            if ".tmp" in x or os.path.basename(x).startswith("."):
                return D("PARTIAL", "temporary file left: %s" % x)
            bad = check_output(outdir / x, _kind_of(x))
            if bad:
                return D("PARTIAL", "after a failure %s is incomplete: %s" % (x, bad))
    elif left:
        return D("PARTIAL", "after a failure the output dir holds %s" % left[:4])
    m = ERRLINE.match(last)
    if not m or not last.startswith(case.prog + ": "):
        return D("UNCLEAR", "last line is not '%s: ...': %s" % (case.prog, last[:200]))
    if others:
        return D("UNCLEAR", "more than one error line: %s" % others[-1][:200])
    msg = m.group(2)
    if "internal error" in msg:
        return D("UNCLEAR", msg[:200])
    named = [s for s in case.names if s and s in msg]
    if not named:
        # any path or specifier of the command counts as naming the file
        for a in argv:
            for tok in re.split(r"[:=,| ]", a):
                if len(tok) > 3 and ("/" in tok) and (tok in msg or os.path.basename(tok) in msg):
                    named.append(tok)
    if not named and case.outdir in ("full", "fsize"):
        # a full disk may hit a temporary file first: naming it is naming the file
        named = re.findall(r"/[\w.-]+/[\w./-]+", msg)
    if not named:
        return D("UNCLEAR", "no file named: %s" % last[:200])
    return {"cls": "OK-clean-error", "kind": "", "why": ""}


def _kind_of(rel: str) -> Optional[str]:
    """The output kind of a file a pkwrap-chain-train run leaves in its exp dir."""
    if rel.endswith(".fst"):
        return "fst"
    if rel.endswith(".mdl"):
        return "nnet3"
    if rel.endswith("trans_mdl"):
        return "trans"
    if rel.endswith(".pt"):
        return "ckpt"
    if os.path.basename(rel) in ("online_cmvn",):
        return "any"
    return "nonempty"


def check_output(path: Path, kind: Optional[str]) -> Optional[str]:
    """A problem with a written output, or None."""
    import numpy as np
    try:
        if kind == "nonempty" and path.stat().st_size == 0:
            return "empty file"
        if kind == "nnet3":
            from pkwrap.nnet3 import read_nnet3
            read_nnet3(str(path))
        elif kind == "trans":
            from pkwrap.kaldi.hmm import read_transition_model
            read_transition_model(str(path))
        elif kind == "ckpt":
            from pkwrap.train.checkpoint import load_checkpoint
            load_checkpoint(str(path))
        elif kind == "lat":
            from pkwrap.kaldi.lattice import read_compact_lattices
            n = 0
            for _, lat in read_compact_lattices("ark:%s" % path):
                n += 1
            if n == 0:
                return "no lattices written"
        elif kind == "sup":
            from pkwrap.chain.supervision import read_supervisions
            if sum(1 for _ in read_supervisions("ark:%s" % path)) == 0:
                return "no supervisions written"
        if kind == "fst":
            from pkwrap.kaldi.fst import read_fst
            f = read_fst(str(path))
            if not np.isfinite(f.weight).all() or np.isnan(f.final).any() or \
                    (f.final == -np.inf).any():
                return "non-finite weight in the written FST"
            if f.num_states == 0:
                return "empty FST written"
        elif kind == "egs":
            from pkwrap.kaldi.chain_egs import read_chain_egs
            n = 0
            for k, eg in read_chain_egs("ark:%s" % path):
                n += 1
                for name, x in eg.inputs.items():
                    if not np.isfinite(np.asarray(x)).all():
                        return "eg %s: non-finite values in input %s" % (k, name)
            if n == 0:
                return "no egs written"
        elif kind == "matrix":
            from pkwrap.kaldi.table import read_table
            t = read_table("ark:%s" % path, "matrix")
            if not t:
                return "no matrices written"
            for k, v in t.items():
                if not np.isfinite(np.asarray(v)).all():
                    return "non-finite value in matrix %s" % k
        elif kind == "text":
            if NONFINITE.search(path.read_text(errors="replace")):
                return "nan/inf in text output"
    except Exception as e:  # noqa: BLE001 - any failure to read back is a finding
        return "written output does not read back: %s" % str(e)[:150]
    return None

# ============================================================================ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/pkwrap_fuzz")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--programs", default="", help="comma-separated subset")
    ap.add_argument("--per-input", type=int, default=10, help="damaged variants per input")
    ap.add_argument("--max-cases", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--ids", default="", help="comma-separated case ids to run")
    ap.add_argument("--list", action="store_true", help="list the cases and stop")
    ap.add_argument("--subprocess", action="store_true",
                    help="start every case as a fresh interpreter (slower; the default forks "
                    "a warm one)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = root / "base"
    stamp = base / ".built"
    if not stamp.exists():
        if base.exists():
            shutil.rmtree(base)
        B = build_base(base)
        (base / "inputs.json").write_text(json.dumps(B))
        stamp.write_text("ok")
    B = json.loads((base / "inputs.json").read_text())
    cases = make_cases(B, a.per_input)
    if a.programs:
        keep = set(a.programs.split(","))
        cases = [c for c in cases if c.prog in keep]
    if a.ids:
        keep = set(a.ids.split(","))
        cases = [c for c in cases if c.id in keep]
    if a.max_cases:
        cases = cases[:a.max_cases]
    if a.list:
        for c in cases:
            print(c.id, c.what)
        return 0
    if (root / "defects").exists():
        shutil.rmtree(root / "defects")
    unshare_ok = subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    print("fuzz: %d cases, %d programs, %d jobs (setup %.0fs)%s" % (
        len(cases), len({c.prog for c in cases}), a.jobs, time.time() - t0,
        "" if unshare_ok else "; no unshare: full disk by RLIMIT_FSIZE"), flush=True)
    # heavy programs first so the pool ends evenly
    order = sorted(cases, key=lambda c: c.prog not in ("nnet3-chain-combine",
                                                       "nnet3-chain-compute-prob"))
    results = []
    with multiprocessing.Pool(a.jobs, _worker_init, (not a.subprocess,)) as pool:
        for i, r in enumerate(pool.imap_unordered(
                run_case, [(c, B, str(root), a.timeout, unshare_ok) for c in order])):
            results.append(r)
            if r["cls"] in ("DEFECT", "HARNESS") and a.subprocess:
                print("DEFECT %-9s %-28s %-40s %s" % (r["kind"], r["id"], r["what"][:40],
                                                     r["why"][:150]), flush=True)
            if (i + 1) % 100 == 0:
                print("... %d/%d (%.0fs)" % (i + 1, len(order), time.time() - t0), flush=True)
    # every defect found in a forked worker is run again as a fresh process (as its
    # repro.sh does): only what reproduces there counts
    again = [r for r in results if r["cls"] in ("DEFECT", "HARNESS")]
    if again and not a.subprocess:
        byid = {c.id: c for c in cases}
        print("confirming %d defects in fresh processes" % len(again), flush=True)
        with multiprocessing.Pool(a.jobs, _worker_init, (False,)) as pool:
            redo = pool.map(run_case, [(byid[r["id"]], B, str(root), a.timeout, unshare_ok, True)
                                       for r in again])
        new = {r["id"]: r for r in redo}
        for r in again:
            if new[r["id"]]["cls"] != "DEFECT":
                shutil.rmtree(root / "defects" / r["id"], ignore_errors=True)
            if new[r["id"]]["cls"] != r["cls"]:
                print("not confirmed: %s (%s -> %s)" % (r["id"], r["why"][:80],
                                                         new[r["id"]]["cls"]))
        results = [new.get(r["id"], r) for r in results]
        for r in results:
            if r["cls"] == "DEFECT" and r["id"] in new:
                print("DEFECT %-9s %-28s %-40s %s" % (r["kind"], r["id"], r["what"][:40],
                                                     r["why"][:150]), flush=True)
    table = collections.defaultdict(collections.Counter)
    for r in results:
        table[r["prog"]][r["cls"] if r["cls"] != "DEFECT" else "DEFECT:" + r["kind"]] += 1
    cols = ["OK-success", "OK-clean-error", "SKIP", "HARNESS"] + sorted(
        {k for t in table.values() for k in t if k.startswith("DEFECT")})
    print("\n%-26s %s %6s" % ("program", " ".join("%15s" % c for c in cols), "total"))
    tot = collections.Counter()
    for prog in sorted(table):
        print("%-26s %s %6d" % (prog, " ".join("%15d" % table[prog][c] for c in cols),
                                sum(table[prog].values())))
        tot.update(table[prog])
    print("%-26s %s %6d" % ("TOTAL", " ".join("%15d" % tot[c] for c in cols),
                            sum(tot.values())))
    ndef = sum(v for k, v in tot.items() if k.startswith("DEFECT"))
    print("\n%d cases, %d defects, %.0fs; report %s" % (len(results), ndef, time.time() - t0,
                                                       root / "report.json"))
    (root / "report.json").write_text(json.dumps(sorted(results, key=lambda r: r["id"]),
                                                 indent=1))
    return 1 if ndef else 0


if __name__ == "__main__":
    sys.exit(main())
