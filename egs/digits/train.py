#!/usr/bin/env python3
"""Train a TDNN-F chain model on the synthesized digits, flat start, LF-MMI + NG-SGD.

Each training utterance is one end-to-end example (Kaldi's ``nnet3-chain-e2e-get-egs``),
made in memory when training starts, never written to disk: its numerator graph is the
utterance's transcript compiled through the lexicon with optional silence
(``compile-train-graphs`` with zero transition and self-loop scales), mapped to
pdf-ids + 1 and normalized with normalization.fst. The objective of utterance u is

    F_u = log p(X_u | num graph of u) - log p(X_u | den graph),

summed over the minibatch (Kaldi's scale: a sum over output frames), minus the
output l2 term; the model is a TDNN-F (``pkwrap.nn.TDNNFModel``) whose affine layers
precondition their gradients with Kaldi's natural gradient in backward, trained with
``pkwrap.optim.NGSGD`` (Kaldi's max-change, l2, learning-rate schedule) under DDP.
The loop, checkpoints, TensorBoard, diagnostics and model combination are
``pkwrap.train.Trainer``'s. ``final.pt`` is the plain average of the last twelve
checkpoints, one every 20 steps and at each epoch's end (``--combine-mode average``:
about the last 40 % of the steps): on the recorded human speech this did better than
nnet3-chain-combine's choice by the objective on the synthesized valid voices, which
mostly keeps only the newest one or two (egs/digits/RESULTS.md).

Usage:
  # what run.sh stage 4 does: 2 processes (gloo on CPU, nccl on GPUs)
  torchrun --standalone --nproc_per_node=2 train.py --data data --exp exp/chain
  # one process, no torchrun
  python3 train.py --data data --exp exp/chain
  # several GPUs on one node / two nodes (run on each node; node_rank 0 and 1)
  torchrun --nproc_per_node=4 train.py --device cuda --data data --exp exp/chain
  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --rdzv_backend=c10d \\
      --rdzv_endpoint=HOST:29400 train.py --device cuda --data data --exp exp/chain
  # watch it
  tensorboard --logdir exp/chain/tensorboard

Re-running the same command resumes from the newest good checkpoint in
``<exp>/checkpoints`` (``torchrun --max-restarts=3`` does the same after a dead worker).

Inputs: ``<data>/{train,valid}/{feats.scp,text,allowed_lengths.txt}``, ``<data>/lang``
(L.fst, words.txt) and, from stage 3, ``<exp>/{tree,0.trans_mdl,den.fst,normalization.fst}``.
Outputs in ``<exp>``: ``final.pt`` (``{"model": state_dict, ...}``), ``model.json`` (the
model's constructor arguments, for decode.py), ``checkpoints/``, ``log/train.<rank>.log``,
``tensorboard/``.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import kaldifst
import kaldiio
import numpy as np
import torch

from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
from pkwrap.chain.egs import E2EChainEgsDataset, ExampleGenerationConfig
from pkwrap.decode import SymbolTable, compile_train_graph, from_kaldifst
from pkwrap.kaldi.fst import read_fst
from pkwrap.kaldi.hmm import read_transition_model, read_tree
from pkwrap.nn import TDNNFModel
from pkwrap.optim import NGSGD, KaldiLRScheduler, kaldi_param_groups
from pkwrap.train import (ChainMinibatchSampler, EgsDataset, TrainConfig, Trainer,
                          cleanup_distributed, setup_distributed)
from pkwrap.train.chain_train import dropout_proportions
from pkwrap.train.comm_hooks import NGSGDState, ngsgd_hook
from pkwrap.train.diagnostics import COMBINE_MODES
from pkwrap.train.dist import all_gather_object

log = logging.getLogger("digits.train")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--exp", type=Path, default=Path("exp/chain"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--train-part", default="train",
                   help="training data dir under --data (run.sh: train_aug when augmenting)")
    p.add_argument("--spec-augment", default="",
                   help="Kaldi spec-augment-layer on the input features in training: "
                        "'freq-max-proportion,time-zeroed-proportion,time-mask-max-frames' "
                        "(Kaldi's defaults: 0.5,0.2,20); empty: off")
    p.add_argument("--dropout-schedule", default="",
                   help="Kaldi's --trainer.dropout-schedule for dropout in the TDNN-F layers, "
                        "e.g. '0,0@0.20,0.5@0.50,0' (proportion against the fraction of "
                        "training done); empty: no dropout components")
    p.add_argument("--num-epochs", type=int, default=6)
    p.add_argument("--minibatch-size", default="1:32",
                   help="Kaldi rule string (nnet3-chain-merge-egs --minibatch-size)")
    p.add_argument("--initial-effective-lrate", type=float, default=0.002)
    p.add_argument("--final-effective-lrate", type=float, default=0.0002)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--tdnnf-dim", type=int, default=256)
    p.add_argument("--bottleneck-dim", type=int, default=64)
    p.add_argument("--time-strides", default="1,1,1,0,3,3,3,3",
                   help="one TDNN-F layer per stride (Kaldi's tdnn_1j strides, fewer layers)")
    p.add_argument("--prefinal-dim", type=int, default=128)
    p.add_argument("--l2-regularize", type=float, default=0.0,
                   help="chain output l2 (--chain.l2-regularize)")
    p.add_argument("--layer-l2-regularize", type=float, default=0.01,
                   help="per-layer l2 of the TDNN-F layers (1j: 0.03)")
    p.add_argument("--leaky-hmm-coefficient", type=float, default=0.1)
    p.add_argument("--xent-regularize", type=float, default=0.0,
                   help="> 0 adds the xent head and its objective (--chain.xent-regularize)")
    p.add_argument("--train-diag-utts", type=int, default=100,
                   help="training utterances for the train compute-prob diagnostic")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--valid-every", type=int, default=0,
                   help="steps between compute-prob diagnostics (0: at the end of each epoch)")
    p.add_argument("--combine-last", type=int, default=12,
                   help="combine the last N checkpoints, as --combine-mode says (<= 1: off)")
    p.add_argument("--combine-mode", choices=COMBINE_MODES, default="average",
                   help="valid: nnet3-chain-combine's running average of best valid objective; "
                        "average: the plain average of the N (icefall's --avg)")
    p.add_argument("--max-steps", type=int, default=None, help="stop early (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def get_params(args) -> Dict:
    """Settings that are not command-line options.

      frame_subsampling_factor: output frame period in input frames (3 for chain).
      feat_dim: 40 log mel filterbanks (local/compute_fbank.py).
      sil_phone: the optional silence of L (local/prepare_lang.py).
    """
    return {"frame_subsampling_factor": 3, "feat_dim": 40, "sil_phone": "SIL"}


def model_config(args, params, num_pdfs: int) -> Dict:
    """Constructor arguments of the TDNNFModel, saved to model.json for decode.py."""
    strides = [int(s) for s in args.time_strides.split(",") if s.strip()]
    spec = None
    if args.spec_augment:
        try:
            fp, tz, tm = args.spec_augment.split(",")
            spec = dict(freq_max_proportion=float(fp), time_zeroed_proportion=float(tz),
                        time_mask_max_frames=int(tm))
        except ValueError:
            sys.exit("train.py: --spec-augment needs 'freq-max-proportion,"
                     "time-zeroed-proportion,time-mask-max-frames', got %r" % args.spec_augment)
    return dict(spec_augment=spec, num_pdfs=num_pdfs, feat_dim=params["feat_dim"], tdnn_dim=args.tdnnf_dim,
                tdnnf_dim=args.tdnnf_dim, bottleneck_dim=args.bottleneck_dim,
                time_strides=strides, prefinal_dim=args.prefinal_dim,
                prefinal_big_dim=args.tdnnf_dim,
                frame_subsampling_factor=params["frame_subsampling_factor"],
                use_idct=False, use_delta=True, l2_regularize=args.layer_l2_regularize,
                xent_head=args.xent_regularize > 0, dropout=bool(args.dropout_schedule))


def read_text(path: Path) -> Dict[str, List[str]]:
    out = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        out[parts[0]] = parts[1:]
    return out


def make_e2e_egs(part_dir: Path, keys: List[str], lang: Path, tree, trans_model,
                 normalization_fst, egs_config, rank: int, world_size: int
                 ) -> List[Tuple[str, object]]:
    """End-to-end chain examples of ``keys``, made on the fly and shared by all ranks.

    Rank r compiles the training graphs and examples of keys ``r, r + W, ...``; the
    pieces are then all-gathered, so every rank holds every example (sorted by key).
    Utterances that give no example (transcript too long for its frames, unknown
    word, ...) are counted and logged per reason, never dropped silently.
    """
    text = read_text(part_dir / "text")
    words = SymbolTable.read(lang / "words.txt")
    L = kaldifst.StdVectorFst.read(str(lang / "L.fst"))
    if L is None:
        raise RuntimeError("%s is not a readable OpenFst vector FST" % (lang / "L.fst"))
    feats = kaldiio.load_scp(str(part_dir / "feats.scp"))
    mine = keys[rank::world_size]
    graphs, errors = {}, {}
    for k in mine:
        ws = text.get(k, [])
        unknown = [w for w in ws if w not in words]
        if not ws or unknown:
            errors[k] = "empty transcript" if not ws else "words not in words.txt: %s" % unknown
            continue
        graphs[k] = from_kaldifst(compile_train_graph(L, [words[w] for w in ws], tree,
                                                      trans_model))
    ds = E2EChainEgsDataset({k: feats[k] for k in graphs}, graphs, trans_model,
                            normalization_fst, egs_config)
    egs = []
    for i in range(len(ds)):
        item = ds[i]
        if item is None:
            errors[ds.keys[i]] = "no usable supervision (see the warning above)"
        else:
            egs.append(item)
    gathered = all_gather_object((egs, errors)) if world_size > 1 else [(egs, errors)]
    all_egs = sorted((e for g, _ in gathered for e in g), key=lambda kv: kv[0])
    all_errors = {k: v for _, errs in gathered for k, v in errs.items()}
    if all_errors:
        by_reason = {}
        for k, v in all_errors.items():
            by_reason.setdefault(v.split(":")[0], []).append(k)
        log.warning("%s: %d of %d utterances give no example: %s", part_dir, len(all_errors),
                    len(keys), "; ".join("%s: %d (e.g. %s)" % (r, len(ks), ks[0])
                                         for r, ks in sorted(by_reason.items())))
    if not all_egs:
        raise RuntimeError("%s: no usable training examples" % part_dir)
    return all_egs


def run(args) -> None:
    params = get_params(args)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = setup_distributed(device=args.device)
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s [train.py rank " + str(info.rank)
                        + "] %(message)s")
    exp, data, lang = args.exp, args.data, args.data / "lang"
    train_dir = data / args.train_part
    for f in (exp / "tree", exp / "0.trans_mdl", exp / "den.fst", exp / "normalization.fst",
              lang / "L.fst", lang / "words.txt", train_dir / "feats.scp",
              train_dir / "allowed_lengths.txt", data / "valid" / "feats.scp"):
        if not f.is_file():
            sys.exit("train.py: %s not found (run the earlier stages of run.sh)" % f)
    tree = read_tree(str(exp / "tree"))
    trans_model = read_transition_model(str(exp / "0.trans_mdl"))
    num_pdfs = trans_model.num_pdfs

    cfg = model_config(args, params, num_pdfs)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = TDNNFModel(**cfg).to(info.device)
    if info.is_main:
        (exp / "model.json").write_text(json.dumps(cfg, indent=1) + "\n")
        log.info("TDNN-F: %d parameters, context %d/%d, %d pdfs",
                 sum(p.numel() for p in model.parameters()), model.left_context,
                 model.right_context, num_pdfs)

    # examples carry f//2 extra context frames so frame shifts can move the input
    # (egs_left_context = model_left_context + f // 2 in Kaldi's chain train.py)
    fsf = params["frame_subsampling_factor"]
    allowed = (train_dir / "allowed_lengths.txt").read_text().split()
    egs_config = ExampleGenerationConfig(left_context=model.left_context + fsf // 2,
                                         right_context=model.right_context + fsf // 2,
                                         num_frames=",".join(allowed),
                                         frame_subsampling_factor=fsf)
    norm = read_fst(str(exp / "normalization.fst"))
    train_keys = sorted(read_text(train_dir / "text"))
    valid_keys = sorted(read_text(data / "valid" / "text"))
    train_egs = make_e2e_egs(train_dir, train_keys, lang, tree, trans_model, norm,
                             egs_config, info.rank, info.world_size)
    valid_egs = make_e2e_egs(data / "valid", valid_keys, lang, tree, trans_model, norm,
                             egs_config, info.rank, info.world_size)
    rng = np.random.default_rng(args.seed)
    diag = sorted(rng.choice(len(train_egs), min(args.train_diag_utts, len(train_egs)),
                             replace=False))
    train_data = EgsDataset(train_egs)
    valid_data = EgsDataset(valid_egs)
    train_diag_data = EgsDataset([train_egs[i] for i in diag])
    log.info("examples made on the fly: %d train, %d valid", len(train_data), len(valid_data))

    den_graph = DenominatorGraph.from_fst(str(exp / "den.fst"), num_pdfs)
    loss_fn = ChainLoss(den_graph, ChainOptions(
        leaky_hmm_coefficient=args.leaky_hmm_coefficient, l2_regularize=args.l2_regularize,
        xent_regularize=args.xent_regularize)).to(info.device)
    optimizer = NGSGD(kaldi_param_groups(model), lr=args.initial_effective_lrate,
                      momentum=args.momentum)
    # Kaldi's schedule over all steps: lr = W * effective lr (gradients are averaged over
    # the W ranks by the NG hook, which then equals Kaldi's average of W jobs' models)
    sampler = ChainMinibatchSampler(train_data.structures, args.minibatch_size, fsf,
                                    shuffle=True, seed=args.seed, rank=info.rank,
                                    world_size=info.world_size)
    num_steps = sum(sampler.steps_per_epoch(e) for e in range(args.num_epochs))
    if args.max_steps is not None:
        num_steps = min(num_steps, args.max_steps)
    scheduler = KaldiLRScheduler(optimizer, num_iters=max(1, num_steps),
                                 initial_effective_lrate=args.initial_effective_lrate,
                                 final_effective_lrate=args.final_effective_lrate,
                                 num_jobs_initial=info.world_size)
    comm_hook = (NGSGDState(average=True), ngsgd_hook) if info.world_size > 1 else None
    config = TrainConfig(exp_dir=str(exp), num_epochs=args.num_epochs,
                         minibatch_size=args.minibatch_size, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, keep_last=max(3, args.combine_last),
                         valid_every=args.valid_every, log_every=10, max_steps=args.max_steps, combine_last=args.combine_last,
                         combine_mode=args.combine_mode,
                         progress_bar=not args.no_progress_bar)
    before_step = None
    if args.dropout_schedule:
        def before_step(trainer, batch):
            # Kaldi sets the proportions at each iteration from the fraction of data seen
            frac = trainer.step / max(1, num_steps)
            for pat, prop in dropout_proportions(args.dropout_schedule, frac):
                model.apply_edits("set-dropout-proportion name=%s proportion=%r" % (pat, prop))
    trainer = Trainer(model, loss_fn, optimizer, train_data, config, scheduler=scheduler,
                      valid_data=valid_data, train_diag_data=train_diag_data, dist_info=info,
                      comm_hook=comm_hook, feat_dim=params["feat_dim"], before_step=before_step)
    trainer.train()
    if info.is_main:
        log.info("done: %s/final.pt", exp)
    cleanup_distributed()


def main():
    p = get_parser()
    args = p.parse_args()
    if args.dropout_schedule:
        try:
            dropout_proportions(args.dropout_schedule, 0.0)
        except ValueError as e:
            p.error("--dropout-schedule %r: %s" % (args.dropout_schedule, e))
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
