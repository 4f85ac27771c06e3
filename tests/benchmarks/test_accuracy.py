"""The accuracy benchmark: its mode/budget plan and a smoke run of main() on the tiny random model."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.accuracy import MODE_SPECS, main, mode_mass, recall_variant, sparse_config

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-random"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and the CI cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sparse_config_per_spec():
    kw = dict(page_size=8, sink_tokens=4, local_window=16, dense_layers=2, compact_bits=8, compact_group=16)
    cfg = sparse_config("herald-split", 5.0, **kw)
    assert (cfg.source, cfg.budget_fraction, cfg.page_size, cfg.compact_bits) == ("split", 0.05, 8, 8)
    assert sparse_config("herald-cpu", 1.0, **kw).source == "cpu"
    lookahead = sparse_config("herald-lookahead", 5.0, **kw)
    assert (lookahead.source, lookahead.lookahead) == ("gpu-compact", True)
    assert not sparse_config("herald-gpu-compact", 5.0, **kw).lookahead
    assert sparse_config("dense", None, **kw).budget_fraction == 0.05  # unused by dense
    assert recall_variant("herald-gpu-compact", 4, 16) == ("herald-int4", "page16", "max")
    # herald selects with one query per block position (its default); the mean-query row as mage does
    assert recall_variant("herald-cpu", 4, 16) == ("herald-positions", "page16", "max")
    assert recall_variant("herald-mean-query", 4, 16) == recall_variant("mage", 4, 16) == ("mage", "page16", "max")
    assert sparse_config("herald-mean-query", 5.0, **kw).selection_query("herald") == "mean"
    assert sparse_config("herald-cpu", 5.0, **kw).selection_query("herald") == "positions"
    assert recall_variant("quest", 4, 16) == ("quest", "page16", "bound")
    assert recall_variant("dense", 4, 16) is None


def test_mode_mass_averages_the_modes_sparse_layers():
    rec = {"rows": [{"variant": v, "granularity": "page16", "aggregate": "max", "budget": "5%",
                     "mass_by_layer": [0.2, 0.4, 0.6, 0.8]} for v in ("mage", "herald-positions")]}
    # the sparse modes keep layers 0-1 dense by default: mean of layers 2-3; with none dense, all 4
    assert mode_mass(rec, "mage", 5.0, 4, 16, 4, 2) == pytest.approx(0.7)
    assert mode_mass(rec, "herald-cpu", 5.0, 4, 16, 4, 2) == pytest.approx(0.7)
    assert mode_mass(rec, "herald-cpu", 5.0, 4, 16, 4, 0) == pytest.approx(0.5)
    assert mode_mass(rec, "mage", 5.0, 4, 16, 2, 2) == 1.0  # every layer dense
    assert mode_mass(rec, "dense", 5.0, 4, 16, 4, 2) == 1.0
    assert mode_mass(rec, "quest", 5.0, 4, 16, 4, 2) is None  # no quest row recorded


def test_main_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    assert main(["--model", str(TINY), "--contexts", "256", "--per-task", "1", "--tasks", "passkey", "kv",
                 "--budgets", "5", "10", "--recall", "--recall-blocks", "2", "--dense-layers", "1",
                 "--device", "cpu", "--no-plot", "--no-progress", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"model", "contexts", "tasks", "rows", "recall", "per_task", "seed", "split"} <= set(data)
    labels = [r["label"] for r in data["rows"]]
    assert labels[0] == "dense" and len(labels) == 1 + 2 * (len(MODE_SPECS) - 1)
    assert {(r["mode"], r["source"]) for r in data["rows"]} >= {("herald", "cpu"), ("herald", "gpu-compact"),
                                                                ("herald", "split"), ("quest", None)}
    for r in data["rows"]:
        assert set(r["accuracy"]) == {"passkey", "kv"}
        assert 0.0 <= r["mean"]["256"] <= 1.0
        assert r["mass"]["256"] is not None and 0.0 < r["mass"]["256"] <= 1.0 + 1e-6
    assert data["rows"][0]["mass"]["256"] == 1.0
    assert len(data["recall"]["256"]["query_cosine"]["by_layer"]) == 2
    printed = capsys.readouterr().out
    assert "herald-gpu-compact 5%" in printed and "256:mean" in printed
