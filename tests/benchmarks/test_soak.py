"""The soak benchmark at CI size (CPU, tiny-random): requests, cancellations and faults through
several generate calls leave nothing behind, and the counts add up; a leak makes it fail."""
import json

from benchmarks.soak import main
from runtime.attention import DenseAttention
from runtime.herald import HeraldAttention


def run(tmp_path, *extra):
    out = tmp_path / "soak.json"
    code = main(["--requests", "20", "--calls", "2", "--max-prompt", "80", "--max-new", "12", "--cancel-rate", "0.3",
                 "--device", "cpu", "--quiet", "--out", str(out), *extra])
    return code, json.loads(out.read_text())


def test_soak_restores_the_baseline_and_counts_add_up(tmp_path, capsys):
    code, data = run(tmp_path, "--modes", "dense", "herald-cpu", "--fault-rate", "0.03", "--seed", "2")
    assert code == 0
    assert [r["label"] for r in data["runs"]] == ["dense", "herald-cpu"]
    for r in data["runs"]:
        assert r["restored"] and all(check["ok"] for check in r["checks"].values())
        assert r["requests"] == 20 == r["length"] + r["eos"] + r["cancelled"] + r["error"]
        assert r["cancelled"] == r["cancelled_before_start"] + r["cancelled_running"]
        assert r["cancelled_before_start"] > 0 and r["cancelled_running"] > 0
        assert r["faults_injected"] > 0 and r["error"] > 0  # every fault fails at least one request
        assert sum(c["requests"] for c in r["per_call"]) == 20 and len(r["per_call"]) == 2
        assert sum(c["tokens"] for c in r["per_call"]) == r["tokens"] > 0
        assert all(not any(c["occupancy"].values()) for c in r["per_call"])
        assert r["memory_after"]["open_host_stores"] == 0 == r["memory_after"]["pinned_bytes"]
    herald = data["runs"][1]["per_call"][0]["occupancy"]
    assert {"host_pages_used", "partition_pages_held", "rows_taken"} <= set(herald)
    assert "restored" in capsys.readouterr().out


def test_soak_fails_when_a_mode_forgets_a_sequence(tmp_path, monkeypatch):
    """A mode that gives the slot back but keeps the sequence's entry: the soak says so, exits 1."""
    def leaky_remove(self, seq_id):
        self.free_slots.append(self.slot_of[seq_id])

    monkeypatch.setattr(DenseAttention, "remove_sequence", leaky_remove)
    code, data = run(tmp_path, "--modes", "dense")
    [r] = data["runs"]
    assert code == 1 and not r["restored"]
    check = r["checks"]["mode_empty_after_every_call"]
    assert not check["ok"] and check["leftovers"][0]["occupancy"]["sequences"] > 0


def test_soak_fails_when_host_stores_stay_open(tmp_path, monkeypatch):
    """A mode whose close leaves its host KV store open and referenced: memory is not back."""
    leaked = []
    monkeypatch.setattr(HeraldAttention, "close", lambda self: leaked.append(self.store))
    code, data = run(tmp_path, "--modes", "herald-cpu")
    [r] = data["runs"]
    assert code == 1 and not r["restored"] and r["checks"]["mode_empty_after_every_call"]["ok"]
    stores = r["checks"]["open_host_stores"]
    assert not stores["ok"] and stores["after"] - stores["before"] == 2  # one per generate call


def test_second_half_growth_separates_warm_up_from_a_leak():
    from benchmarks.soak import second_half_growth

    assert second_half_growth([100.0, 150.0, 160.0]) is None  # too few calls to tell
    assert second_half_growth([100.0, 150.0, 160.0, 160.0, 161.0, 161.0]) == 1.0  # warm-up, then flat
    assert second_half_growth([100.0, 110.0, 120.0, 130.0]) == 20.0  # still growing
