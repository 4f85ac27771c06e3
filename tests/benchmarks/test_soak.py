"""The soak benchmark at CI size (CPU, tiny-random): requests, cancellations and faults through
several generate calls leave nothing behind, and the counts add up; a leak makes it fail, down to
one KV page per request."""
import json

import torch

from benchmarks.decode import geometry
from benchmarks.soak import RSS_WARM_UP_BYTES, kv_page_bytes, main, make_workload, memory_allowances
from runtime.attention import DenseAttention
from runtime.herald import HeraldAttention

MiB = 2**20
TINY_PAGE_BYTES = 4 * 2 * 2 * 2 * 16 * 4  # tiny-random, fp32: 4 tokens x K and V x 2 layers x 2 KV heads x 16 dims


def run(tmp_path, *extra):
    out = tmp_path / "soak.json"
    code = main(["--requests", "20", "--calls", "2", "--max-prompt", "80", "--max-new", "12", "--cancel-rate", "0.3",
                 "--device", "cpu", "--quiet", "--out", str(out), *extra])
    return code, json.loads(out.read_text())


def test_soak_restores_the_baseline_and_counts_add_up(tmp_path, capsys):
    code, data = run(tmp_path, "--modes", "dense", "herald-cpu", "--fault-rate", "0.03", "--seed", "2")
    assert code == 0
    # the workload run() asks for: tiny-random's 101 ids, blocks of 4 tokens denoised in 4 steps
    # (half the mid-block cancellations wait for transfers in flight, the CLI's default: never, on the CPU)
    workload = make_workload(20, 2, 101, (4, 80), (1, 12), 4, 4, 0.3, in_flight_share=0.5)
    assert [r["label"] for r in data["runs"]] == ["dense", "herald-cpu"]
    for r in data["runs"]:
        assert r["restored"] and all(check["ok"] for check in r["checks"].values())
        assert r["requests"] == 20 == r["length"] + r["eos"] + r["cancelled"] + r["error"]
        assert r["cancelled"] == r["cancelled_before_start"] + r["cancelled_running"]
        # every request is asked once at admission: those due at the first question never start; the
        # others are cancelled unless they end (or a fault ends them) before their question comes
        assert r["cancelled_before_start"] == sum(when == 1 for when in workload.cancel_at.values()) > 0
        assert 0 < r["cancelled_running"] <= sum(when > 1 and rid not in workload.in_flight
                                                 for rid, when in workload.cancel_at.items())
        assert r["cancelled_in_flight"] == 0 and workload.in_flight
        assert r["error"] >= r["faults_injected"] > 0  # every fault fails at least one request of its own
        assert sum(c["requests"] for c in r["per_call"]) == 20 and len(r["per_call"]) == 2
        assert sum(c["tokens"] for c in r["per_call"]) == r["tokens"] > 0
        assert all(not any(c["occupancy"].values()) for c in r["per_call"])
        assert r["memory_after"]["open_host_stores"] == 0 == r["memory_after"]["pinned_bytes"]
        # the allowances: a quarter of a KV page per request, RSS's warm-up term on top; nothing for the rest
        assert r["kv_page_bytes"] == TINY_PAGE_BYTES
        allowed = {name: check["allowed_growth"] for name, check in r["checks"].items() if "allowed_growth" in check}
        assert allowed == dict(rss_bytes=2 * MiB + 20 * TINY_PAGE_BYTES // 4, tensor_bytes=20 * TINY_PAGE_BYTES // 4,
                               open_host_stores=0, pinned_bytes=0)
        assert r["memory_after"]["tensor_bytes"] == r["memory_before"]["tensor_bytes"]  # exactly: nothing kept
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


def test_soak_fails_a_leak_of_one_kv_page_per_request(tmp_path, monkeypatch):
    """A mode that keeps one KV page's worth of tensor (all layers, K and V) alive for every request it
    admits: the live tensor bytes grow by exactly that, four times their allowance, and the soak fails.
    (RSS cannot see it here: 2 KiB pages, 32 KiB in all, beside allocator moves of up to 0.8 MiB.)"""
    leaked = []
    add_sequence = DenseAttention.add_sequence

    def leaky_add(self, seq_id, max_tokens):
        add_sequence(self, seq_id, max_tokens)
        page = self.k_cache[0][0]  # one layer's K of one page: [Hkv, P, D]
        leaked.append(page.new_empty(2 * len(self.k_cache) * page.numel()))

    monkeypatch.setattr(DenseAttention, "add_sequence", leaky_add)
    code, data = run(tmp_path, "--modes", "dense")
    [r] = data["runs"]
    assert leaked[0].nbytes == r["kv_page_bytes"] == TINY_PAGE_BYTES
    check = r["checks"]["tensor_bytes"]
    assert code == 1 and not r["restored"] and not check["ok"]
    # every request admitted after the baseline leaked a page: all but those cancelled before they started
    # (the warm-up admitted one batch of 4 before the baseline)
    admitted = len(leaked) - 4
    assert admitted == 20 - r["cancelled_before_start"]
    assert check["after"] - check["before"] == admitted * TINY_PAGE_BYTES > check["allowed_growth"]


