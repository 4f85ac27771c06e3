"""The layer benchmark end to end: a CPU smoke run on the tiny geometry (Triton interpreter), and
the real geometry on a GPU."""
import json

import pytest
import torch

from benchmarks.layer import main


def test_main_smoke_cpu(tmp_path, capsys):
    assert main(["--geometry", "tiny", "--device", "cpu", "--dtype", "float32", "--tokens", "8", "12",
                 "--block-size", "4", "--reps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layer.json").read_text())
    assert [(r["tokens"], r["N"], r["T"]) for r in data["rows"]] == [(8, 2, 4), (12, 3, 4)]
    for r in data["rows"]:
        assert r["plain_us"] > 0 and r["fused_us"] > 0 and r["rel_err_fused_vs_plain"] < 1e-5
        assert r["speedup"] == r["plain_us"] / r["fused_us"]
    # the layer's weights, fp32: q, k, v, o, gate, up, down and four norms of the tiny geometry (hidden 256,
    # 4 / 2 heads of 128, MLP 512); no weight-read floor without a GPU's copy rate to derive it from
    h, i, hq, hkv, d = 256, 512, 4, 2, 128
    assert data["layer_weight_bytes"] == 4 * (2 * h * hq * d + 2 * h * hkv * d + 3 * h * i + 2 * h + 2 * d)
    assert data["copy_GBps"] is None and data["weight_floor_us"] is None
    assert "speed-up" in capsys.readouterr().out


def test_tokens_must_split_into_blocks(tmp_path):
    with pytest.raises(ValueError, match="multiple of --block-size"):
        main(["--geometry", "tiny", "--device", "cpu", "--dtype", "float32", "--tokens", "6", "--block-size", "4",
              "--reps", "1", "--out", str(tmp_path)])


@pytest.mark.gpu
def test_main_real_geometry_gpu(tmp_path):
    assert main(["--tokens", "32", "128", "--reps", "5", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layer.json").read_text())
    assert data["device_name"] == torch.cuda.get_device_name()
    # the floor: the layer's weight bytes read once at the measured copy rate
    assert data["weight_floor_us"] == data["layer_weight_bytes"] / (data["copy_GBps"] * 1e9) * 1e6
    for r in data["rows"]:
        assert r["fused_us"] > 0 and r["plain_us"] > 0 and r["rel_err_fused_vs_plain"] < 2e-2
        assert r["speedup"] == r["plain_us"] / r["fused_us"]
        if r["plain_kernels"] is not None:
            assert r["fused_kernels"] < r["plain_kernels"]
