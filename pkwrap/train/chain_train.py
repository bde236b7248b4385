"""``pkwrap-chain-train``: a drop-in for Kaldi's ``steps/nnet3/chain/train.py``.

A chain recipe's ``local/chain/tuning/run_tdnn_*.sh`` calls ``steps/nnet3/chain/train.py``
with ``--dir`` holding ``configs/`` (from ``xconfig_to_configs.py``); replacing that
program name with ``pkwrap-chain-train`` is the whole change. The same arguments
(``--trainer.optimization.num-jobs-initial=2``, ``--chain.xent-regularize 0.1``, ...)
are read; an unknown one is an error. What it does, by Kaldi's stage numbers:

======  ===================================================================================
stage   what (Kaldi's train.py did it with)
======  ===================================================================================
-6      ``tree``, ``phones.txt`` copied from ``--tree-dir``; ``phone_lm.fst`` from the tree
        dir's ``ali.*.gz`` (ali-to-phones | chain-est-phone-lm ``--chain.lm-opts``)
-5      ``0.trans_mdl``, ``den.fst``, ``normalization.fst`` (chain-make-den-fst)
-4      with ``configs/init.config`` (networks whose first layer is a ``fixed-affine-layer``
        reading ``configs/lda.mat``): ``init.raw`` from it (nnet3-init)
-3      the egs (get_egs.sh) unless ``--egs.dir`` is given:
        :func:`pkwrap.chain.get_egs.make_chain_egs_dir` (with ``init.config``, the model
        context comes from ``configs/vars``, as in Kaldi: the network needs ``lda.mat``)
-2      with ``configs/init.config``: the LDA-like preconditioning matrix ``lda.mat``
        from the egs (nnet3-chain-acc-lda-stats, sum-lda-accs, nnet-get-feature-transform;
        ``--trainer.lda.rand-prune``, ``--trainer.lda.max-lda-jobs``), linked as
        ``configs/lda.mat``: :func:`pkwrap.chain.lda.compute_preconditioning_matrix`
-1      the network from ``configs/final.config`` (nnet3-init, on top of ``init.raw`` when
        there is one), ``0.mdl``; with ``--trainer.input-model`` (transfer learning) that
        network as it is instead, and no stages -4 / -2 (the egs get its context)
0..N-1  training iterations (nnet3-chain-train + model averaging), see below
N       final combination (nnet3-chain-combine) -> ``final.mdl``; compute-prob ``final``
======  ===================================================================================

**Iterations.** As train.py: ``A = int(num_epochs * num_archives * frame_subsampling_factor)``
archive passes; with W workers, iteration i trains on passes ``iW .. iW+W-1`` (archive
``k mod N + 1``, frame shift rotating, :class:`pkwrap.train.StreamingEgs`), with learning
rate ``W * initial * (final/initial) ** (iW / A)`` (``final`` exactly on the last
iteration), minibatch sizes and max-param-change halved / divided by sqrt(2) in iteration
0, the backstitch scale ramped up over iterations 0..14, the dropout schedule evaluated
at ``iW / A`` and l2-regularize-factor ``1/W``. At the start of iteration i the model is
written as ``i.mdl`` and its objective on the train-diagnostic and valid egs goes to
``log/compute_prob_{train,valid}.i.log`` in Kaldi's format; ``log/train.i.1.log`` ends
with Kaldi's ``# Accounting: time=...`` line, so ``accuracy.report`` (written at the end,
Kaldi's format) and Kaldi's log-parsing scripts work on the dir.

**Workers.** The number of jobs maps to torchrun workers with a fixed rule: the run has
``W = --trainer.optimization.num-jobs-final`` workers for all iterations (Kaldi grows the
number of jobs from num-jobs-initial; here the number of iterations is ``A // W``, and
each iteration's learning rate is Kaldi's for W jobs at that point of the data, so the
effective learning rate follows Kaldi's schedule). Workers average their gradients every
step (DDP: to first order what Kaldi's per-iteration model averaging does with the
learning rate W times the effective one). With W > 1 the program prepares the dir itself,
then runs its training stage again under ``torchrun --standalone --nproc_per_node=W``
(gloo on the CPU with ``--use-gpu=no``, nccl with one GPU per worker otherwise). Across
nodes, start it yourself on every node::

    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 \\
        -m pkwrap.train.chain_train <the same arguments>

(W is then torchrun's world size; rank 0 prepares the dir, the others wait.)

**Resume.** Checkpoints (``$dir/checkpoints``, every ``--pkwrap.checkpoint-every``
minibatches and at epoch ends) hold the model, optimizer, data position and RNGs; running
the same command again continues where the run stopped (stages already done are not
redone: their outputs exist). A run that fails (a damaged input: one line naming the file,
exit status 1) also keeps the stages, models and checkpoints it completed (each file is
written whole or not at all); repair the input and run again. TensorBoard:
``$dir/tensorboard``.

Arguments that have no meaning here are accepted and reported once: ``--cmd``,
``--egs.cmd`` (no queue: the work runs in this process / under torchrun),
``--reporting.email``, and ``--trainer.add-option`` options of nnet3-chain-train's
computation (``--optimization.*``, ``--compiler.*``, ``--print-interval``, caches).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import logging
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["build_parser", "parse_args", "KaldiSchedule", "dropout_proportions", "main",
           "write_compute_prob_log", "accuracy_report"]

log = logging.getLogger("pkwrap.train")

PROG = "pkwrap-chain-train"
_PREPARED_ENV = "PKWRAP_CHAIN_TRAIN_PREPARED"


# ----------------------------------------------------------------------------- arguments
def _bool(v: str) -> bool:
    """Kaldi's ``str_to_bool``: true/false (also yes/no, 1/0)."""
    s = str(v).strip().lower()
    if s in ("true", "yes", "1"):
        return True
    if s in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError("expected true or false, got %r" % v)


