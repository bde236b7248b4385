"""A CI-sized chain training job for the pkwrap.train tests (run under torchrun or alone).

Trains a tiny TDNN-F (pkwrap.nn) with NG-SGD on the mono fixture egs (19 egs of 50 output
frames, 34 pdfs) with the mono den.fst, then writes the final parameters of this rank to
``<exp>/params.<rank>.pt``.

  torchrun --nproc_per_node=2 tests/train_scripts/train_tiny.py --exp EXP
  python tests/train_scripts/train_tiny.py --exp EXP            # one process
  torchrun --nproc_per_node=1 tests/train_scripts/train_tiny.py --exp EXP --device cuda

``--kill-rank R --kill-step K --kill-marker FILE``: rank R SIGKILLs itself right after
step K, once (the marker file records that it happened), to test elastic restarts.
"""
import argparse
import os
import signal
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(os.path.dirname(HERE), "fixtures", "kaldi")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--exp", required=True)
    p.add_argument("--egs", default=os.path.join(FIX, "mono", "data", "cegs_compress_true.ark"))
    p.add_argument("--den-fst", default=os.path.join(FIX, "mono", "den.fst"))
    p.add_argument("--num-pdfs", type=int, default=34)
    p.add_argument("--num-epochs", type=int, default=2)
    p.add_argument("--minibatch-size", default="2")
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--model-averaging-period", type=int, default=0,
                   help="Kaldi's local steps + averaging instead of gradient allreduce")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--kill-marker", default="")
    p.add_argument("--device", default="cpu", help="cpu or cuda (nccl; bench/gpu_check.py)")
    p.add_argument("--process-group", action="store_true",
                   help="open the process group also for one process (its collectives run)")
    return p


def main():
    args = get_parser().parse_args()
    torch.set_num_threads(1)
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import TDNNFModel
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train import (EgsDataset, TrainConfig, Trainer, cleanup_distributed,
                              setup_distributed)
    from pkwrap.train.comm_hooks import NGSGDState, ngsgd_hook

    info = setup_distributed(device=args.device, single_process_group=args.process_group)
    print("train_tiny: rank %d of %d on %s, backend %s" % (info.rank, info.world_size,
                                                         info.device, info.backend), flush=True)
    data = EgsDataset.from_kaldi(args.egs)
    den = DenominatorGraph.from_fst(args.den_fst, args.num_pdfs)
    opts = ChainOptions(leaky_hmm_coefficient=0.1, l2_regularize=5e-5, xent_regularize=0.1)
    loss = ChainLoss(den, opts)
    torch.manual_seed(1234)  # the same initial model on every rank
    spec = {"factory": "pkwrap.nn:TDNNFModel",
            "kwargs": dict(num_pdfs=args.num_pdfs, feat_dim=40, tdnn_dim=32, tdnnf_dim=32,
                           bottleneck_dim=8, time_strides=[1, 0, 3], prefinal_dim=16,
                           prefinal_big_dim=32, use_idct=False)}
    model = TDNNFModel(**spec["kwargs"])
    # input dropout in training: the job draws random numbers every step, so an exact
    # resume needs every rank's RNG state back (the state dict is unchanged)
    model.register_forward_pre_hook(
        lambda m, inp: (torch.nn.functional.dropout(inp[0], 0.1, m.training),))
    opt = NGSGD(kaldi_param_groups(model), lr=args.lr)

    def after_step(m, step):
        if info.rank == args.kill_rank and step == args.kill_step and \
                not os.path.exists(args.kill_marker):
            open(args.kill_marker, "w").write("killed rank %d after step %d\n"
                                              % (info.rank, step))
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(exp_dir=args.exp, num_epochs=args.num_epochs,
                      minibatch_size=args.minibatch_size, seed=3,
                      checkpoint_every=args.checkpoint_every, keep_last=2, log_every=1,
                      progress_bar=False, model_averaging_period=args.model_averaging_period)
    hook = None
    if info.world_size > 1 and args.model_averaging_period == 0:
        hook = (NGSGDState(average=True), ngsgd_hook)  # NG-SGD gradients, Kaldi's scaling
    trainer = Trainer(model, loss, opt, data, cfg, valid_data=data, dist_info=info,
                      after_step=after_step, model_spec=spec, comm_hook=hook)
    model = trainer.train()
    torch.save({k: v.clone() for k, v in model.state_dict().items()},
               os.path.join(args.exp, "params.%d.pt" % info.rank))
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
