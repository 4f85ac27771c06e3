"""The recall harness: its metrics on hand-computed cases, the recorder, and a smoke run of main()."""
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.recall import (RecallSettings, analyze, entries_to_mask, main, mass_and_recall,
                               mass_and_recall_per_step, mean_probs, pages_to_tokens, quest_bounds, ranks_of)
from runtime import Engine, EngineConfig
from runtime.config import ModelConfig, RopeConfig, SparseConfig
from runtime.model import Transformer
from training.recording import BlockRecord, record
from training.tasks import generate_examples

TINY = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-random"
VOCAB, MASK, EOS = 48, 47, 46


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and the CI cores are shared: oversubscribed, a
    2-layer toy decode took 9 s instead of 0.05 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mean_probs_hand_computed():
    # one KV head, two query heads (GQA group of 2), one query each; scale 1
    keys = torch.tensor([[[0.0], [math.log(3.0)]]])  # [Hkv=1, L=2, D=1]
    q = torch.tensor([[[1.0]], [[0.0]]])  # [Hq=2, B=1, D=1]: logits (0, ln3) and (0, 0)
    pbar = mean_probs(q, keys, scale=1.0)
    # head 0: softmax(0, ln 3) = (1/4, 3/4); head 1: (1/2, 1/2); mean (3/8, 5/8)
    torch.testing.assert_close(pbar, torch.tensor([[0.375, 0.625]]), rtol=0, atol=1e-6)


