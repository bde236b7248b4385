"""2 ranks (gloo, CPU) of pkwrap.train.Trainer where some minibatches of ONE rank give a
non-finite network output (NaN, +inf, -inf): every rank must skip that step together
(no rank updates while another skips, no hang), the failure must be counted and reported,
and the parameters must stay identical on both ranks. Run by tests/test_robust.py as

    torchrun --standalone --nproc_per_node=2 tests/ddp_scripts/nonfinite_skip_worker.py EXP_DIR

Checks (on every rank, after every step): the flattened parameters are equal on both ranks;
a poisoned step changes no parameter on any rank; every clean step changes them (the
optimizer state was not poisoned). At the end: the counters say how many minibatches
failed (``Trainer.skipped``, each once, not once per rank) and how many steps were skipped
(``Trainer.skipped_steps``), the per-rank logs tell the failed minibatch from a step skipped
because of another rank, the
batchnorm statistics are finite and equal on both ranks. Rank 0 prints "NONFINITE-DDP-OK".
"""
import os
import sys

import torch
import torch.distributed as dist

from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
from pkwrap.nn import TDNNFModel
from pkwrap.optim import NGSGD, kaldi_param_groups
from pkwrap.train import TrainConfig, Trainer
from pkwrap.train.data import EgsDataset

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "kaldi", "mono")
# step (0-based, as Trainer.step before the step) -> (rank whose minibatch fails, value)
POISON = {1: (0, float("nan")), 3: (1, float("inf")), 4: (0, -float("inf"))}
NUM_STEPS = 7


class Poisoned(torch.nn.Module):
    """The model; its output gets ``value`` in one place while ``value`` is set."""

    def __init__(self, m):
        super().__init__()
        self.m = m
        self.value = None

    def forward(self, x):
        y = self.m(x)
        if self.value is None:
            return y

        def poison(chain):
            bad = torch.zeros_like(chain)
            bad[..., 0, 3] = self.value
            return chain + bad
        if isinstance(y, dict):  # an nnet3 network: outputs by name
            return dict(y, output=poison(y["output"]))
        if isinstance(y, tuple):  # (chain, xent)
            return (poison(y[0]),) + tuple(y[1:])
        return poison(y)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def same_on_all_ranks(t, what):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    for r in range(1, len(out)):
        if not torch.equal(out[0], out[r]):
            raise AssertionError("%s: rank %d differs from rank 0 (max diff %g)"
                                 % (what, r, float((out[0] - out[r]).abs().max())))


def main():
    exp = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = EgsDataset.from_kaldi(os.path.join(FIX, "data", "cegs_compress_false.ark"))
    torch.manual_seed(0)
    net = TDNNFModel(34, feat_dim=40, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=4,
                     time_strides=(1, 3), prefinal_dim=8, prefinal_big_dim=16, use_idct=False)
    model = Poisoned(net)
    loss = ChainLoss(DenominatorGraph.from_fst(os.path.join(FIX, "den.fst"), 34), ChainOptions())
    opt = NGSGD(kaldi_param_groups(net), lr=0.002, momentum=0.5)
    state = {"before": None, "poisoned": False}

    def before_step(trainer, batch):
        state["before"] = flat(net).clone()
        r, v = POISON.get(trainer.step, (None, None))
        state["poisoned"] = r is not None
        model.value = v if r == rank else None

    def after_step(m, step):
        model.value = None
        now = flat(net)
        same_on_all_ranks(now, "parameters after step %d" % step)
        changed = not torch.equal(now, state["before"])
        if state["poisoned"] and changed:
            raise AssertionError("step %d: one rank's minibatch failed but rank %d updated"
                                 % (step, rank))
        if not state["poisoned"] and not changed:
            raise AssertionError("step %d: a clean step was skipped on rank %d" % (step, rank))
        if not torch.isfinite(now).all():
            raise AssertionError("step %d: non-finite parameters" % step)

    cfg = TrainConfig(exp, minibatch_size="1", checkpoint_every=0, log_every=2,
                      progress_bar=False, tensorboard=False, max_steps=NUM_STEPS,
                      shuffle=False, min_minibatches_before_abort=1000)
    tr = Trainer(model, loss, opt, data, cfg, before_step=before_step, after_step=after_step)
    tr.train()
    # the counters: each failed minibatch once (not once per rank), each skipped step once
    assert (tr.skipped, tr.skipped_steps) == (len(POISON), len(POISON)), \
        (tr.skipped, tr.skipped_steps)
    log = open(os.path.join(exp, "log", "train.%d.log" % rank)).read()
    mine = sorted(s + 1 for s, (r, _) in POISON.items() if r == rank)
    for s in sorted(POISON):
        failed_here = POISON[s][0] == rank
        line = [ln for ln in log.splitlines() if "step %d:" % (s + 1) in ln and "skipped" in ln]
        assert line, "rank %d: no log line for the skipped step %d" % (rank, s + 1)
        assert ("non-finite objective or gradient (minibatch" in line[0]) == failed_here and \
            ("another rank's minibatch" in line[0]) != failed_here, (rank, s, line[0])
    assert log.count("non-finite objective or gradient (minibatch") == len(mine), log
    if rank == 0:
        final = [ln for ln in log.splitlines() if "wrote" in ln and "final.pt" in ln]
        assert final and "(%d skipped minibatches; %d steps skipped)" % (
            len(POISON), len(POISON)) in final[0], final
    for b in net.buffers():
        if b.is_floating_point():
            assert torch.isfinite(b).all(), "non-finite batchnorm statistics"
            same_on_all_ranks(b.detach().clone(), "buffers")
    dist.barrier()
    if rank == 0:
        print("NONFINITE-DDP-OK skipped=%d" % tr.skipped)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
