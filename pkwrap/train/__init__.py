"""pkwrap.train: chain (LF-MMI) training under torchrun.

A recipe's train.py (icefall shape) builds the pieces and hands them to :class:`Trainer`::

    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import natural_gradient
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train import (EgsDataset, StreamingEgs, TrainConfig, Trainer,
                              cleanup_distributed, setup_distributed)

    info = setup_distributed()                      # RANK/WORLD_SIZE from torchrun, or 1 process
    model = natural_gradient(MyModel()).to(info.device)  # any [B][T][F] -> [B][T'][P] (, xent)
    loss = ChainLoss(DenominatorGraph.from_fst("exp/chain/den.fst", num_pdfs),
                     ChainOptions(leaky_hmm_coefficient=0.1, l2_regularize=5e-5,
                                  xent_regularize=0.1))
    opt = NGSGD(kaldi_param_groups(model), lr=0.002)
    Trainer(model, loss, opt, StreamingEgs("exp/chain/egs", "128"),  # or EgsDataset.from_kaldi
            TrainConfig(exp_dir="exp/pk", num_epochs=4, minibatch_size="128"),
            valid_data=EgsDataset.from_kaldi("ark:exp/chain/egs/valid_diagnostic.cegs"),
            dist_info=info).train()
    cleanup_distributed()

Run it with ``python train.py`` (one process), ``torchrun --nproc_per_node=4 train.py``
(one node), or ``torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8
--max-restarts=3 train.py`` (elastic: a dead worker restarts the job from the last
checkpoint). ``tensorboard --logdir exp/pk/tensorboard`` shows the objectives; each rank
logs to ``exp/pk/log/train.<rank>.log``.

  dist.py         process group from torchrun's environment (gloo on CPU, nccl on CUDA)
  context.py      model left/right context and frame subsampling, found by probing
  data.py         Kaldi minibatch-size rules, resumable sharded sampler, frame shifts;
                  EgsSource (what the Trainer trains on) and PlannedEgs (map-style data)
  stream.py       StreamingEgs: a Kaldi egs dir streamed as train.py reads it (bounded
                  memory, exact resume)
  checkpoint.py   atomic verified checkpoints, retention, RNG states
  metrics.py      objective tracker, per-rank logs, rank-0 TensorBoard
  diagnostics.py  compute-prob, nnet3-chain-combine, batchnorm stats
  loop.py         Trainer / TrainConfig
  forward.py      nnet3-compute style forward pass writing a Kaldi ark
  model_io.py     model files (state dict + how to rebuild), compute-prob/combine programs
  comm_hooks.py   DDP communication hook for NG-SGD (pkwrap.optim)
  host_memory.py  keep freed CPU memory for reuse (no page faults on every step)
"""
from .checkpoint import (CheckpointError, find_latest_checkpoint, load_checkpoint,  # noqa: F401
                         save_checkpoint)
from .context import ModelContext, probe_model_context, split_model_output  # noqa: F401
from .data import (ChainBatch, ChainMinibatchSampler, EgsDataset,  # noqa: F401
                   EgsSource, MinibatchSizeRule, PlannedEgs, collate_chain_egs,
                   halve_minibatch_size, make_loader)
from .stream import KaldiEgsDir, StreamingEgs  # noqa: F401
from .diagnostics import (combine_models, compute_chain_loss, compute_prob,  # noqa: F401
                          compute_prob_log_lines, recompute_batchnorm_stats)
from .dist import (DistInfo, cleanup_distributed, get_rank, get_world_size,  # noqa: F401
                   setup_distributed)
from .forward import compute_nnet_output, compute_nnet_outputs  # noqa: F401
from .host_memory import keep_freed_memory  # noqa: F401
from .loop import TrainConfig, Trainer  # noqa: F401
from .metrics import ObjfTracker, kaldi_objf_line  # noqa: F401
from .model_io import (combine_model_files, compute_prob_on_egs, load_model,  # noqa: F401
                       save_model)

__all__ = [
    "CheckpointError", "find_latest_checkpoint", "load_checkpoint", "save_checkpoint",
    "ModelContext", "probe_model_context", "split_model_output",
    "ChainBatch", "ChainMinibatchSampler", "EgsDataset", "MinibatchSizeRule",
    "collate_chain_egs", "make_loader", "EgsSource", "PlannedEgs", "halve_minibatch_size",
    "KaldiEgsDir", "StreamingEgs",
    "combine_models", "compute_chain_loss", "compute_prob", "compute_prob_log_lines",
    "recompute_batchnorm_stats",
    "DistInfo", "cleanup_distributed", "get_rank", "get_world_size", "setup_distributed",
    "compute_nnet_output", "compute_nnet_outputs", "keep_freed_memory",
    "TrainConfig", "Trainer",
    "ObjfTracker", "kaldi_objf_line",
    "combine_model_files", "compute_prob_on_egs", "load_model", "save_model",
]