def test_a_page_per_request_exceeds_every_allowance_that_grows_with_requests():
    """At GPU sizes a leaked page per request fails the RSS and GPU figures too: the warm-up term is
    small beside requests x pages. Qwen3-1.7B's geometry in bf16, pages of 16 tokens: 1.75 MiB."""
    page = kv_page_bytes(geometry("qwen3-1.7b", 8192), 16, torch.bfloat16)
    assert page == 16 * 2 * 28 * 8 * 128 * 2 == int(1.75 * MiB)
    assert kv_page_bytes(geometry("qwen3-8b", 8192), 16, torch.bfloat16) == int(2.25 * MiB)
    for requests in (24, 36, 200):
        allowed = memory_allowances(requests, page, torch.device("cuda"))
        assert allowed["gpu_allocated_bytes"] == allowed["gpu_reserved_bytes"] == allowed["tensor_bytes"]
        assert allowed["tensor_bytes"] == requests * page // 4 and allowed["pinned_bytes"] == 0
        assert allowed["rss_bytes"] == RSS_WARM_UP_BYTES["cuda"] + requests * page // 4
        assert all(requests * page > allowed[name] for name in ("rss_bytes", "tensor_bytes", "gpu_allocated_bytes"))
    # on the CPU's tiny pages, RSS alone would pass such a leak below about 1400 requests: the tensor figure catches it
    assert memory_allowances(1000, TINY_PAGE_BYTES, torch.device("cpu"))["rss_bytes"] > 1000 * TINY_PAGE_BYTES


def test_soak_with_a_time_bound_random_context_and_transfer_faults(tmp_path):
    """The device-call options on the CPU: prompts loaded as random KV instead of prefilled, host-store
    transfers failed for one row's pages, and a bound in seconds that cancels what still runs and
    starts no further call; every request that ran is answered, the memory, the mode and Triton's
    kernels are back where they were."""
    code, data = run(tmp_path, "--modes", "herald-cpu", "--random-context", "--transfer-fault-rate", "0.1",
                     "--requests", "300", "--calls", "6", "--seconds", "3", "--seed", "4")
    [r] = data["runs"]
    assert code == 0 and r["restored"], {name: c for name, c in r["checks"].items() if not c["ok"]}
    assert r["transfer_faults_injected"] > 0 and r["error"] >= r["transfer_faults_injected"]
    assert r["deadline_reached"] and r["cancelled_at_deadline"] + r["requests_not_run"] > 0
    assert r["requests"] + r["requests_not_run"] == 300 == sum(c["requests"] for c in r["per_call"]) + r["requests_not_run"]
    assert r["requests"] == r["length"] + r["eos"] + r["cancelled"] + r["error"]
    assert r["checks"]["triton_kernels_settled"]["ok"] and r["checks"]["no_error_but_injected_ones"]["ok"]
    assert r["cancelled_in_flight"] == 0  # no side streams on the CPU: those cancellations never come
    assert data["meta"]["random_context"] and data["meta"]["seconds"] == 3


def test_random_context_loads_the_prompt_instead_of_prefilling_it():
    """RandomContextLoop: the prompt's whole blocks get KV through load_random_context (no prefill
    pass runs), the tail stays for the first block."""
    from benchmarks.soak import SoakEngine
    from runtime.config import EngineConfig
    from runtime.engine import CHECKPOINTS

    engine = SoakEngine(EngineConfig(model_path=str(CHECKPOINTS / "tiny-random"), mode="dense", device="cpu",
                                     progress=False))
    engine.random_context = True
    loaded, passes = [], []
    make_mode = SoakEngine.make_mode

    def make_mode_(self, num_sequences, max_tokens):
        mode = make_mode(self, num_sequences, max_tokens)
        load, plan = mode.load_random_context, mode.plan
        mode.load_random_context = lambda seq_id, n, seed=0: (loaded.append(n), load(seq_id, n, seed))
        mode.plan = lambda batch: (passes.append(batch.phase.value), plan(batch))
        return mode

    engine.make_mode = make_mode_.__get__(engine)
    [result] = engine.generate([[5] * 10], max_new_tokens=4, stop_at_eos=False)
    block = engine.settings.block_size
    assert result.finish_reason == "length" and len(result.tokens) == 4
    assert loaded == [10 // block * block] and "prefill" not in passes and "denoise" in passes