def _none_if_empty(v: str) -> Optional[str]:
    return None if v is None or str(v).strip() in ("", "None", "none") else str(v)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of Kaldi's steps/nnet3/chain/train.py (and its common parser)."""
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Train a chain (LF-MMI) model as Kaldi's steps/nnet3/chain/train.py "
                    "does (same arguments), in PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # general
    a("--stage", type=int, default=-4)
    a("--exit-stage", type=int, default=None)
    a("--cmd", dest="command", default="run.pl", help="ignored (no queue)")
    a("--egs.cmd", dest="egs_command", default=None, help="ignored (no queue)")
    # as train.py: true/false are yes/no (run_tdnn_1k.sh passes --use-gpu=true)
    a("--use-gpu", default="yes", type=lambda v: {"true": "yes", "false": "no"}.get(v, v),
      choices=["yes", "no", "wait"])
    a("--cleanup", type=_bool, default=True)
    a("--cleanup.remove-egs", dest="remove_egs", type=_bool, default=True)
    a("--cleanup.preserve-model-interval", dest="preserve_model_interval", type=int,
      default=100)
    a("--reporting.email", dest="email", type=_none_if_empty, default=None,
      help="ignored (no mail is sent)")
    a("--reporting.interval", dest="reporting_interval", type=float, default=0.1)
    # features / egs
    a("--feat.online-ivector-dir", dest="online_ivector_dir", type=_none_if_empty,
      default=None)
    a("--feat.cmvn-opts", dest="cmvn_opts", default=None)
    a("--egs.chunk-width", dest="chunk_width", default="150")
    a("--egs.chunk-left-context", dest="chunk_left_context", type=int, default=0)
    a("--egs.chunk-right-context", dest="chunk_right_context", type=int, default=0)
    a("--egs.chunk-left-context-initial", dest="chunk_left_context_initial", type=int,
      default=-1)
    a("--egs.chunk-right-context-final", dest="chunk_right_context_final", type=int,
      default=-1)
    a("--egs.dir", dest="egs_dir", type=_none_if_empty, default=None)
    a("--egs.stage", dest="egs_stage", type=int, default=0)
    a("--egs.opts", dest="egs_opts", type=_none_if_empty, default=None)
    a("--egs.nj", dest="egs_nj", type=int, default=0)
    # chain
    a("--chain.lm-opts", dest="lm_opts", default=None)
    a("--chain.l2-regularize", dest="l2_regularize", type=float, default=0.0)
    a("--chain.xent-regularize", dest="xent_regularize", type=float, default=0.0)
    a("--chain.right-tolerance", dest="right_tolerance", type=int, default=5)
    a("--chain.left-tolerance", dest="left_tolerance", type=int, default=5)
    a("--chain.leaky-hmm-coefficient", dest="leaky_hmm_coefficient", type=float,
      default=0.00001)
    a("--chain.apply-deriv-weights", dest="apply_deriv_weights", type=_bool, default=True)
    a("--chain.frame-subsampling-factor", dest="frame_subsampling_factor", type=int,
      default=3)
    a("--chain.alignment-subsampling-factor", dest="alignment_subsampling_factor",
      type=int, default=3)
    a("--chain.left-deriv-truncate", dest="left_deriv_truncate", default=None)
    a("--chain-opts", dest="chain_opts", default="")
    # trainer
    a("--trainer.input-model", dest="input_model", type=_none_if_empty, default=None)
    a("--trainer.srand", dest="srand", type=int, default=0)
    a("--trainer.num-epochs", dest="num_epochs", type=float, default=10.0)
    a("--trainer.frames-per-iter", dest="frames_per_iter", type=int, default=800000)
    a("--trainer.shuffle-buffer-size", dest="shuffle_buffer_size", type=int, default=5000)
    a("--trainer.max-param-change", dest="max_param_change", type=float, default=2.0)
    a("--trainer.samples-per-iter", dest="samples_per_iter", type=int, default=400000)
    a("--trainer.lda.rand-prune", dest="rand_prune", type=float, default=4.0)
    a("--trainer.lda.max-lda-jobs", dest="max_lda_jobs", type=int, default=10)
    a("--trainer.presoftmax-prior-scale-power", dest="presoftmax_prior_scale_power",
      type=float, default=-0.25)
    a("--trainer.num-chunk-per-minibatch", "--trainer.num-chunks-per-minibatch",
      dest="num_chunk_per_minibatch", default="128")
    a("--trainer.dropout-schedule", dest="dropout_schedule", type=_none_if_empty,
      default=None)
    a("--trainer.add-option", dest="train_opts", action="append", default=[])
    a("--trainer.compute-per-dim-accuracy", dest="compute_per_dim_accuracy", type=_bool,
      default=False)
    a("--trainer.deriv-truncate-margin", dest="deriv_truncate_margin", type=int,
      default=None)
    o = "--trainer.optimization."
    a(o + "proportional-shrink", dest="proportional_shrink", type=float, default=0.0)
    a(o + "num-jobs-initial", dest="num_jobs_initial", type=int, default=1)
    a(o + "num-jobs-final", dest="num_jobs_final", type=int, default=8)
    a(o + "num-jobs-step", dest="num_jobs_step", type=int, default=1)
    a(o + "max-models-combine", dest="max_models_combine", type=int, default=20)
    a(o + "max-objective-evaluations", dest="max_objective_evaluations", type=int,
      default=30)
    a(o + "do-final-combination", dest="do_final_combination", type=_bool, default=True)
    a(o + "combine-sum-to-one-penalty", dest="combine_sum_to_one_penalty", type=float,
      default=0.0)
    a(o + "momentum", dest="momentum", type=float, default=0.0)
    a(o + "backstitch-training-scale", dest="backstitch_training_scale", type=float,
      default=0.0)
    a(o + "backstitch-training-interval", dest="backstitch_training_interval", type=int,
      default=1)
    a(o + "initial-effective-lrate", dest="initial_effective_lrate", type=float,
      default=0.0002)
    a(o + "final-effective-lrate", dest="final_effective_lrate", type=float,
      default=0.00002)
    a(o + "shrink-value", dest="shrink_value", type=float, default=1.0)
    a(o + "shrink-saturation-threshold", dest="shrink_saturation_threshold", type=float,
      default=0.40)
    # dirs
    a("--feat-dir", dest="feat_dir", required=True)
    a("--tree-dir", dest="tree_dir", required=True)
    a("--lat-dir", dest="lat_dir", required=True)
    a("--dir", dest="dir", required=True)
    # pkwrap's own
    a("--pkwrap.checkpoint-every", dest="checkpoint_every", type=int, default=50,
      help="pkwrap: minibatches between checkpoints (resume granularity)")
    a("--pkwrap.num-threads", dest="num_threads", type=int, default=0,
      help="pkwrap: torch CPU threads per worker (0: torch's default)")
    return p


# nnet3-chain-train options (--trainer.add-option) that only tune Kaldi's computation
_IGNORED_TRAIN_OPT_PREFIXES = ("--optimization.", "--compiler.", "--print-interval",
                               "--write-cache", "--read-cache", "--use-gpu", "--verbose",
                               "--binary", "--compute-config.")


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """Parse Kaldi train.py's arguments.

    Returns:
      ``(args, notes)``: notes are one line per accepted-but-ignored argument.
    Raises:
      SystemExit (argparse): an unknown argument or a bad value, with one line naming it.
      ValueError: a combination pkwrap cannot do (named).
    """
    p = build_parser()
    args = p.parse_args(argv)
    notes = []
    if args.email:
        notes.append("--reporting.email=%s ignored: pkwrap-chain-train sends no mail"
                     % args.email)
    if args.command not in (None, "", "run.pl"):
        notes.append("--cmd=%s ignored: training runs in this process (several workers: "
                     "under torchrun)" % args.command)
    if args.egs_command:
        notes.append("--egs.cmd ignored")
    for opt in args.train_opts:
        for tok in shlex.split(opt):
            if tok.startswith(_IGNORED_TRAIN_OPT_PREFIXES):
                notes.append("--trainer.add-option=%s ignored: it tunes Kaldi's nnet3 "
                             "computation, which pkwrap does not use" % tok)
            else:
                p.error("--trainer.add-option=%s: pkwrap-chain-train does not support this "
                        "nnet3-chain-train option" % tok)
    if args.chain_opts.strip():
        p.error("--chain-opts=%r: not supported by pkwrap-chain-train (use the --chain.* "
                "options)" % args.chain_opts)
    if args.deriv_truncate_margin is not None or args.left_deriv_truncate is not None:
        p.error("--trainer.deriv-truncate-margin / --chain.left-deriv-truncate (recurrent "
                "models) are not supported by pkwrap-chain-train")
    if args.compute_per_dim_accuracy:
        notes.append("--trainer.compute-per-dim-accuracy ignored")
    if args.combine_sum_to_one_penalty != 0.0:
        notes.append("--trainer.optimization.combine-sum-to-one-penalty ignored (Kaldi's "
                     "nnet3-chain-combine no longer uses it either)")
    if args.shrink_value != 1.0:
        p.error("--trainer.optimization.shrink-value (saturation-based shrinking) is not "
                "supported by pkwrap-chain-train; use --trainer.optimization."
                "proportional-shrink")
    if args.num_jobs_initial < 1 or args.num_jobs_final < args.num_jobs_initial:
        p.error("num-jobs-initial must be >= 1 and num-jobs-final >= num-jobs-initial "
                "(got %d, %d)" % (args.num_jobs_initial, args.num_jobs_final))
    if args.num_epochs <= 0:
        p.error("--trainer.num-epochs must be > 0")
    if args.leaky_hmm_coefficient <= 0 or args.leaky_hmm_coefficient >= 1:
        p.error("--chain.leaky-hmm-coefficient must be in (0, 1)")
    from .data import MinibatchSizeRule
    try:
        MinibatchSizeRule(args.num_chunk_per_minibatch)
    except ValueError as e:
        p.error("--trainer.num-chunk-per-minibatch=%s: %s" % (args.num_chunk_per_minibatch, e))
    try:
        _, egs_notes = egs_keywords(args)
        notes.extend(egs_notes)
    except ValueError as e:
        p.error(str(e))
    if args.dropout_schedule is not None:
        try:
            dropout_proportions(args.dropout_schedule, 0.0)
        except ValueError as e:
            p.error("--trainer.dropout-schedule=%s: %s" % (args.dropout_schedule, e))
    return args, notes


