"""Training matches inference: the training forward's logits at a noisy answer block are the
runtime's cached DENOISE logits for the same block over the same committed context."""
import json
import re
import time

import numpy as np
import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.attention import DenseAttention, MaskedAttention, Phase, block_diffusion_mask
from runtime.checkpoint import load_model
from runtime.config import ModelConfig
from runtime.decoding import DecodeSettings, GenerationRequest, SequenceState, finish_block, start_block
from runtime.generate import BlockDiffusionLoop
from runtime.model import Transformer
from training.tasks import RULER_TASKS, TASKS, TaskOptions, generate_examples
from training.train import (CLEAN, NOISY, PAD, CharEncoder, _apply_device_defaults, batch_loss, build_batch,
                            build_parser, curriculum, demo_tasks, lr_at, make_tokenizer, model_config_dict, stage_at,
                            task_options, train)

TOKENIZER = make_tokenizer()
MASK = TOKENIZER.mask_token_id
EOS = TOKENIZER.eos_token_ids[0]


def tiny_model(block_size: int, dtype=torch.float64, seed=0, std=0.3) -> Transformer:
    cfg = model_config_dict(TOKENIZER, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=64,
                            block_size=block_size, rope_theta=10000.0, max_context=256)
    model = Transformer(ModelConfig.from_hf(cfg))
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))  # sharp: logits differ clearly
    return model.to(dtype)


