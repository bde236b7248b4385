"""2-rank NG-SGD under DDP (gloo, CPU); run by tests/test_ddp_ngsgd.py as

    torchrun --standalone --nproc_per_node=2 tests/ddp_scripts/ngsgd_worker.py OUT_DIR

Checks, on every rank: parameters identical on all ranks after every step; each rank keeps its
own preconditioners; resuming from a checkpoint written at step K reproduces the uninterrupted
trajectory bit for bit; Kaldi-style periodic model averaging leaves the ranks identical right
after each averaging step.  Prints "NGSGD-DDP-OK" on rank 0 when every check passed.
"""
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pkwrap.nn import TDNNFModel, scale_batchnorm_stats
from pkwrap.optim import NGSGD, KaldiLRScheduler, kaldi_param_groups
from pkwrap.train.comm_hooks import (NGSGDState, gather_ngsgd_state_dict, kaldi_model_averaging,
                                     ngsgd_hook)

NUM_STEPS, RESUME_AT = 8, 4


def make(rank, world):
    torch.manual_seed(1)  # same initial model everywhere (DDP broadcasts it anyway)
    model = TDNNFModel(9, feat_dim=8, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=6,
                       time_strides=(1, 0, 3), prefinal_dim=6, prefinal_big_dim=16)
    ddp = DDP(model)
    opt = NGSGD(kaldi_param_groups(model), lr=0.01)
    sched = KaldiLRScheduler(opt, NUM_STEPS, 0.002, 0.0002, num_jobs_initial=world)
    return model, ddp, opt, sched


def batches(rank):
    g = torch.Generator().manual_seed(100 + rank)  # each rank has its own data
    return [(torch.randn(3, 34, 8, generator=g), torch.randint(0, 9, (3,), generator=g))
            for _ in range(NUM_STEPS)]


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def check_same_on_all_ranks(t, what):
    world = dist.get_world_size()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    for r in range(1, world):
        if not torch.equal(out[0], out[r]):
            raise AssertionError(f"{what}: rank {r} differs from rank 0 "
                                 f"(max diff {float((out[0] - out[r]).abs().max())})")
    return out


def train_step(model, ddp, opt, sched, x, y):
    opt.zero_grad()
    out = ddp(x)
    chain, xent = out["output"], out["output-xent"]
    loss = -xent.gather(-1, y[:, None, None].expand(-1, xent.shape[1], 1)).sum() \
        - 0.1 * chain.logsumexp(-1).sum()
    loss.backward()
    opt.step(num_sequences=x.shape[0])
    sched.step()
    scale_batchnorm_stats(model, 0.8)


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(rank)

    # 1. gradient allreduce with the NG hook; identical parameters after every step
    model, ddp, opt, sched = make(rank, world)
    state = NGSGDState(average=True)
    ddp.register_comm_hook(state, ngsgd_hook)
    ckpt = os.path.join(out_dir, "ckpt.pt")
    for step in range(NUM_STEPS):
        train_step(model, ddp, opt, sched, *data[step])
        check_same_on_all_ranks(flat(model), f"parameters after step {step}")
        if step + 1 == RESUME_AT:
            sd = gather_ngsgd_state_dict(opt)  # collective
            if rank == 0:
                torch.save({"model": model.state_dict(), "opt": sd, "sched": sched.state_dict()},
                           ckpt)
            dist.barrier()
    assert state.num_buckets >= NUM_STEPS and state.num_nonfinite_buckets == 0
    W = model.component("tdnn1.affine").preconditioner_in.W_t.contiguous()
    gathered = [torch.empty_like(W) for _ in range(world)]
    dist.all_gather(gathered, W)
    assert not torch.equal(gathered[0], gathered[1]), "ranks should precondition with own state"
    final = flat(model)

    # 2. resume from the checkpoint: same trajectory
    model2, ddp2, opt2, sched2 = make(rank, world)
    ddp2.register_comm_hook(NGSGDState(average=True), ngsgd_hook)
    ck = torch.load(ckpt, weights_only=False)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    for step in range(RESUME_AT, NUM_STEPS):
        train_step(model2, ddp2, opt2, sched2, *data[step])
    if not torch.equal(flat(model2), final):
        raise AssertionError("resumed run differs from the uninterrupted one "
                             f"(max diff {float((flat(model2) - final).abs().max())})")
    assert torch.equal(model2.component("tdnn1.affine").preconditioner_in.W_t, W)

    # 3. Kaldi's scheme: local steps, parameters averaged every 2 steps
    model3, ddp3, opt3, sched3 = make(rank, world)
    averager = kaldi_model_averaging(ddp3, period=2, warmup_steps=1)
    for step in range(5):
        train_step(model3, ddp3, opt3, sched3, *data[step])
        averager.average_parameters(model3.parameters())
        p = flat(model3)
        out = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(out, p)
        same = torch.allclose(out[0], out[1], rtol=0, atol=1e-6)
        # averaged after steps 0 (warm-up: allreduced grads), 1 and 3 (period 2)
        expect_same = step in (0, 1, 3)
        if same != expect_same:
            raise AssertionError(f"model averaging: step {step} ranks same={same}, "
                                 f"expected {expect_same}")

    # Clean gloo shutdown: release every DDP reducer (they hold the process group and its
    # threads) before destroying the group, so that torchrun sees exit code 0 on all ranks.
    del ddp, ddp2, ddp3, averager
    gc.collect()
    dist.barrier()
    if rank == 0:
        print("NGSGD-DDP-OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
