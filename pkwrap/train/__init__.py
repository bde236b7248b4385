"""pkwrap.train: chain training under torchrun.

  dist.py         process group from torchrun's environment (gloo on CPU, nccl on CUDA)
  context.py      model left/right context and frame subsampling, found by probing
  data.py         Kaldi minibatch-size rules, resumable sharded sampler, frame shifts
  checkpoint.py   atomic verified checkpoints, retention, RNG states
  metrics.py      objective tracker, per-rank logs, rank-0 TensorBoard
  diagnostics.py  compute-prob, nnet3-chain-combine, batchnorm stats
  loop.py         Trainer / TrainConfig
  forward.py      nnet3-compute style forward pass writing a Kaldi ark
  model_io.py     model files (state dict + how to rebuild), compute-prob/combine programs
  comm_hooks.py   DDP communication hook for NG-SGD (pkwrap.optim)
"""
from .checkpoint import (CheckpointError, find_latest_checkpoint, load_checkpoint,  # noqa: F401
                         save_checkpoint)
from .context import ModelContext, probe_model_context, split_model_output  # noqa: F401
from .data import (ChainBatch, ChainMinibatchSampler, EgsDataset,  # noqa: F401
                   MinibatchSizeRule, collate_chain_egs, make_loader)
from .diagnostics import (combine_models, compute_chain_loss, compute_prob,  # noqa: F401
                          compute_prob_log_lines, recompute_batchnorm_stats)
from .dist import (DistInfo, cleanup_distributed, get_rank, get_world_size,  # noqa: F401
                   setup_distributed)
from .forward import compute_nnet_output, compute_nnet_outputs  # noqa: F401
from .loop import TrainConfig, Trainer  # noqa: F401
from .metrics import ObjfTracker, kaldi_objf_line  # noqa: F401
from .model_io import (combine_model_files, compute_prob_on_egs, load_model,  # noqa: F401
                       save_model)