def random_pairs(prompt_lens, answer_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    hi = TOKENIZER.vocab_size
    return [(torch.randint(5, hi, (p,), generator=g).tolist(), torch.randint(5, hi, (a,), generator=g).tolist())
            for p, a in zip(prompt_lens, answer_lens)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def inference_logits(model, prompt, clean, noisy_blocks, block_size):
    """DENOISE logits of each noisy block over a KV cache of the committed prefix (prefill + commits).

    noisy_blocks: {block start: [copies of the block's token ids]}; returns {(start, copy): [B, V]}.
    """
    b = block_size
    settings = DecodeSettings(block_size=b, steps=b, unmasking="fixed", threshold=0.9, mask_token_id=MASK,
                              eos_token_ids=(EOS,), prompt_causal=False)
    seq = SequenceState(0, GenerationRequest(prompt=prompt, max_new_tokens=len(clean) - len(prompt) + b),
                        list(prompt), b, torch.Generator())
    mode = DenseAttention(model.config, 1, seq.max_tokens, page_size=4, dtype=torch.float64,
                          device=torch.device("cpu"), backend="torch")
    loop = BlockDiffusionLoop(model, mode, settings, 1, 8, torch.device("cpu"))
    mode.add_sequence(0, seq.max_tokens)
    out = {}
    with torch.no_grad():
        loop.prefill(seq)
        for start in sorted(noisy_blocks):
            start_block(seq, settings)
            assert seq.context_len == start
            fixed = ~seq.masked  # the prompt tail the engine fixes inside the first generated block
            for c, noisy in enumerate(noisy_blocks[start]):
                assert torch.equal(noisy[fixed], seq.block[fixed]), "training must keep the prompt tail clean"
                seq.block = noisy.clone()
                out[start, c] = loop._forward(Phase.DENOISE, [seq], seq.block[None], b)[0]
            seq.block = torch.tensor(clean[start:start + b])
            seq.masked[:] = False
            loop._forward(Phase.COMMIT, [seq], seq.block[None], b)
            finish_block(seq, settings)
    return out


@pytest.mark.parametrize("block_size", [4, 8])
def test_training_logits_equal_cached_denoise_logits(block_size):
    model = tiny_model(block_size)
    # prompt lengths at every offset inside a block, answers spanning one to three blocks
    pairs = random_pairs([21, 24, 30, 33], [5, 6, 11, 2], seed=block_size)
    batch = build_batch(pairs, block_size=block_size, mask_token_id=MASK, eos_token_id=EOS, noisy_copies=2,
                        generator=np.random.default_rng(1), pad_multiple=16)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.positions, MaskedAttention(batch.mask))
    compared = 0
    for i, (prompt, answer) in enumerate(pairs):
        noisy = (batch.kind[i] == NOISY).nonzero().squeeze(1)
        clean_len = int((batch.kind[i] == CLEAN).sum())
        clean = batch.input_ids[i, :clean_len].tolist()
        assert clean[:len(prompt) + len(answer) + 1] == prompt + answer + [EOS] and set(clean[len(prompt) + len(answer):]) == {EOS}
        blocks: dict[int, list[torch.Tensor]] = {}
        where: dict[tuple[int, int], torch.Tensor] = {}
        for c in range(2):
            idx = noisy[batch.copy_id[i, noisy] == c]
            for start in range(len(prompt) // block_size * block_size, clean_len, block_size):
                sel = idx[batch.positions[i, idx] // block_size == start // block_size]
                assert batch.positions[i, sel].tolist() == list(range(start, start + block_size))
                blocks.setdefault(start, []).append(batch.input_ids[i, sel])
                where[start, c] = sel
        expected = inference_logits(model, prompt, clean, blocks, block_size)
        for key, sel in where.items():
            err = rel_err(logits[i, sel], expected[key])
            assert err < 1e-5, (i, key, err)  # fp64: in practice ~1e-15
            compared += 1
    assert compared >= 2 * 4
    # the clean part is plain block-causal (the runtime's Qwen3 prompt attention)
    n = int((batch.kind[0] == CLEAN).sum())
    assert torch.equal(batch.mask[0, :n, :n], block_diffusion_mask(n, 0, block_size, prompt_causal=False))


def test_batch_layout_and_masking():
    pairs = random_pairs([10, 17], [6, 5])
    batch = build_batch(pairs, block_size=4, mask_token_id=MASK, eos_token_id=EOS, noisy_copies=3,
                        generator=np.random.default_rng(0), pad_multiple=8)
    assert batch.input_ids.shape[1] % 8 == 0
    for i, (prompt, answer) in enumerate(pairs):
        noisy = batch.kind[i] == NOISY
        masked = batch.input_ids[i] == MASK
        assert torch.equal(masked, batch.targets[i] != -100)  # loss exactly on the masked positions
        assert (batch.positions[i][masked] >= len(prompt)).all()  # prompt positions are never masked
        assert not masked[batch.kind[i] != NOISY].any()
        for c in range(3):
            assert masked[noisy & (batch.copy_id[i] == c)].any()  # at least one masked per copy
        clean = batch.input_ids[i, batch.kind[i] == CLEAN]
        assert torch.equal(batch.targets[i][masked], clean[batch.positions[i][masked]])
    pad = batch.kind == PAD
    assert pad.any() and not batch.mask.transpose(1, 2)[pad].sum(-1).gt(1).any()  # nothing but itself sees padding
    with pytest.raises(ValueError, match="noisy_copies"):
        build_batch(pairs, block_size=4, mask_token_id=MASK, eos_token_id=EOS, noisy_copies=0,
                    generator=np.random.default_rng(0))


def test_mask_rate_follows_t():
    pairs = random_pairs([40] * 400, [40] * 400)
    batch = build_batch(pairs, block_size=4, mask_token_id=MASK, eos_token_id=EOS, noisy_copies=1,
                        generator=np.random.default_rng(0))
    rate = batch.masked_tokens / (400 * 41)  # answer + EOS positions; E[t] ~ 0.5
    assert 0.4 < rate < 0.6


def test_char_encoder_matches_tokenizer():
    enc = CharEncoder(TOKENIZER)
    text = generate_examples("kv", 400, 1, seed=0, split="test")[0].prompt
    assert enc(text) == TOKENIZER.encode(text)
    with pytest.raises(ValueError, match="alphabet"):
        enc("tab\there")


def test_schedules():
    assert curriculum(256, 2048) == [256, 512, 1024, 2048] and curriculum(256, 256) == [256]
    assert curriculum(256, 1500) == [256, 512, 1024, 1500]
    assert [stage_at(p, 4, 0.6) for p in (0.0, 0.19, 0.21, 0.45, 0.6, 0.99)] == [0, 0, 1, 2, 3, 3]
    assert lr_at(0.0, 1.0, 0.1, 0.1) < 0.01 and lr_at(0.1, 1.0, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_at(1.0, 1.0, 0.1, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("weighting", ["none", "inv_t"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(weighting):
    torch.manual_seed(0)
    model = tiny_model(4, dtype=torch.float32, std=0.02).train()
    enc = CharEncoder(TOKENIZER)
    examples = [ex for task in ("passkey", "kv") for ex in generate_examples(task, 192, 3, seed=0, split="train")]
    batch = build_batch([(enc(e.prompt), enc(e.answer)) for e in examples], block_size=4, mask_token_id=MASK,
                        eos_token_id=EOS, noisy_copies=2, generator=np.random.default_rng(0),
                        loss_weighting=weighting)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = batch_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_saves_a_checkpoint_the_engine_runs(tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = build_parser().parse_args([
        "--out", str(out), "--steps", "4", "--device", "cpu", "--max-context", "192", "--hidden", "32",
        "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--intermediate", "64",
        "--tokens-per-batch", "600", "--log-every", "2", "--final-per-task", "2", "--eval-every", "0"])
    log = train(args)
    printed = capsys.readouterr().out
    assert "tokens_per_s" in printed and "[final eval]" in printed
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_log.json", "README.md",
            "demo_prompts.json"} <= names
    assert sum(f.stat().st_size for f in out.iterdir()) < 20 * 2**20
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["torch_dtype"] == "bfloat16" and cfg["block_size"] == 4
    assert cfg["mask_token_id"] == MASK and cfg["eos_token_id"] == EOS
    assert cfg["original_max_position_embeddings"] == 192 and cfg["max_position_embeddings"] == 4 * 192
    saved = json.loads((out / "training_log.json").read_text())
    assert saved["steps"] == log["steps"] == 4 and len(saved["loss"]) == 2
    assert set(saved["final_eval"]["accuracy"]) == {"passkey", "multikey", "kv", "vartrack"}
    assert saved["final_eval"]["contexts"] == [128, 192, 384]  # the curriculum's contexts and 2x the max
    # The final evaluation (and the README's table) is a training-time measure: the validation split,
    # example by example, never the test split that reported numbers come from.
    final = saved["final_eval"]
    assert (final["split"], final["seed"]) == ("validation", 1234) and saved["summary"]["split"] == "validation"
    for sample in final["samples"]:
        first = generate_examples(sample["task"], sample["context"], 1, 1234, split="validation")[0]
        assert (sample["prompt_tail"], sample["answer"]) == (first.prompt[-80:], first.answer)
    assert "validation split seed 1234" in (out / "README.md").read_text()
    model, config = load_model(out)
    assert model.dtype == torch.bfloat16 and config.block_size == 4
    engine = Engine(EngineConfig(model_path=str(out), device="cpu", progress=False))
    prompt = json.loads((out / "demo_prompts.json").read_text())[0]["prompt"]
    result = engine.generate([prompt], max_new_tokens=8)[0]
    # 4 steps teach little beyond "EOS is common": any finished generation is fine here
    assert result.finish_reason in ("eos", "length") and len(result.tokens) <= 8
    assert result.blocks >= 1 and result.denoising_passes >= 1


def test_init_from_continues_a_checkpoint_and_refuses_another_architecture(tmp_path):
    first = tmp_path / "first"
    train(build_parser().parse_args(["--out", str(first), "--steps", "2", "--eval-every", "0", "--final-per-task", "1",
                                     "--final-contexts", "128", *TINY_ARGS]))
    start, _ = load_model(first, dtype=torch.float32)
    # one step at learning rate 0: the second run saves exactly the weights it started from
    second = tmp_path / "second"
    log = train(build_parser().parse_args(["--out", str(second), "--steps", "1", "--lr", "0", "--eval-every", "0",
                                           "--final-per-task", "1", "--final-contexts", "128", "--init-from",
                                           str(first), *TINY_ARGS]))
    assert log["args"]["init_from"] == str(first)
    again, _ = load_model(second, dtype=torch.float32)
    for (name, a), (_, b) in zip(start.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    wider = [a if a != "32" else "64" for a in TINY_ARGS]  # --hidden 64
    with pytest.raises(ValueError, match="hidden_size: checkpoint 32, flags 64"):
        train(build_parser().parse_args(["--out", str(tmp_path / "third"), "--steps", "1", "--init-from", str(first),
                                         *wider]))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train(build_parser().parse_args(["--out", str(tmp_path / "fourth"), "--steps", "1", "--init-from",
                                         str(tmp_path), *TINY_ARGS]))


def test_help_and_missing_end():
    assert "--minutes" in build_parser().format_help()
    args = build_parser().parse_args(["--out", "/nonexistent/never-written", "--device", "cpu"])
    with pytest.raises(ValueError, match="--steps"):
        train(args)
    for end in (["--steps", "0"], ["--minutes", "0"]):  # an end that never comes, or comes at once
        args = build_parser().parse_args(["--out", "/nonexistent/never-written", "--device", "cpu", *end])
        with pytest.raises(ValueError, match="at least one step"):
            train(args)


TINY_ARGS = ["--device", "cpu", "--max-context", "192", "--hidden", "32", "--layers", "2", "--heads", "4",
             "--kv-heads", "2", "--head-dim", "8", "--intermediate", "64", "--tokens-per-batch", "600"]


def test_minutes_bound_the_whole_run_and_the_summary_says_what_happened(tmp_path, capsys):
    out, summary_path = tmp_path / "ckpt", tmp_path / "summary.json"
    budget_s, reserve_s = 12.0, 5.0
    args = build_parser().parse_args([
        "--out", str(out), "--summary-json", str(summary_path), "--minutes", str(budget_s / 60),
        "--final-eval-seconds", str(reserve_s), "--eval-every", "1", "--eval-per-task", "1", "--save-every", "2",
        "--final-per-task", "1", "--log-every", "10", *TINY_ARGS])
    t0 = time.perf_counter()
    log = train(args)
    assert time.perf_counter() - t0 < budget_s + 8  # + model build and the first smoke eval, before the clock
    summary = json.loads(summary_path.read_text())
    # Training stops reserve_s early for the final save + eval (a step or an eval estimated to fit may
    # run over a little, more on a busy machine); the final eval's first context always runs, the rest
    # only if they fit.
    assert summary["finished"] and summary["total_wall_s"] <= budget_s + 3.0
    assert summary["steps"] == log["steps"] > 0 and summary["params"] == log["params"]
    assert summary["train_wall_s"] <= budget_s - reserve_s + 2.5 < budget_s
    assert set(summary["accuracy"]) == set(TASKS) and 192 in summary["contexts"]  # the trained length comes first
    assert summary["contexts"] + summary["skipped_contexts"] and "task \\ context" in summary["table"]
    assert summary["examples"] > 0 and summary["trained_max_context"] in (128, 192)
    assert len(log["snapshots"]) >= 2 and log["evals"]  # (periodic snapshots, if they fitted) + the two final saves
    printed = capsys.readouterr().out
    # the level shown first is 0, or a later one where a slow machine spent the training budget before it
    assert "[final eval]" in printed and re.search(r"\[level [012]/2\]", printed), printed
    saved = json.loads((out / "training_log.json").read_text())
    assert saved["summary"]["finished"] and {"config.json", "model.safetensors", "demo_prompts.json"} <= {
        f.name for f in out.iterdir()}
    assert not (tmp_path / "ckpt.saving").exists() and not (tmp_path / "ckpt.old").exists()
    demos = json.loads((out / "demo_prompts.json").read_text())
    assert all(d["context"] == 192 and len(d["prompt"]) + len(d["answer"]) + 1 <= 192 for d in demos)
    assert demos[0]["prompt"] not in {e.prompt for split in ("validation", "test")
                                      for e in generate_examples(demos[0]["task"], 192, 64, seed=1234, split=split)}


def test_out_folder_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    args = build_parser().parse_args(["--out", str(tmp_path), "--steps", "1", *TINY_ARGS])
    with pytest.raises(ValueError, match="did not write"):
        train(args)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_flex_attention_is_refused_where_it_cannot_train(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path / "x"), "--steps", "1", *TINY_ARGS, "--attention", "flex"])
    with pytest.raises(ValueError, match="--attention flex trains on CUDA only"):
        train(args)


def test_a_snapshot_at_every_save_interval_leaves_a_loadable_folder(tmp_path):
    out = tmp_path / "ckpt"
    args = build_parser().parse_args(["--out", str(out), "--steps", "3", "--save-every", "1e-6", "--eval-every", "0",
                                      "--final-per-task", "1", "--final-contexts", "128", *TINY_ARGS])
    log = train(args)
    assert [s["step"] for s in log["snapshots"]] == [1, 2, 3, 3, 3]  # each step, then before and after the final eval
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written folder left behind
    model, config = load_model(out)
    assert config.block_size == 4 and json.loads((out / "training_log.json").read_text())["summary"]["finished"]


def test_task_variations_shares_and_the_mean_rule_reach_the_run(tmp_path):
    out = tmp_path / "ckpt"
    args = build_parser().parse_args([
        "--out", str(out), "--steps", "4", "--eval-every", "0", "--final-per-task", "1", "--final-contexts", "128",
        "--vartrack-any-query", "0.5", "--vartrack-warmup-chain", "1", "2", "--kv-near-miss", "0.25",
        "--level-shares", "1", "1", "1", "2", "--advance-on", "mean", *TINY_ARGS])
    options, warmup = task_options(args)
    assert options == TaskOptions(vartrack_any_query=0.5, kv_near_miss=0.25)
    assert warmup == TaskOptions(vartrack_chain=(1, 2), vartrack_any_query=0.5, kv_near_miss=0.25)
    log = train(args)
    assert [lv["context"] for lv in log["levels"]] == [128, 128, 128, 192]
    assert "options" not in log["levels"][0]  # the pass-key warm-up: the variations touch no pass-key prompt
    assert log["levels"][1]["options"] == "vartrack chain 1-2, vartrack any-name questions 0.5, kv near-miss keys 0.25"
    assert "chain" not in log["levels"][3]["options"] and "any-name" in log["levels"][3]["options"]
    readme = (out / "README.md").read_text()
    assert "the mean over its tasks" in readme and "20%/20%/20%/40%" in readme and "unvaried tasks" in readme
    # 4 steps over shares 1/1/1/2: the floor enters level 3 at 60% of the steps
    assert [h["level"] for h in log["summary"]["level_history"]] == [1, 2, 3]
    assert [h["step"] for h in log["summary"]["level_history"]] == [1, 2, 3]


def test_default_arguments_keep_the_shipped_recipe(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path / "x")])
    options, warmup = task_options(args)
    assert options == TaskOptions() and warmup is None
    assert args.advance_on == "all" and args.level_shares is None


def test_level_shares_must_name_every_level(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path / "ckpt"), "--steps", "1", "--level-shares", "1", "2",
                                      *TINY_ARGS])
    with pytest.raises(ValueError, match="one per level"):
        train(args)
    assert not (tmp_path / "ckpt").exists()


def test_a_run_mixes_ruler_tasks_from_the_context_they_fit(tmp_path):
    """--tasks takes RULER's names and groups; the curriculum takes each task in where it fits, and the
    checkpoint's README, demo prompts and final evaluation name what was trained."""
    args = build_parser().parse_args(["--out", str(tmp_path / "x"), "--tasks", "ruler"])
    _apply_device_defaults(args, torch.device("cpu"))
    assert args.tasks == list(RULER_TASKS) and args.min_context == 256  # the shortest context a RULER task fits
    args = build_parser().parse_args(["--out", str(tmp_path / "x"), "--tasks", "vt", "cwe", "--max-context", "384"])
    _apply_device_defaults(args, torch.device("cpu"))
    assert args.min_context == 384  # never past --max-context (the levels then refuse tasks that never fit)
    assert demo_tasks(["cwe", "vt", "fwe", "niah_single_1"]) == ("cwe", "vt", "fwe") and demo_tasks(TASKS) == (
        "passkey", "kv", "vartrack")
    out = tmp_path / "ckpt"
    tiny = [a if a != "192" else "512" for a in TINY_ARGS]  # --max-context 512
    log = train(build_parser().parse_args([
        "--out", str(out), "--steps", "3", "--eval-every", "0", "--final-per-task", "1", "--final-contexts", "128",
        "512", "--tasks", "passkey", "niah_single_1", "vt", "--level-shares", "1", "1", "1", *tiny]))
    assert [(lv["context"], lv["tasks"]) for lv in log["levels"]] == [
        (128, ["passkey"]), (256, ["passkey", "niah_single_1"]), (512, ["passkey", "niah_single_1", "vt"])]
    assert log["summary"]["contexts"] == [512] and set(log["summary"]["accuracy"]) == {"passkey", "niah_single_1", "vt"}
    readme = (out / "README.md").read_text()
    assert "Trained on passkey, niah_single_1, vt." in readme and "`niah_single_1`, `vt`" in readme
    assert [d["task"] for d in json.loads((out / "demo_prompts.json").read_text())] == ["passkey"]