def _option_pairs(text: Optional[str], what: str) -> List[Tuple[str, str]]:
    """A Kaldi program's options given as one string (``--a 1 --b=2``) as
    ``[("a", "1"), ("b", "2")]``; ``what`` names the argument in errors."""
    out: List[Tuple[str, str]] = []
    toks = shlex.split(text or "")
    i = 0
    while i < len(toks):
        t = toks[i]
        if not t.startswith("--"):
            raise ValueError("%s: expected an option, got %r" % (what, t))
        if "=" in t:
            k, v = t[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(toks):
                raise ValueError("%s: option %s has no value" % (what, t))
            k, v = t[2:], toks[i + 1]
            i += 2
        out.append((k, v))
    return out


def parse_egs_opts(egs_opts: Optional[str]) -> Dict[str, str]:
    """``--egs.opts`` (get_egs.sh options, e.g. ``--frames-overlap-per-eg 0 --online-cmvn
    true --num-utts-subset 60``) as ``{"frames_overlap_per_eg": "0", ...}``."""
    return {k.replace("-", "_"): v for k, v in _option_pairs(egs_opts, "--egs.opts")}


# ----------------------------------------------------------------------------- schedule
def _parse_dropout_function(text: str) -> List[Tuple[float, float]]:
    parts = text.strip().split(",")
    if len(parts) < 2:
        raise ValueError("a dropout schedule needs at least the start and end proportions")
    vals = [(0.0, float(parts[0]))]
    for part in parts[1:-1]:
        if "@" in part:
            v, x = part.split("@", 1)
            vals.append((float(x), float(v)))
        else:
            vals.append((0.5, float(part)))
        if not vals[-2][0] <= vals[-1][0] <= 1.0:
            raise ValueError("data fractions must increase and be <= 1 (%r)" % part)
    vals.append((1.0, float(parts[-1])))
    for _, v in vals:
        if not 0.0 <= v <= 1.0:
            raise ValueError("dropout proportion %g is not in [0, 1]" % v)
    return vals


def dropout_proportions(schedule: str, data_fraction: float) -> List[Tuple[str, float]]:
    """Kaldi's ``--trainer.dropout-schedule`` at ``data_fraction`` (archives processed /
    to process): ``[(component-name pattern, proportion)]``; piecewise linear between the
    points, e.g. ``"0,0@0.20,0.5@0.50,0"`` or ``"*=0,0.5,0 lstm*=0,0.3@0.75,0"``."""
    out = []
    for item in schedule.strip().split():
        name, _, fn = item.rpartition("=")
        pts = _parse_dropout_function(fn)
        x = float(data_fraction)
        val = pts[-1][1]
        for (x0, v0), (x1, v1) in zip(pts, pts[1:]):
            if x0 <= x < x1:
                val = v0 + (x - x0) * (v1 - v0) / (x1 - x0)
                break
            if x0 == x1 == x:
                val = v0
                break
        out.append((name or "*", val))
    return out


@dataclass
class KaldiSchedule:
    """The iteration schedule of Kaldi's chain train.py.

    Args:
      num_archives: N (egs dir ``info/num_archives``).
      frame_subsampling_factor: f.
      num_epochs: ``--trainer.num-epochs``.
      num_jobs_initial, num_jobs_final, num_jobs_step: Kaldi's options.
      initial_effective_lrate, final_effective_lrate: Kaldi's options.
      num_workers: W; None: Kaldi's own numbers of jobs (growing from initial to final);
        an int: W jobs in every iteration (pkwrap's rule, module docstring).
    """

    num_archives: int
    frame_subsampling_factor: int
    num_epochs: float
    num_jobs_initial: int
    num_jobs_final: int
    initial_effective_lrate: float
    final_effective_lrate: float
    num_jobs_step: int = 1
    num_workers: Optional[int] = None
    max_models_combine: int = 20

    @property
    def num_archives_expanded(self) -> int:
        return self.num_archives * self.frame_subsampling_factor

    @property
    def num_archives_to_process(self) -> int:
        return int(self.num_epochs * self.num_archives_expanded)

    @property
    def num_iters(self) -> int:
        if self.num_workers is not None:
            return self.num_archives_to_process // self.num_workers
        return (self.num_archives_to_process * 2) // (self.num_jobs_initial +
                                                       self.num_jobs_final)

    def num_jobs(self, it: int) -> int:
        if self.num_workers is not None:
            return self.num_workers
        from pkwrap.optim import kaldi_num_jobs
        return kaldi_num_jobs(it, self.num_iters, self.num_jobs_initial,
                              self.num_jobs_final, self.num_jobs_step)

    def num_archives_processed(self, it: int) -> int:
        if self.num_workers is not None:
            return it * self.num_workers
        return sum(self.num_jobs(i) for i in range(it))

    def learning_rate(self, it: int) -> float:
        """Per-job learning rate of iteration ``it`` (Kaldi's get_learning_rate)."""
        from pkwrap.optim import kaldi_learning_rate
        return kaldi_learning_rate(it, self.num_jobs(it), self.num_iters,
                                   self.num_archives_processed(it),
                                   self.num_archives_to_process,
                                   self.initial_effective_lrate, self.final_effective_lrate)

    def data_fraction(self, it: int) -> float:
        return self.num_archives_processed(it) / float(self.num_archives_to_process)

    def iteration_line(self, it: int, shrink: float = 1.0) -> str:
        """train.py's progress line for iteration ``it``."""
        done = self.num_archives_processed(it)
        return ("Iter: {0}/{1}   Jobs: {2}   Epoch: {3:0.2f}/{4:0.1f} ({5:0.1f}% complete)   "
                "lr: {6:0.6f}   {7}".format(
                    it, self.num_iters - 1, self.num_jobs(it),
                    done * self.num_epochs / self.num_archives_to_process, self.num_epochs,
                    done * 100.0 / self.num_archives_to_process, self.learning_rate(it),
                    "shrink: {0:0.5f}".format(shrink) if shrink != 1.0 else ""))

    def models_to_combine(self) -> Set[int]:
        """Kaldi's get_model_combine_iters, plus num_iters (the last model)."""
        n = self.num_iters
        approx = float(self.num_archives_expanded) / self.num_jobs_final
        initial = min(int(approx / 2) + 1, int(n / 2))
        if initial > self.max_models_combine:
            sub = int(float(initial) / self.max_models_combine)
            out = set(range(n - initial + 1, n + 1, sub))
        else:
            k = min(self.max_models_combine, n // 2)
            out = set(range(n - k + 1, n + 1))
        out.add(n)
        return out


# ----------------------------------------------------------------------------- Kaldi logs
_PROB_LOG_PREFIX = ("LOG (nnet3-chain-compute-prob[pkwrap]:PrintTotalStats():"
                    "nnet-chain-diagnostics.cc:239) ")


def write_compute_prob_log(path: str, lines: Sequence[str], header: str) -> None:
    """A ``compute_prob_*.log`` as Kaldi's (its lines parse with Kaldi's log_parse.py)."""
    from pkwrap.kaldi.io import atomic_output
    text = "# %s\n# Started at %s\n#\n" % (header, time.strftime("%c"))
    text += "".join(_PROB_LOG_PREFIX + l + "\n" for l in lines)
    text += "# Ended (code 0) at %s\n" % time.strftime("%c")
    with atomic_output(path, "w") as f:
        f.write(text)


def _parse_prob_log(path: str, output: str = "output") -> Optional[float]:
    import re
    pat = re.compile(r"Overall log-probability for '%s' is ([-0-9.e+naif]+)"
                     % re.escape(output))
    val = None
    try:
        with open(path) as f:
            for line in f:
                m = pat.search(line)
                if m:
                    val = float(m.group(1))
    except OSError:
        return None
    return val


def accuracy_report(exp_dir: str) -> str:
    """Kaldi's ``accuracy.report`` (generate_acc_logprob_report "log-probability") from
    ``log/compute_prob_{train,valid}.N.log`` and the durations in ``log/train.N.*.log``."""
    import re
    times: Dict[int, float] = {}
    for p in glob.glob(os.path.join(exp_dir, "log", "train.*.*.log")):
        m = re.match(r"train\.(\d+)\.(\d+)\.log$", os.path.basename(p))
        if not m:
            continue
        with open(p) as f:
            for line in f:
                t = re.match(r"# Accounting: time=([0-9.]+)", line)
                if t:
                    it = int(m.group(1))
                    times[it] = max(times.get(it, 0.0), float(t.group(1)))
    rows = ["%Iter\tduration\ttrain_objective\tvalid_objective\tdifference"]
    its = sorted(int(m) for m in (re.match(r"compute_prob_valid\.(\d+)\.log$", os.path.basename(p))
                                  for p in glob.glob(os.path.join(exp_dir, "log",
                                                                  "compute_prob_valid.*.log")))
                 if m for m in [m.group(1)])
    for it in its:
        tr = _parse_prob_log(os.path.join(exp_dir, "log", "compute_prob_train.%d.log" % it))
        va = _parse_prob_log(os.path.join(exp_dir, "log", "compute_prob_valid.%d.log" % it))
        if tr is None or va is None or it not in times:
            continue
        rows.append("%d\t%s\t%g\t%g\t%g" % (it, str(times[it]), tr, va, va - tr))
    rows.append("Total training time is %s\n" % datetime.timedelta(seconds=sum(times.values())))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- preparation
def _copy(src: str, dst: str) -> None:
    from pkwrap.kaldi.io import atomic_output
    with open(src, "rb") as f, atomic_output(dst) as g:
        shutil.copyfileobj(f, g)


def _read_lm_opts(lm_opts: Optional[str]) -> Dict[str, int]:
    known = {"ngram-order": "ngram_order", "no-prune-ngram-order": "no_prune_ngram_order",
             "num-extra-lm-states": "num_extra_lm_states"}
    out = {}
    for k, v in _option_pairs(lm_opts, "--chain.lm-opts"):
        if k not in known:
            raise ValueError("--chain.lm-opts: chain-est-phone-lm has no option --%s "
                             "(known: %s)" % (k, ", ".join("--" + x for x in known)))
        out[known[k]] = int(v)
    return out


def _alignment_phone_seqs(tree_dir: str, trans_model):
    """``gunzip -c ali.*.gz | ali-to-phones final.mdl ark:- ark:-``: (key, phones)."""
    from pkwrap.chain.supervision import INT_VECTOR_HOLDER
    from pkwrap.kaldi.io import read_number_file
    from pkwrap.kaldi.table import read_archive_file
    n = None
    nj_path = os.path.join(tree_dir, "num_jobs")
    if os.path.isfile(nj_path):
        n = read_number_file(nj_path, int, minimum=1)
        files = [os.path.join(tree_dir, "ali.%d.gz" % j) for j in range(1, n + 1)]
    else:
        files = sorted(glob.glob(os.path.join(tree_dir, "ali.*.gz")))
    if not files:
        raise FileNotFoundError("%s: no alignments (ali.*.gz) for the phone LM" % tree_dir)
    for p in files:
        if not os.path.isfile(p):
            raise FileNotFoundError("%s: missing (num_jobs says %s)" % (p, n))
        for key, ali in read_archive_file(p, INT_VECTOR_HOLDER):
            yield key, ali_to_phones(trans_model, [int(t) for t in ali], "%s: %s" % (p, key))


def ali_to_phones(tm, ali: Sequence[int], what: str = "alignment") -> List[int]:
    """Kaldi's ``ali-to-phones``: the phone sequence of a transition-id alignment.

    A phone ends with the transition into its final state, followed (alignments
    reordered, convert-ali's default) by self-loops of that transition-state."""
    out = []
    i, n = 0, len(ali)
    while i < n:
        j = i
        while j < n and not tm.is_final(ali[j]):
            j += 1
        if j == n:
            raise ValueError("%s: the last phone (%d) does not reach its final state"
                             % (what, tm.transition_id_to_phone(ali[i])))
        ts = tm.transition_id_to_transition_state(ali[j])
        j += 1
        while j < n and tm.is_self_loop(ali[j]) and \
                tm.transition_id_to_transition_state(ali[j]) == ts:
            j += 1
        out.append(tm.transition_id_to_phone(ali[i]))
        i = j
    return out


def make_phone_lm(args, dir_: str, tm) -> None:
    from pkwrap.chain.phone_lm import estimate_phone_lm
    from pkwrap.kaldi.fst import write_fst_binary
    from pkwrap.kaldi.io import atomic_output
    opts = _read_lm_opts(args.lm_opts)
    seqs = list(_alignment_phone_seqs(args.tree_dir, tm))
    lm = estimate_phone_lm(seqs, phones=tm.phones, **opts)
    with atomic_output(os.path.join(dir_, "phone_lm.fst")) as f:
        write_fst_binary(lm, f)
    _log_file(dir_, "make_phone_lm.log",
              "phone LM from %d alignments of %s (%s): %d states, %d arcs"
              % (len(seqs), args.tree_dir, args.lm_opts or "defaults", lm.num_states,
                 lm.num_arcs))


def _log_file(dir_: str, name: str, text: str) -> None:
    from pkwrap.kaldi.io import atomic_output
    os.makedirs(os.path.join(dir_, "log"), exist_ok=True)
    with atomic_output(os.path.join(dir_, "log", name), "w") as f:
        f.write("# %s (%s)\n%s\n" % (name, PROG, text))
    log.info("%s", text)


def make_den_fst(dir_: str) -> None:
    from pkwrap.chain.den_fst import make_den_fst as _make
    from pkwrap.kaldi.fst import read_fst, write_fst_binary
    from pkwrap.kaldi.hmm import read_transition_model, read_tree
    from pkwrap.kaldi.io import atomic_outputs
    tree = read_tree(os.path.join(dir_, "tree"))
    tm = read_transition_model(os.path.join(dir_, "0.trans_mdl"))
    lm = read_fst(os.path.join(dir_, "phone_lm.fst"))
    den, norm = _make(tree, tm, lm)
    with atomic_outputs(os.path.join(dir_, "den.fst"),
                        os.path.join(dir_, "normalization.fst")) as (f_den, f_norm):
        write_fst_binary(den, f_den)
        write_fst_binary(norm, f_norm)
    _log_file(dir_, "make_den_fst.log", "den.fst %d states, %d arcs; normalization.fst "
              "%d states, %d arcs" % (den.num_states, den.num_arcs, norm.num_states,
                                      norm.num_arcs))


# get_egs.sh options (--egs.opts) -> make_chain_egs_dir keyword and type
_EGS_OPTS = {"frames_overlap_per_eg": int, "online_cmvn": _bool, "num_utts_subset": int,
             "num_train_egs_combine": int, "num_valid_egs_combine": int,
             "num_egs_diagnostic": int, "compress": _bool}
# get_egs.sh options that only schedule Kaldi's jobs
_EGS_OPTS_IGNORED = ("max_shuffle_jobs_run", "max_jobs_run", "cmd", "nj")


def egs_keywords(args) -> Tuple[Dict[str, object], List[str]]:
    """``--egs.opts`` as :func:`pkwrap.chain.get_egs.make_chain_egs_dir` keywords, and
    notes on the options ignored. Raises ValueError naming an unsupported option."""
    kw: Dict[str, object] = {}
    notes = []
    for k, v in parse_egs_opts(args.egs_opts).items():
        if k in _EGS_OPTS:
            try:
                kw[k] = _EGS_OPTS[k](v)
            except (ValueError, argparse.ArgumentTypeError):
                raise ValueError("--egs.opts: --%s %s: bad value" % (k.replace("_", "-"), v))
        elif k in _EGS_OPTS_IGNORED:
            notes.append("--egs.opts --%s ignored (Kaldi job scheduling)" % k.replace("_", "-"))
        else:
            raise ValueError("--egs.opts: get_egs.sh option --%s is not supported by "
                             "pkwrap-chain-train" % k.replace("_", "-"))
    return kw, notes


def make_egs(args, dir_: str, egs_dir: str, model) -> None:
    """train.py stage -3: get_egs.sh, here :func:`pkwrap.chain.get_egs.make_chain_egs_dir`."""
    try:
        from pkwrap.chain.get_egs import make_chain_egs_dir
    except ImportError:
        raise RuntimeError(
            "--egs.dir is empty, so the egs must be made from --lat-dir and --feat-dir, "
            "but making egs (pkwrap.chain.get_egs.make_chain_egs_dir, Kaldi's get_egs.sh) "
            "is not available in this pkwrap; make them with Kaldi's "
            "steps/nnet3/chain/get_egs.sh and pass --egs.dir") from None
    f = args.frame_subsampling_factor
    kw, notes = egs_keywords(args)
    for n in notes:
        log.info("note: %s", n)
    if args.egs_nj > 0:
        procs = args.egs_nj
    else:
        from pkwrap.kaldi.io import read_number_file
        try:
            procs = read_number_file(os.path.join(args.lat_dir, "num_jobs"), int, minimum=1)
        except (OSError, ValueError):
            procs = 1
        procs = max(1, min(procs, os.cpu_count() or 1))
    # train.py: egs context = model context + chunk context + frame_subsampling_factor // 2
    lc = model.left_context + args.chunk_left_context + f // 2
    rc = model.right_context + args.chunk_right_context + f // 2
    make_chain_egs_dir(
        egs_dir, args.feat_dir, args.lat_dir, dir_,
        left_context=lc, right_context=rc,
        left_context_initial=(model.left_context + args.chunk_left_context_initial + f // 2
                              if args.chunk_left_context_initial >= 0 else -1),
        right_context_final=(model.right_context + args.chunk_right_context_final + f // 2
                             if args.chunk_right_context_final >= 0 else -1),
        online_ivector_dir=args.online_ivector_dir, cmvn_opts=args.cmvn_opts or "",
        frame_subsampling_factor=f,
        alignment_subsampling_factor=args.alignment_subsampling_factor,
        frames_per_eg=args.chunk_width, frames_per_iter=args.frames_per_iter,
        srand=args.srand, left_tolerance=args.left_tolerance,
        right_tolerance=args.right_tolerance, num_processes=procs,
        progress=lambda m: log.info("get_egs: %s", m), **kw)


def copy_egs_properties(egs_dir: str, dir_: str) -> None:
    """train.py's copy_egs_properties_to_exp_dir."""
    from pkwrap.kaldi.cmvn import read_global_cmvn_stats
    for name in ("cmvn_opts", "splice_opts", "info/final.ie.id", "final.mat",
                 "global_cmvn.stats", "online_cmvn"):
        src = os.path.join(egs_dir, name)
        if os.path.isfile(src):
            if name == "global_cmvn.stats":  # decoding reads it: copy only a good one
                read_global_cmvn_stats(src)
            _copy(src, os.path.join(dir_, os.path.basename(name)))


def _egs_info(egs_dir: str, name: str) -> Optional[int]:
    """An egs dir's ``info/<name>`` (a number; errors name the file), None if absent."""
    from pkwrap.kaldi.io import read_number_file
    p = os.path.join(egs_dir, "info", name)
    return read_number_file(p, int, minimum=0) if os.path.isfile(p) else None


def _num_archives(egs_dir: str) -> int:
    """The egs dir's ``info/num_archives``, or, without it, the ``cegs.N.ark`` counted as
    the reader does."""
    n = _egs_info(egs_dir, "num_archives")
    if n is None:
        from .stream import KaldiEgsDir
        n = KaldiEgsDir(egs_dir).num_archives
    return n


def verify_egs_dir(egs_dir: str, model, frame_subsampling_factor: int,
                   ivector_dir: Optional[str]) -> None:
    """train.py's verify_egs_dir: the egs fit the network (named errors)."""
    from pkwrap.kaldi.io import read_text
    feat_dim = _egs_info(egs_dir, "feat_dim")
    if feat_dim is not None and feat_dim != model.input_dim("input"):
        raise ValueError("%s/info/feat_dim is %s, the network's input dim %d"
                         % (egs_dir, feat_dim, model.input_dim("input")))
    iv = _egs_info(egs_dir, "ivector_dim")
    want = model.input_dim("ivector") if "ivector" in model.input_names else 0
    if iv is not None and iv != want:
        raise ValueError("%s/info/ivector_dim is %s, the network reads %s" % (
            egs_dir, iv, "an i-vector of dim %d" % want if want else "no i-vector"))
    if ivector_dir is not None:
        a = os.path.join(ivector_dir, "final.ie.id")
        b = os.path.join(egs_dir, "info", "final.ie.id")
        if os.path.isfile(a) and os.path.isfile(b) and \
                read_text(a).strip() != read_text(b).strip():
            raise ValueError("the i-vector extractor of %s (final.ie.id) is not the one the "
                             "egs in %s were made with" % (ivector_dir, egs_dir))
    for side, need in (("left_context", model.left_context),
                       ("right_context", model.right_context)):
        v = _egs_info(egs_dir, side)
        if v is not None and v < need:
            raise ValueError("%s/info/%s is %s but the network needs %d frames"
                             % (egs_dir, side, v, need))
    fpe = os.path.join(egs_dir, "info", "frames_per_eg")
    if os.path.isfile(fpe):  # train.py: validate_chunk_width
        from pkwrap.cli import FileError
        v = read_text(fpe).strip()
        if not v or not all(x.isdigit() and int(x) > 0 for x in v.split(",")):
            raise FileError(fpe, "expected chunk widths such as 140,100,160, got %r" % v[:40])
    n = _egs_info(egs_dir, "num_pdfs")
    if n is not None and n != model.output_dim("output"):
        raise ValueError("%s/info/num_pdfs is %s, the network's output dim %d"
                         % (egs_dir, n, model.output_dim("output")))


def init_model(args, dir_: str, existing: Optional[str] = None):
    """train.py stage -1: the network of ``configs/final.config`` (``nnet3-init [init.raw]
    final.config``), or ``--trainer.input-model`` as it is, and ``0.mdl`` (nnet3-am-init
    with ``0.trans_mdl``)."""
    from pkwrap.nn.kaldi_import import save_kaldi_nnet3
    from pkwrap.nnet3 import nnet3_from_config, read_nnet3
    if args.input_model is not None:  # transfer learning: the given network, as it is
        cfg = args.input_model
        model = read_nnet3(cfg)
    else:
        cfg = os.path.join(dir_, "configs", "final.config")
        if not os.path.isfile(cfg):
            raise FileNotFoundError("%s: missing (make it with "
                                    "steps/nnet3/xconfig_to_configs.py)" % cfg)
        model = nnet3_from_config(cfg, srand=args.srand,
                                  existing=read_nnet3(existing) if existing else None)
    model.priors = __import__("numpy").zeros(0, dtype="float32")
    from pkwrap.kaldi.hmm import read_transition_model
    tm = read_transition_model(os.path.join(dir_, "0.trans_mdl"))
    save_kaldi_nnet3(model, os.path.join(dir_, "0.mdl"), trans_model=tm)
    _log_file(dir_, "init_mdl.log", "network from %s: %d parameters, context %d/%d"
              % (cfg, sum(p.numel() for p in model.parameters()), model.left_context,
                 model.right_context))
    return model


class _ConfigContext:
    """The model context of ``configs/vars`` (``model_left_context=N``, what
    xconfig_to_configs.py writes), for making egs before the network can be built."""

    def __init__(self, path: str):
        vals = {}
        try:
            with open(path) as f:
                for i, line in enumerate(f):
                    line = line.strip()
                    if not line:
                        continue
                    k, sep, v = line.partition("=")
                    if not sep:
                        raise ValueError("%s line %d: expected name=value, got %r"
                                         % (path, i + 1, line))
                    vals[k.strip()] = v.strip()
        except FileNotFoundError:
            raise FileNotFoundError(
                "%s: missing (xconfig_to_configs.py writes it): with configs/init.config the "
                "egs are made before the network exists, from the model context given there"
                % path) from None
        try:
            self.left_context = int(vals["model_left_context"])
            self.right_context = int(vals["model_right_context"])
        except KeyError as e:
            raise ValueError("%s: no %s= line" % (path, e.args[0])) from None
        except ValueError as e:
            raise ValueError("%s: %s" % (path, e)) from None


def prepare_preconditioning(args, dir_: str, egs_dir: str, need_egs: bool) -> Optional[str]:
    """train.py stages -4, -3 and -2 for a network with ``configs/init.config``
    (``init.raw``, the egs, ``lda.mat``); returns the ``init.raw`` path, or None (and
    does nothing) without ``init.config``."""
    init_cfg = os.path.join(dir_, "configs", "init.config")
    if not os.path.isfile(init_cfg):
        return None
    from pkwrap.nnet3 import nnet3_from_config, write_nnet3
    raw = os.path.join(dir_, "init.raw")
    if args.stage <= -4 or not os.path.isfile(raw):
        log.info("Initializing a basic network for estimating preconditioning matrix")
        nnet = nnet3_from_config(init_cfg, srand=-2)
        write_nnet3(nnet, raw)
        _log_file(dir_, "nnet_init.log", "nnet3-init --srand=-2 %s %s: inputs %s, output "
                  "dim %d" % (init_cfg, raw, ", ".join(nnet.input_names),
                              nnet.output_dim("output")))
    if need_egs:
        log.info("Generating egs")
        make_egs(args, dir_, egs_dir, _ConfigContext(os.path.join(dir_, "configs", "vars")))
    lda_mat = os.path.join(dir_, "lda.mat")
    if args.stage <= -2 or not os.path.isfile(lda_mat) or \
            not os.path.exists(os.path.join(dir_, "configs", "lda.mat")):
        from pkwrap.chain.lda import compute_preconditioning_matrix
        log.info("Computing the preconditioning matrix for input features")
        num_archives = _num_archives(egs_dir)
        t0 = time.time()
        compute_preconditioning_matrix(dir_, egs_dir, num_archives,  # reads init.raw
                                       max_lda_jobs=args.max_lda_jobs,
                                       rand_prune_threshold=args.rand_prune)
        log.info("lda.mat from %d of %d archives in %.1f s (see %s/log/get_transform.log)",
                 min(num_archives, args.max_lda_jobs), num_archives, time.time() - t0,
                 dir_)
    return raw


def prepare(args, egs_dir: str) -> None:
    """Stages -6 .. -1 (those not done yet)."""
    from pkwrap.kaldi.hmm import read_transition_model, write_transition_model
    from pkwrap.kaldi.io import atomic_output
    d = args.dir
    os.makedirs(os.path.join(d, "log"), exist_ok=True)
    from pkwrap.kaldi.hmm import read_tree
    from pkwrap.kaldi.symbol_table import SymbolTable
    for name, check in (("tree", read_tree), ("phones.txt", SymbolTable.read)):
        src = os.path.join(args.tree_dir, name)
        if not os.path.isfile(src):
            raise FileNotFoundError("%s: missing (a chain tree dir from build_tree.sh)" % src)
        check(src)  # what is copied must be readable (errors name the tree dir's file)
        _copy(src, os.path.join(d, name))
    tm = read_transition_model(os.path.join(args.tree_dir, "final.mdl"))
    if args.stage <= -6 or not os.path.isfile(os.path.join(d, "phone_lm.fst")):
        log.info("Creating phone language-model")
        make_phone_lm(args, d, tm)
    if args.stage <= -5 or not os.path.isfile(os.path.join(d, "den.fst")):
        log.info("Creating denominator FST")
        with atomic_output(os.path.join(d, "0.trans_mdl")) as f:
            write_transition_model(tm, f, binary=False)  # as train.py (text)
        make_den_fst(d)
    from pkwrap.nnet3 import read_nnet3
    need_egs = args.egs_dir is None and (args.stage <= -3 or not os.path.isfile(
        os.path.join(egs_dir, "info", "num_archives")))
    if args.input_model is not None:
        # train.py: no init.config / LDA stages; the context comes from the input model
        if not os.path.isfile(args.input_model):
            raise FileNotFoundError("--trainer.input-model %s: no such file"
                                    % args.input_model)
        raw = None
    else:
        raw = prepare_preconditioning(args, d, egs_dir, need_egs)
    if args.stage <= -1 or not os.path.isfile(os.path.join(d, "0.mdl")):
        log.info("Preparing the initial acoustic model.")
        model = init_model(args, d, existing=raw)
    else:
        model = read_nnet3(os.path.join(d, "0.mdl"))
    if need_egs and raw is None:
        log.info("Generating egs")
        make_egs(args, d, egs_dir, model)
    verify_egs_dir(egs_dir, model, args.frame_subsampling_factor, args.online_ivector_dir)
    log.info("Copying the properties from %s to %s", egs_dir, d)
    copy_egs_properties(egs_dir, d)
    with atomic_output(os.path.join(d, "frame_subsampling_factor"), "w") as f:
        f.write(str(args.frame_subsampling_factor))


# ----------------------------------------------------------------------------- training
class _IterationHook:
    """Trainer.before_step: Kaldi's per-iteration work (module docstring)."""

    def __init__(self, args, sched: KaldiSchedule, model, trans_model, ctx, loss,
                 diag: Dict[str, list], num_workers: int):
        self.args, self.sched, self.model = args, sched, model
        self.tm, self.ctx, self.loss, self.diag = trans_model, ctx, loss, diag
        self.num_workers = num_workers
        self.cur: Optional[int] = None
        self.t_start = time.time()
        self.minibatches = 0
        self.combine = sched.models_to_combine()
        self.exited = False

    def model_path(self, it) -> str:
        return os.path.join(self.args.dir, "%s.mdl" % it)

    def __call__(self, trainer, batch):
        it = int(trainer.data.iteration)
        if it == self.cur:
            self.minibatches += 1
            return True
        self.end_iteration(trainer)
        stop = self.args.exit_stage
        if it >= self.sched.num_iters or (stop is not None and it >= stop):
            # not trained on: a later run starts this iteration from its beginning
            if hasattr(trainer.data, "restart_iteration"):
                trainer.data.restart_iteration()
            self.cur = None
            self.exited = stop is not None and it >= stop and it < self.sched.num_iters
            return False
        self.start_iteration(trainer, it)
        self.minibatches = 1
        return True

    def end_iteration(self, trainer) -> None:
        if self.cur is None or not trainer.dist.is_main:
            return
        secs = time.time() - self.t_start
        k, a, s = trainer.data.pass_of(self.cur, 0)
        from pkwrap.kaldi.io import atomic_output
        path = os.path.join(self.args.dir, "log", "train.%d.1.log" % self.cur)
        with atomic_output(path, "w") as f:
            f.write("# %s iteration %d: %d worker(s); rank 0 read archive %d with frame "
                    "shift %d (pass %d), %d minibatches, lr %g\n"
                    % (PROG, self.cur, self.num_workers, a, s, k, self.minibatches,
                       self.sched.learning_rate(self.cur)))
            f.write("# Accounting: time=%s threads=%d\n"
                    % (round(secs, 1), __import__("torch").get_num_threads()))

    def start_iteration(self, trainer, it: int) -> None:
        import torch
        from . import checkpoint as ckpt
        args, sched = self.args, self.sched
        self.cur = it
        self.t_start = time.time()
        opt = trainer.optimizer
        lr = sched.learning_rate(it)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.max_param_change = args.max_param_change / (math.sqrt(2) if it == 0 else 1.0)
        bs = args.backstitch_training_scale
        opt.backstitch_training_scale = bs * it / 15 if it < 15 else bs
        if args.dropout_schedule is not None:
            for pat, prop in dropout_proportions(args.dropout_schedule, sched.data_fraction(it)):
                self.model.apply_edits("set-dropout-proportion name=%s proportion=%r"
                                       % (pat, prop))
        # the iteration's first minibatch (else: resumed inside it, its start was done)
        fresh = getattr(getattr(trainer.data, "_pass", None), "num_minibatches", 1) <= 1
        if trainer.dist.is_main:
            shrink = 1.0 - args.proportional_shrink * lr
            log.info("%s", sched.iteration_line(it, shrink))
        if not fresh:
            return  # resumed inside this iteration: its start was done
        if args.proportional_shrink > 0:
            v = 1.0 - args.proportional_shrink * lr
            if v <= 0.5:
                raise ValueError("proportional-shrink=%g is too large, it gives shrink-value"
                                 "=%g" % (args.proportional_shrink, v))
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(v)
        trainer.sync_buffers()
        rng = ckpt.get_rng_state()
        try:
            self.compute_probs(trainer, it)
        finally:
            ckpt.set_rng_state(rng)
        if trainer.dist.is_main:
            from pkwrap.nn.kaldi_import import save_kaldi_nnet3
            save_kaldi_nnet3(self.model, self.model_path(it), trans_model=self.tm)
            old = it - 2
            if args.cleanup and old > 0 and old not in self.combine and \
                    old % args.preserve_model_interval != 0:
                try:
                    os.remove(self.model_path(old))
                except OSError:
                    pass

    def compute_probs(self, trainer, it) -> None:
        from .diagnostics import compute_prob, compute_prob_log_lines, is_batchnorm
        # before any training, batchnorm has no statistics: Kaldi then invents random
        # ones ("Creating random counts"); here that diagnostic uses minibatch statistics
        no_stats = any(is_batchnorm(m) and float(getattr(m, "count", 1.0)) == 0.0
                       for m in self.model.modules())
        for name in ("train", "valid"):
            batches = self.diag.get(name)
            if not batches:
                continue
            tr = compute_prob(self.model, self.ctx, self.loss, batches, device=trainer.device,
                              batchnorm_test_mode=not no_stats)
            if trainer.dist.is_main:
                write_compute_prob_log(
                    os.path.join(self.args.dir, "log", "compute_prob_%s.%s.log" % (name, it)),
                    compute_prob_log_lines(tr),
                    "%s: nnet3-chain-compute-prob %s/%s.mdl on %s egs" % (
                        PROG, self.args.dir, it, name))
                if trainer.tb is not None and isinstance(it, int):
                    trainer.tb.add_scalar("compute_prob/%s" % name, tr.per_frame("objf"),
                                          trainer.step)


def _diag_batches(path: str, ctx, rule: str, rank: int, world: int,
                  egs_left_context: Optional[int]) -> list:
    from .data import ChainMinibatchSampler, EgsDataset, make_loader
    if not os.path.isfile(path):
        return []
    data = EgsDataset.from_kaldi("ark:" + path)
    s = ChainMinibatchSampler(data.structures, rule, ctx.frame_subsampling_factor,
                              shuffle=False, rank=0, world_size=1, frame_shift=False)
    return [b for i, b in enumerate(make_loader(data, s, egs_left_context=egs_left_context))
            if i % world == rank]


def train(args, egs_dir: str, notes: Sequence[str]) -> None:
    """Stages 0..num_iters (every rank)."""
    import numpy as np
    import torch
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.kaldi.hmm import read_transition_model
    from pkwrap.nn.kaldi_import import save_kaldi_nnet3
    from pkwrap.nnet3 import read_nnet3
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from . import checkpoint as ckpt
    from .context import ModelContext
    from .data import halve_minibatch_size
    from .diagnostics import combine_models, compute_prob_log_lines
    from .dist import barrier, setup_distributed
    from .loop import TrainConfig, Trainer
    from .stream import StreamingEgs

    d = args.dir
    info = setup_distributed()
    W = info.world_size
    model = read_nnet3(os.path.join(d, "0.mdl"))
    tm = model.trans_model
    model.priors = np.zeros(0, dtype=np.float32)
    model.frame_subsampling_factor = args.frame_subsampling_factor
    model.to(info.device)
    num_pdfs = model.output_dim("output")
    ctx = ModelContext(model.left_context, model.right_context, args.frame_subsampling_factor,
                       False, "output-xent" in model.output_names, num_pdfs,
                       model.input_dim("ivector") if "ivector" in model.input_names else 0)
    num_archives = _num_archives(egs_dir)
    sched = KaldiSchedule(num_archives, args.frame_subsampling_factor, args.num_epochs,
                          args.num_jobs_initial, args.num_jobs_final,
                          args.initial_effective_lrate, args.final_effective_lrate,
                          args.num_jobs_step, num_workers=W,
                          max_models_combine=args.max_models_combine)
    if W > sched.num_archives_expanded:
        raise ValueError("%s: %d workers but only %d archive passes per epoch (%d archives "
                         "x frame subsampling %d)" % (egs_dir, W, sched.num_archives_expanded,
                                                      num_archives,
                                                      args.frame_subsampling_factor))
    if sched.num_iters < 1:
        raise ValueError("%g epochs of %d archive passes with %d workers is no iteration"
                         % (args.num_epochs, sched.num_archives_expanded, W))
    if info.is_main:
        from pkwrap.kaldi.io import atomic_output
        for name, val in (("num_iters", sched.num_iters), ("srand", args.srand)):
            with atomic_output(os.path.join(d, name), "w") as f:
                f.write("%d\n" % val)
    den = DenominatorGraph.from_fst(os.path.join(d, "den.fst"), num_pdfs)
    loss = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=args.leaky_hmm_coefficient,
                                       l2_regularize=args.l2_regularize,
                                       xent_regularize=args.xent_regularize))
    opt = NGSGD(kaldi_param_groups(model), lr=sched.learning_rate(0),
                momentum=args.momentum, max_param_change=args.max_param_change,
                l2_regularize_factor=1.0 / W,
                backstitch_training_scale=0.0,
                backstitch_training_interval=args.backstitch_training_interval)
    data = StreamingEgs(egs_dir, args.num_chunk_per_minibatch, args.frame_subsampling_factor,
                        args.shuffle_buffer_size, seed=args.srand,
                        first_iteration_minibatch_size=halve_minibatch_size(
                            args.num_chunk_per_minibatch))
    iters_per_epoch = sched.num_archives_expanded / float(W)
    cfg = TrainConfig(exp_dir=d, num_epochs=int(math.ceil(sched.num_iters / iters_per_epoch
                                                          - 1e-9)),
                      minibatch_size=args.num_chunk_per_minibatch, seed=args.srand,
                      apply_deriv_weights=args.apply_deriv_weights,
                      checkpoint_every=args.checkpoint_every, keep_last=2,
                      progress_bar=False, combine_last=0)
    elc = data.egs_left_context
    diag = {"train": _diag_batches(os.path.join(egs_dir, "train_diagnostic.cegs"), ctx,
                                   "1:64", info.rank, W, elc),
            "valid": _diag_batches(os.path.join(egs_dir, "valid_diagnostic.cegs"), ctx,
                                   "1:64", info.rank, W, elc)}
    hook = _IterationHook(args, sched, model, tm, ctx, loss, diag, W)
    trainer = Trainer(model, loss, opt, data, cfg, dist_info=info, model_context=ctx,
                      before_step=hook)
    for n in notes:
        if info.is_main:
            log.info("note: %s", n)
    if info.is_main:
        log.info("Training will run for %g epochs = %d iterations (%d worker(s))",
                 args.num_epochs, sched.num_iters, W)
    trainer.train()
    hook.end_iteration(trainer)
    if hook.exited:
        if info.is_main:
            log.info("Exiting early due to --exit-stage %d", args.exit_stage)
        barrier()
        return
    n = sched.num_iters
    # the last model, as Kaldi's num_iters.mdl
    if info.is_main:
        save_kaldi_nnet3(model, hook.model_path(n), trans_model=tm)
    barrier()
    final_path = os.path.join(d, "final.mdl")
    if args.do_final_combination:
        if info.is_main:
            log.info("Doing final combination to produce final.mdl")
        comb_batches = _diag_batches(os.path.join(egs_dir, "combine.cegs"), ctx,
                                     args.num_chunk_per_minibatch, info.rank, W, elc)
        its = [i for i in sorted(hook.combine) if os.path.isfile(hook.model_path(i))]
        sds = []
        for i in its:
            m = read_nnet3(hook.model_path(i))
            sds.append(m.state_dict())
        clog = logging.getLogger("pkwrap.train.combine")
        lines: List[str] = []

        class _Keep(logging.Handler):
            def emit(self, rec):
                lines.append(rec.getMessage())
        h = _Keep()
        clog.addHandler(h)
        try:
            if comb_batches and len(sds) > 1:
                rng = ckpt.get_rng_state()
                combine_models(model, sds, ctx, loss, comb_batches,
                               args.max_objective_evaluations, logger=clog)
                ckpt.set_rng_state(rng)
                trainer.sync_buffers()
            else:
                lines.append("no combination (%d models, %d combine minibatches): the last "
                             "model is final" % (len(sds), len(comb_batches)))
        finally:
            clog.removeHandler(h)
        if info.is_main:
            _log_file(d, "combine.log", "nnet3-chain-combine over models %s on %s/combine.cegs "
                      "(minibatch %s)\n%s" % (its, egs_dir, args.num_chunk_per_minibatch,
                                              "\n".join(lines)))
    if info.is_main:
        save_kaldi_nnet3(model, final_path, trans_model=tm)
    hook.compute_probs(trainer, "final")
    if info.is_main:
        from pkwrap.kaldi.io import atomic_output
        with atomic_output(os.path.join(d, "accuracy.report"), "w") as f:
            f.write(accuracy_report(d))
        if args.cleanup:
            keep = {0}
            for p in glob.glob(os.path.join(d, "*.mdl")):
                b = os.path.basename(p)[:-4]
                if b.isdigit() and int(b) not in keep and \
                        int(b) % args.preserve_model_interval != 0:
                    os.remove(p)
            if args.remove_egs and args.egs_dir is None and os.path.isdir(egs_dir) and \
                    not os.path.exists(os.path.join(egs_dir, ".nodelete")):
                shutil.rmtree(egs_dir)
        tr = _parse_prob_log(os.path.join(d, "log", "compute_prob_train.final.log"))
        va = _parse_prob_log(os.path.join(d, "log", "compute_prob_valid.final.log"))
        log.info("%s: num-iters=%d workers=%d final.mdl log-prob train %s valid %s",
                 d, n, W, tr, va)
    barrier()
    del compute_prob_log_lines, torch


