"""NG-SGD under DistributedDataParallel: 2 processes, torchrun, gloo on CPU.

The checks run inside tests/ddp_scripts/ngsgd_worker.py (see its docstring): identical
parameters on both ranks after every step, per-rank preconditioners, exact resume from a
checkpoint, and Kaldi-style periodic model averaging.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "ddp_scripts" / "ngsgd_worker.py"


def test_two_rank_ddp_ngsgd(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "NGSGD-DDP-OK" in proc.stdout, out[-4000:]
    assert (tmp_path / "ckpt.pt").exists()