def test_selecting_everything_captures_all_mass_and_recall():
    g = torch.Generator().manual_seed(0)
    pbar = torch.softmax(torch.randn(3, 2, 40, generator=g), dim=-1)  # [S, H, L]
    everything = torch.ones(1, 2, 40, dtype=torch.bool)
    mass, recall = mass_and_recall(everything, pbar, ranks_of(pbar))
    torch.testing.assert_close(mass, torch.ones(3, 1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(recall, torch.ones(3, 1, 2), rtol=0, atol=0)
    mass, recall = mass_and_recall_per_step(everything.expand(3, 2, 40), pbar, ranks_of(pbar))
    torch.testing.assert_close(mass, torch.ones(3, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(recall, torch.ones(3, 2), rtol=0, atol=0)


def test_known_distribution_mass_and_recall():
    pbar = torch.tensor([[[0.5, 0.3, 0.1, 0.06, 0.04]]])  # one step, one head
    ranks = ranks_of(pbar)
    assert ranks.tolist() == [[[0, 1, 2, 3, 4]]]
    # selection A = {0, 2}: mass 0.6, oracle top-2 = {0, 1} -> recall 1/2
    # selection B = {1, 3, 4}: mass 0.4, oracle top-3 = {0, 1, 2} -> recall 1/3 (sizes differ per selection)
    masks = torch.tensor([[[True, False, True, False, False]], [[False, True, False, True, True]]])
    mass, recall = mass_and_recall(masks, pbar, ranks)
    torch.testing.assert_close(mass[0, :, 0], torch.tensor([0.6, 0.4]), rtol=0, atol=1e-6)
    torch.testing.assert_close(recall[0, :, 0], torch.tensor([0.5, 1 / 3]), rtol=0, atol=1e-6)
    mass, recall = mass_and_recall_per_step(masks[1:], pbar, ranks)
    assert mass.item() == pytest.approx(0.4) and recall.item() == pytest.approx(1 / 3)


def test_masks_from_entries_and_pages():
    entries = torch.tensor([[[3, 0, -1, -1]]])
    assert entries_to_mask(entries, 5).tolist() == [[[True, False, False, True, False]]]
    pages = torch.tensor([[[False, True, True]]])
    assert pages_to_tokens(pages, 4, 10).tolist() == [[[False] * 4 + [True] * 6]]


def test_quest_bound_is_an_upper_bound_and_exact_for_single_tokens():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 37, 8, generator=g)
    q = torch.randn(3, 2, 8, generator=g)
    bound = quest_bounds(keys, q, 8)  # [S, H, M]
    scores = torch.einsum("shd,hld->shl", q, keys)
    padded = torch.nn.functional.pad(scores, (0, 40 - 37), value=float("-inf")).view(3, 2, 5, 8).amax(-1)
    assert bound.shape == (3, 2, 5)
    assert bool((bound >= padded - 1e-5).all())
    torch.testing.assert_close(quest_bounds(keys, q, 1), scores, rtol=1e-5, atol=1e-5)


def _record(keys: torch.Tensor, queries: list[torch.Tensor], row=0, block=0) -> BlockRecord:
    return BlockRecord(seq_id=row, block=block, context_len=keys.shape[1], keys=[keys],
                       queries=[queries], steps=list(range(len(queries))), row=row)


def _config(layers=1, hq=2, hkv=1, d=16) -> ModelConfig:
    return ModelConfig(architecture="qwen3", vocab_size=VOCAB, hidden_size=hq * d, intermediate_size=64,
                       num_layers=layers, num_heads=hq, num_kv_heads=hkv, head_dim=d, max_position_embeddings=1024,
                       rope=RopeConfig(), mask_token_id=MASK, block_size=4, eos_token_ids=(EOS,))


def test_analyze_hot_tokens_and_constant_queries():
    """Two hot keys that every query attends: a 2-token budget (no sinks, no window) finds both with
    every variant; identical queries at every step give cosine 1 and reuse every page."""
    d, length = 16, 64
    keys = torch.zeros(1, length, d)
    keys[0, 10, 0] = keys[0, 40, 0] = 40.0
    q = torch.zeros(2, 4, d)
    q[..., 0] = 1.0
    rec0 = _record(keys, [q.clone() for _ in range(4)])
    rec1 = _record(keys, [q.clone() for _ in range(4)], block=1)
    settings = RecallSettings(budgets=["2", "100%"], page_sizes=[8], aggregates=["max", "lse"],
                              variants=["mage", "herald-center", "mage-softmax", "herald-int8", "oracle", "quest"],
                              sink_tokens=0, local_window=0, dense_layers=0, compact_group=16)
    out = analyze([rec0, rec1], _config(), steps=4, settings=settings, device="cpu", progress=False)
    rows = {(r["variant"], r["granularity"], r["aggregate"], r["budget"]): r for r in out["rows"]}
    hot = 2 * math.exp(40.0 * 16 ** -0.5)  # the two hot logits are 40 * scale, the other 62 are 0
    for v in ("mage", "herald-center", "mage-softmax", "oracle"):
        r = rows[(v, "token", "-", "2")]
        assert r["recall"] == pytest.approx(1.0)
        assert r["mass"] == pytest.approx(hot / (hot + 62), rel=1e-5)
        assert r["selected_tokens"] == 2
    for r in out["rows"]:
        if r["budget"] == "100%":
            assert r["mass"] == pytest.approx(1.0, abs=1e-6) and r["recall"] == pytest.approx(1.0)
    # pages: budget 2 tokens -> 1 page on top of the forced last page: one hot key and 15 cold ones
    assert rows[("mage", "page8", "max", "2")]["selected_tokens"] == 16
    assert rows[("mage", "page8", "max", "2")]["mass"] == pytest.approx((hot / 2 + 15) / (hot + 62), rel=1e-5)
    assert out["query_cosine"]["mean"] == pytest.approx(1.0)
    assert rows[("mage", "page8", "max", "100%")]["refetch"]["fetched_share"] == 0.0
    assert out["records"] == [{"prompt": 0, "block": 0, "context": length, "steps": 4},
                              {"prompt": 0, "block": 1, "context": length, "steps": 4}]


def _tiny_model(layers=2) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(_config(layers=layers, hq=4, hkv=2, d=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_recorder_captures_every_step_and_layer():
    engine = Engine(EngineConfig(model_path="unused", mode="dense", device="cpu", unmasking="fixed",
                                 attention_backend="torch", max_batch_size=2, prefill_chunk_size=16,
                                 progress=False), model=_tiny_model())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB - 2, (n,), generator=g).tolist() for n in (37, 52, 20)]
    records = record(engine, prompts, blocks=2, progress=False)
    assert [(r.row, r.block) for r in records] == [(i, b) for i in range(3) for b in range(2)]
    for rec in records:
        # fixed schedule, 4 steps: one token per step; the prompt's tail fixes some of the first block
        masked = 4 - len(prompts[rec.row]) % 4 if rec.block == 0 else 4
        assert rec.steps == list(range(masked))
        assert len(rec.keys) == len(rec.queries) == 2
        for layer in range(2):
            assert rec.keys[layer].shape == (2, rec.context_len, 8)
            assert len(rec.queries[layer]) == masked
            assert all(q.shape == (4, 4, 8) for q in rec.queries[layer])
    for i, n in enumerate((37, 52, 20)):
        first, second = records[2 * i], records[2 * i + 1]
        assert first.context_len == n // 4 * 4  # the prompt's whole blocks
        assert second.context_len == first.context_len + 4
        # the context only grows: the first block's keys are the second's prefix
        torch.testing.assert_close(second.keys[1][:, :first.context_len], first.keys[1], rtol=0, atol=0)


def test_main_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "recall.json"
    assert main(["--model", str(TINY), "--context", "256", "--blocks", "2", "--budgets", "64", "10%",
                 "--page-sizes", "8", "16", "--compact-group", "16", "--device", "cpu", "--no-plot",
                 "--no-progress", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"rows", "query_cosine", "records", "settings", "model", "contexts", "notes"} <= set(data)
    # No --split given: the prompt is the test split's first passkey instance (its whole blocks are the
    # first record's context), and the JSON and header say so.
    assert (data["split"], data["prompt_source"]) == ("test", "passkey (test split, seed 1234)")
    prompt = generate_examples("passkey", 256, 1, 1234, split="test")[0].prompt
    assert data["records"][0]["context"] == len(prompt) // data["block_size"] * data["block_size"]
    # tiny-random's 2 layers are both within the default dense_layers (2): the averages cover both, said so
    assert data["averaged_layers"] == [0, 1]
    assert data["notes"] == ["the model has 2 layers, all within dense_layers=2: averages cover every layer"]
    variants = {r["variant"] for r in data["rows"]}
    assert {"mage", "herald-center", "mage-softmax", "herald-int4", "herald-int8", "quest", "oracle"} <= variants
    assert {r["granularity"] for r in data["rows"]} == {"token", "page8", "page16"}
    contexts = [rec["context"] for rec in data["records"]]
    sinks, window = SparseConfig.sink_tokens, SparseConfig.local_window
    for r in data["rows"]:
        # every layer averages the same blocks and steps: the means are the per-layer means' mean
        # (those are rounded to 5 decimals)
        assert r["mass"] == pytest.approx(sum(r["mass_by_layer"]) / 2, abs=1e-5)
        assert r["recall"] == pytest.approx(sum(r["recall_by_layer"]) / 2, abs=1e-5)
        # selected tokens per block over the share of the context: the mean context of the blocks
        assert r["selected_tokens"] / r["selected_share"] == pytest.approx(sum(contexts) / len(contexts))
        if "refetch" in r:
            moved, kept = r["refetch"]["pages_fetched"], r["refetch"]["pages_reused"]
            assert r["refetch"]["fetched_share"] == moved / (moved + kept)
        if r["granularity"] == "token" and r["budget"] == "64":  # the sinks, the window and 64 chosen tokens
            assert r["selected_tokens"] == sinks + window + 64
    # at token level the step oracle (the heaviest tokens of each step) keeps at least any selection of as many
    token = {(r["variant"], r["budget"]): r for r in data["rows"] if r["granularity"] == "token"}
    for (variant, budget), r in token.items():
        assert token[("oracle", budget)]["mass"] >= r["mass"] - 1e-9, (variant, budget)
    assert any("refetch" in r for r in data["rows"])
    assert len(data["query_cosine"]["by_layer_step"]) == 2
    printed = capsys.readouterr().out
    assert "attention mass captured" in printed and "MAGE property" in printed
    assert "from passkey (test split, seed 1234)" in printed.splitlines()[0]


def test_dumps_round_trips_and_keeps_series_on_one_line():
    from benchmarks.recall import dumps

    data = {"a": [1, -2.5e-07, None, True], "rows": [{"s": ["x,  y", "[1, 2]"], "n": [[1, 2], [3]]}], "e": []}
    text = dumps(data)
    assert json.loads(text) == data
    assert '"a": [1, -2.5e-07, null, true]' in text and '"x,  y"' in text
