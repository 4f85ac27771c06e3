"""training/forecast.py: the learned forecast's fit, its file, and herald running it."""
import shutil
from pathlib import Path

import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.checkpoint import FORECAST_FILE, load_forecast
from runtime.config import ModelConfig, SparseConfig
from training.forecast import distillation_loss, fit_forecast, layer_pairs, main, recorded_blocks, step0_queries

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-random"
SPARSE = SparseConfig(budget_fraction=0.1, page_size=8, sink_tokens=4, local_window=8)


@pytest.fixture(scope="module")
def records():
    engine = Engine(EngineConfig(model_path=str(TINY), mode="dense", device="cpu", progress=False, max_batch_size=4))
    train = recorded_blocks(engine, ["passkey", "kv"], [256, 384], 2, seed=0, split="train", progress=False)
    held_out = recorded_blocks(engine, ["passkey", "kv"], [256], 2, seed=0, split="validation", progress=False)
    return engine, train, held_out


def test_fit_starts_at_the_training_free_forecast_and_lowers_the_held_out_divergence(records):
    engine, train, held_out = records
    cfg = engine.model_config
    scale = cfg.head_dim ** -0.5
    weights, report = fit_forecast(train, held_out, scale, SPARSE, steps=40, lr=1e-2, log_every=0)
    assert weights.shape == (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
    assert torch.equal(weights[0], torch.eye(cfg.head_dim).repeat(cfg.num_kv_heads, 1, 1))  # nothing forecasts layer 0
    assert [r["layer"] for r in report] == list(range(1, cfg.num_layers))
    for r in report:
        assert r["kl_after"] < r["kl_before"], r
        assert 0.0 <= r["overlap_before"] <= 1.0 and 0.0 <= r["overlap_after"] <= 1.0
    # the identity is the training-free forecast: the layer before's queries as they are
    pairs = layer_pairs(held_out, 1, step0_queries(held_out))
    identity = torch.eye(cfg.head_dim).repeat(cfg.num_kv_heads, 1, 1)
    assert float(distillation_loss(identity, pairs, scale)) == pytest.approx(report[0]["kl_before"])


def test_the_fitted_file_runs_in_herald_and_changes_no_token(tmp_path):
    model = tmp_path / "tiny"
    shutil.copytree(TINY, model)
    assert main(["--model", str(model), "--tasks", "passkey", "--contexts", "256", "--per-task", "2",
                 "--held-out-per-task", "1", "--steps", "5", "--device", "cpu", "--no-progress",
                 "--report-json", str(tmp_path / "report.json")]) == 0
    cfg = ModelConfig.from_dir(model)
    assert load_forecast(model, cfg).shape == (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
    tokens, timelines = {}, {}
    for forecast in ("off", "learned"):
        sparse = SparseConfig(budget_fraction=0.1, page_size=8, sink_tokens=4, local_window=8, dense_layers=0,
                              forecast=forecast, check_residency=True)
        engine = Engine(EngineConfig(model_path=str(model), mode="herald", device="cpu", progress=False,
                                     max_batch_size=2, sparse=sparse))
        results = engine.generate(["abc " * 70, "the key is 123. " * 20], max_new_tokens=12, stop_at_eos=False)
        tokens[forecast], timelines[forecast] = [r.tokens for r in results], engine.last_timeline
    assert tokens["learned"] == tokens["off"]
    assert all(b["forecast_recall"] is not None for b in timelines["learned"])
    assert all(b["forecast_recall"] is None for b in timelines["off"])


def test_learned_without_its_file_is_refused_naming_the_file_and_the_fix(tmp_path):
    model = tmp_path / "tiny"
    shutil.copytree(TINY, model)
    config = EngineConfig(model_path=str(model), mode="herald", device="cpu", progress=False,
                          sparse=SparseConfig(forecast="learned"))
    with pytest.raises(FileNotFoundError, match=rf"{FORECAST_FILE}.*python -m training.forecast"):
        Engine(config)
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2, 2, 8, 8)}, str(model / FORECAST_FILE))
    with pytest.raises(ValueError, match=r"shape \[2, 2, 16, 16\]"):
        Engine(config)