# ----------------------------------------------------------------------------- main
def _num_workers(args) -> int:
    return int(args.num_jobs_final)


def _torchrun_cmd(argv: Sequence[str], workers: int) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=%d" % workers, "-m", "pkwrap.train.chain_train"] + list(argv)


def run(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    argv = list(sys.argv[1:] if argv is None else argv)
    args, notes = parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    from .metrics import setup_logger
    under_torchrun = "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    rank = int(os.environ.get("RANK", "0")) if under_torchrun else 0
    setup_logger(os.path.join(args.dir, "log"), rank, name="train")
    if args.use_gpu != "no":
        if not torch.cuda.is_available():
            raise RuntimeError("--use-gpu=%s but no CUDA device is visible (use --use-gpu=no "
                               "to train on the CPU)" % args.use_gpu)
        os.environ.setdefault("PKWRAP_DEVICE", "cuda")
    else:
        os.environ["PKWRAP_DEVICE"] = "cpu"
    if rank == 0:
        log.info("%s %s", PROG, " ".join(shlex.quote(a) for a in argv))
    egs_dir = args.egs_dir if args.egs_dir is not None else os.path.join(args.dir, "egs")
    W = _num_workers(args)
    prepared = os.environ.get(_PREPARED_ENV) == "1"
    if not under_torchrun and W > 1:
        prepare(args, egs_dir)
        if args.exit_stage is not None and args.exit_stage <= 0:
            return 0
        cmd = _torchrun_cmd(argv, W)
        log.info("running %d workers: %s", W, " ".join(shlex.quote(c) for c in cmd))
        env = dict(os.environ, **{_PREPARED_ENV: "1"})
        import subprocess
        return subprocess.call(cmd, env=env)
    if under_torchrun and int(os.environ["WORLD_SIZE"]) > 1 and not prepared:
        from .dist import barrier, setup_distributed
        setup_distributed()
        if rank == 0:
            prepare(args, egs_dir)
        barrier()
    elif not prepared:
        prepare(args, egs_dir)
    if args.exit_stage is not None and args.exit_stage <= 0:
        return 0
    train(args, egs_dir, notes)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``pkwrap-chain-train``): one-line errors (pkwrap.cli)."""
    from pkwrap.cli import run_program
    # a failure keeps the stages and checkpoints already completed (Kaldi's train.py
    # leaves them too): running the command again continues from there
    return run_program(run, PROG, argv, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
