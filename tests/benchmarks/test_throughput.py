"""The throughput benchmark end to end on the tiny geometry (CPU): rows, ratios, JSON."""
import json

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
