"""The throughput benchmark end to end on the tiny geometry (CPU): rows, ratios, JSON."""
import json

import torch

from benchmarks.throughput import WARMUP_BLOCKS, batches_up_to, main, summarise


def test_batches_up_to():
    assert batches_up_to(6, 64) == [1, 2, 4, 6]
    assert batches_up_to(8, 4) == [1, 2, 4]
    assert batches_up_to(1, 8) == [1]
    assert batches_up_to(0, 8) == []


def test_summarise_takes_each_modes_best_batch():
    rows = [dict(label="dense", context=8, batch=1, tokens_per_s=10.0, block_p50_s=1.0),
            dict(label="dense", context=8, batch=2, tokens_per_s=15.0, block_p50_s=1.2),
            dict(label="mage", context=8, batch=2, tokens_per_s=20.0, block_p50_s=0.8),
            dict(label="herald-gpu-compact", context=8, batch=2, tokens_per_s=30.0, block_p50_s=1.0),
            dict(label="herald-gpu-compact", context=8, batch=4, tokens_per_s=45.0, block_p50_s=1.6),
            dict(label="herald-cpu", context=8, batch=4, error="MemoryError: ...")]
    [ratio] = summarise(rows)["ratios"]
    assert ratio["batch"] == 4 and ratio["over_dense_best"] == 3.0 and ratio["dense_batch"] == 2
    assert "latency_over_mage_equal_batch" not in ratio  # mage has no batch-4 row


def test_main_smoke(tmp_path, capsys):
    assert main(["--geometry", "tiny", "--contexts", "128", "--max-batch", "1", "--blocks", "1", "--block-size", "4",
                 "--steps", "2", "--labels", "dense", "mage", "herald-gpu-compact", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    rows = {r["label"]: r for r in data["rows"]}
    assert set(rows) == {"dense", "mage", "herald-gpu-compact"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["batch"] == 1 and len(r["block_latencies_s"]) == 1 + WARMUP_BLOCKS
    herald = rows["herald-gpu-compact"]
    assert herald["host_gib"] >= 0 and len(herald["timeline"]) == 1  # one timed block
    # the no-transfer reference ran right after it: the exposed time is block time against block time
    assert herald["exposed_transfer_ms_e2e"] == max(0.0, herald["block_mean_s"] - herald["reference_block_mean_s"]) * 1e3
    assert "reference_block_mean_s" not in rows["dense"]
    assert data["summary"]["ratios"][0]["label"] == "herald-gpu-compact"
    assert "herald at its best batch" in capsys.readouterr().out
    # the roofline: bytes on every row; no rates on the CPU, so no floor, and the row says why
    assert data["meta"]["hbm_read_GBps"] is None and data["meta"]["pinned_copy_GBps"] is None
    for r in rows.values():
        assert r["floor_hbm_bytes"] == sum(v for k, v in r["floor_terms"].items() if not k.startswith("pcie"))
        assert "floor_ms" not in r and "CUDA" in r["floor_note"]
    # (the tiny geometry's 2 layers are both exact: herald moves and scans nothing)
    assert rows["dense"]["floor_pcie_bytes"] == 0 and set(herald["floor_terms"]) == {"weights", "kv", "scan",
                                                                                     "pcie_read", "pcie_write"}
    assert not herald["floor_overlapped"] and 0 <= herald["floor_fetch_fraction"] <= 1  # no lookahead on the CPU


def test_add_floor_uses_the_rates_and_the_rows_fetched_share():
    """A row's floor: its block's bytes at the rates given, against its mean block time; a herald
    row's fetches at the share of its selection it fetched."""
    from benchmarks.roofline import block_bytes, floor_ms
    from benchmarks.throughput import add_floor
    from runtime.config import EngineConfig, SparseConfig
    from runtime.engine import Engine
    from benchmarks.decode import geometry
    from runtime.checkpoint import random_model

    model = random_model(geometry("tiny", 512))
    config = EngineConfig(model_path="<random>", device="cpu", mode="herald", block_size=4, denoising_steps=2,
                          mask_token_id=151935, sparse=SparseConfig(lookahead=True, dense_layers=1),
                          progress=False)
    engine = Engine(config, model=model)
    row = dict(context=256, batch=2, block_mean_s=0.5, pages_selected_per_block=100.0,
               pages_fetched_per_block=5.0, pages_prefetched_per_block=15.0)
    add_floor(row, engine, hbm_GBps=1.0, copy_GBps=0.1)
    block = block_bytes(model.config, "herald", engine.config.sparse, 2, 256, 2, 4, torch.float32, lookahead=True,
                        fetch_fraction=0.2)
    expected = floor_ms(block, 1.0, 0.1)
    assert row["floor_fetch_fraction"] == 0.2 and row["floor_overlapped"] and block.pcie_read > 0
    assert row["floor_ms"] == expected["floor_ms"] == max(expected["hbm_ms"], expected["pcie_ms"])
    assert row["floor_share"] == row["floor_ms"] / 500.0
    assert "floor_note" not in row


def test_batches_are_planned_for_the_tokens_measure_allocates(tmp_path, monkeypatch):
    """The planner sizes each configuration for the tokens `measure` then allocates per sequence
    (warm-up, timed blocks and the lookahead's next block): a batch the sweep plans is one the mode
    accepts."""
    from runtime.engine import Engine

    planned, allocated = [], []
    largest_batch, make_mode = Engine.largest_batch, Engine.make_mode

    def plan(self, max_tokens, **free):
        planned.append(max_tokens)
        return largest_batch(self, max_tokens, **free)

    def make(self, num_sequences, max_tokens):
        allocated.append(max_tokens)
        return make_mode(self, num_sequences, max_tokens)

    monkeypatch.setattr(Engine, "largest_batch", plan)
    monkeypatch.setattr(Engine, "make_mode", make)
    assert main(["--geometry", "tiny", "--contexts", "128", "--max-batch", "1", "--blocks", "1", "--block-size", "4",
                 "--steps", "2", "--labels", "dense", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert planned and allocated and set(planned) == set(allocated) == {128 + (1 + WARMUP_BLOCKS + 1) * 4}


def test_a_failed_configuration_is_a_row_and_the_next_ones_run(tmp_path, monkeypatch):
    """A configuration that runs out of memory (here: told to) is reported with its error, and its
    memory is given back before the next one is planned, which then runs."""
    import benchmarks.throughput as throughput

    measure = throughput.measure

    def failing_first(engine, *args, **kwargs):
        if engine.config.mode == "dense":
            raise MemoryError("dense: told to fail")
        return measure(engine, *args, **kwargs)

    monkeypatch.setattr(throughput, "measure", failing_first)
    assert main(["--geometry", "tiny", "--contexts", "128", "--batches", "1", "--blocks", "1", "--block-size", "4",
                 "--steps", "2", "--labels", "dense", "mage", "--device", "cpu", "--no-graphs",
                 "--out", str(tmp_path)]) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["rows"]}
    assert rows["dense"]["error"] == "MemoryError: dense: told to fail"
    assert rows["mage"]["tokens_per_s"] > 0
