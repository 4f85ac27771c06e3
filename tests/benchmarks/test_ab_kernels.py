"""scripts/dev/ab_kernels.sh, on the CPU (the transfer benchmark's dry run in the Triton interpreter):
the B side really imports the other copy of gpu_kernels, which plain `python -m` would not."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dev" / "ab_kernels.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; on a GPU, A/B for real")


def run(other, tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path / "out"), TRITON_INTERPRET="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(["bash", str(SCRIPT), str(other), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


def test_each_side_runs_its_own_copy_of_the_kernels(tmp_path):
    other = tmp_path / "head"
    shutil.copytree(ROOT / "gpu_kernels", other / "gpu_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    proc = run(other, tmp_path, "transfer", "--device", "cpu", "--quick", "--overlap-only", "--overlap-caps", "4",
               "--layers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"A and A2 ran {ROOT / 'gpu_kernels'}, B ran {other / 'gpu_kernels'}" in proc.stdout
    assert all((tmp_path / "out" / f"ab_{side}" / "transfer.json").is_file() for side in ("a", "b", "a2"))


def test_refuses_what_cannot_be_an_a_b(tmp_path):
    proc = run(ROOT, tmp_path, "transfer")
    assert proc.returncode == 2 and "working tree itself" in proc.stderr
    proc = run(tmp_path, tmp_path, "transfer")
    assert proc.returncode == 2 and "no gpu_kernels folder" in proc.stderr
    (tmp_path / "gpu_kernels").mkdir()
    proc = run(tmp_path, tmp_path, "decode")
    assert proc.returncode == 2 and "does not record which gpu_kernels" in proc.stderr
