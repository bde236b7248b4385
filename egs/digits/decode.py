#!/usr/bin/env python3
"""Decode the digits test set with the trained chain model and a digit-loop grammar.

HCLG = H o C o L o G as Kaldi's ``utils/mkgraph.sh`` builds it for chain models
(transition and self-loop scales 1.0): G is the digit loop (any sequence of the 11
words, uniform), L the espeak-ng lexicon with optional silence, C from the tree's
context, H from the transition model. For each utterance the network's output
``y[t][p]`` (log-likelihood-like scores, no prior subtraction in chain models) is
decoded with acoustic scale 0.5 (``--acoustic-scale``), and the hypotheses are scored
against the references: WER = (substitutions + deletions + insertions) / reference words.

Writes ``<exp>/graph/`` (HCLG.fst, words.txt, phones.txt) and
``<exp>/decode_<part>/`` with ``loglikes.{ark,scp}`` (Kaldi matrices: feed them to
Kaldi's ``latgen-faster-mapped``), ``hyp.txt``, ``wer`` (Kaldi's compute-wer line) and
``per_utt`` (errors of each utterance).

Usage:
  python3 decode.py --data data --exp exp/chain --part test
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import kaldiio
import torch

from pkwrap.decode import (DecodingGraph, build_decoding_graph_from_lang, compute_wer,
                           decode, read_transcripts)
from pkwrap.kaldi.hmm import read_transition_model, read_tree
from pkwrap.nn import TDNNFModel
from pkwrap.train import compute_nnet_output, load_checkpoint, probe_model_context

log = logging.getLogger("digits.decode")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--exp", type=Path, default=Path("exp/chain"))
    p.add_argument("--part", default="test",
                   help="data dir(s) under --data, comma-separated (run.sh stage 6 decodes "
                        "every evaluation condition in one call)")
    p.add_argument("--model", type=Path, default=None, help="default: <exp>/final.pt")
    p.add_argument("--acoustic-scale", type=float, default=0.5,
                   help="scale of the network's outputs against the graph's costs; 0.5 "
                        "(fewer insertions) was better than 1.0 on noisy and human speech "
                        "(RESULTS.md)")
    p.add_argument("--beam", type=float, default=15.0)
    p.add_argument("--max-active", type=int, default=7000)
    return p


def load_model(exp: Path, path: Path) -> TDNNFModel:
    """The TDNNFModel described by ``<exp>/model.json`` with the weights of ``path``."""
    cfg_path = exp / "model.json"
    if not cfg_path.is_file():
        sys.exit("decode.py: %s not found (train.py writes it)" % cfg_path)
    model = TDNNFModel(**json.loads(cfg_path.read_text()))
    ckpt = load_checkpoint(str(path))
    if "model" not in ckpt:
        sys.exit("decode.py: %s holds no 'model' state dict" % path)
    state = ckpt["model"]
    want = set(model.state_dict())
    if set(state) != want:
        old = any(k.startswith(("tdnnfs.", "batchnorm0.", "tdnn1.")) for k in state)
        sys.exit("decode.py: %s does not fit the model of %s: %s" % (
            path, cfg_path, "it is a checkpoint of the older TDNNFModel layout (before the "
            "model became an nnet3 network); retrain with this version" if old else
            "missing %s, unexpected %s" % (sorted(want - set(state))[:3],
                                           sorted(set(state) - want)[:3])))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # same names, other shapes
        sys.exit("decode.py: %s does not fit the model of %s: %s"
                 % (path, cfg_path, str(e).splitlines()[-1].strip()))
    model.eval()
    return model


def get_graph(exp: Path, lang: Path, tree, trans_model) -> DecodingGraph:
    """``<exp>/graph`` if it is newer than its inputs, else build and write it."""
    gdir = exp / "graph"
    hclg = gdir / "HCLG.fst"
    inputs = [lang / "G.fst", lang / "L_disambig.fst", exp / "tree", exp / "0.trans_mdl"]
    if hclg.is_file() and all(hclg.stat().st_mtime >= p.stat().st_mtime for p in inputs):
        return DecodingGraph.read(str(gdir), trans_model)
    graph = build_decoding_graph_from_lang(str(lang), tree, trans_model)
    graph.write(str(gdir))
    log.info("wrote %s (%d states)", hclg, graph.hclg.num_states)
    return graph


def main():
    args = get_parser().parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s [decode.py] %(message)s")
    exp = args.exp
    parts = [p for p in args.part.split(",") if p]
    for f in [exp / "tree", exp / "0.trans_mdl"] + [args.data / p / n for p in parts
                                                    for n in ("feats.scp", "text")]:
        if not f.is_file():
            sys.exit("decode.py: %s not found" % f)
    torch.set_num_threads(1)
    tree = read_tree(str(exp / "tree"))
    trans_model = read_transition_model(str(exp / "0.trans_mdl"))
    graph = get_graph(exp, args.data / "lang", tree, trans_model)
    model = load_model(exp, args.model or exp / "final.pt")
    ctx = probe_model_context(model, model.feat_dim)
    for part in parts:
        decode_part(args, part, model, ctx, graph)


def decode_part(args, part, model, ctx, graph):
    """Decode ``<data>/<part>`` into ``<exp>/decode_<part>``."""
    part_dir = args.data / part
    out = args.exp / ("decode_" + part)
    out.mkdir(parents=True, exist_ok=True)
    refs = read_transcripts(part_dir / "text")
    hyps = {}
    feats = kaldiio.load_scp(str(part_dir / "feats.scp"))
    # absolute ark path in the scp, so it is usable from any directory
    ark = (out / "loglikes.ark").resolve()
    with kaldiio.WriteHelper("ark,scp:%s,%s" % (ark, out / "loglikes.scp")) as w:
        for utt in sorted(feats):
            y = compute_nnet_output(model, feats[utt], ctx)
            w(utt, y.numpy())
            res = decode(y, graph, acoustic_scale=args.acoustic_scale, beam=args.beam,
                         max_active=args.max_active)
            if not res.reached_final:
                log.warning("%s: no final state reached; using the best partial path", utt)
            hyps[utt] = res.words
    with open(out / "hyp.txt", "w") as f:
        for utt in sorted(hyps):
            f.write(("%s %s" % (utt, " ".join(hyps[utt]))).rstrip() + "\n")
    stats = compute_wer(refs, hyps)
    with open(out / "per_utt", "w") as f:
        for utt in sorted(refs):
            single = compute_wer({utt: refs[utt]}, {utt: hyps.get(utt, [])})
            errs = single.ins + single.dels + single.subs
            if errs:
                f.write("%s errors %d ref: %s | hyp: %s\n" % (utt, errs, " ".join(refs[utt]),
                                                               " ".join(hyps.get(utt, []))))
    (out / "wer").write_text(str(stats).splitlines()[0] + "\n")
    print(stats)
    log.info("%s WER on %d utterances: %s", part, len(hyps), str(stats).splitlines()[0])


if __name__ == "__main__":
    main()
