"""benchmarks.tensor_parallel: LLaDA2.0-flash's geometry, the efficiency, and a smoke run under torchrun
(gloo, two CPU processes: the hook the multi-GPU table will be measured with)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.tensor_parallel import LLADA2_FLASH, efficiency
from runtime.model import weight_bytes
from runtime.parallel import allowed_sizes

REPO = Path(__file__).resolve().parents[2]


def test_llada2_flash_geometry_is_100b_and_splits_over_up_to_4_gpus():
    total, experts = weight_bytes(LLADA2_FLASH, torch.bfloat16)
    assert 95e9 < total / 2 < 105e9 and experts / total > 0.95
    assert allowed_sizes(LLADA2_FLASH) == [1, 2, 4]  # 4 KV heads


def test_efficiency_is_tp_throughput_over_one_engine_per_gpu():
    assert efficiency(180.0, 200.0) == pytest.approx(0.9)
    assert efficiency(180.0, None) is None


def test_runs_under_torchrun_on_the_cpu(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "benchmarks.tensor_parallel", "--geometry", "tiny", "--contexts", "256",
                           "--device", "cpu", "--blocks", "1", "--block-size", "4", "--steps", "2", "--batches", "1",
                           "--modes", "herald", "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "tensor_parallel.json").read_text())["rows"]
    assert [(r["tensor_parallel"], r["mode"]) for r in rows] == [(1, "herald"), (2, "herald")]
    assert all("error" not in r and r["host_tokens_per_s"] > 0 for r in rows)
    assert rows[1]["efficiency_per_gpu"] == pytest.approx(rows[1]["host_tokens_per_s"] / rows[0]["host_tokens_per_s"])
    assert "efficiency per GPU" in done.stdout
