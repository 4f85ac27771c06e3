"""Named recipes and their side-by-side comparison: every recipe parses into a valid curriculum and a
model small enough to ship, the summary picks the best at the trained length, and
scripts/train_variants.sh trains several at once into complete checkpoint folders."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from runtime.config import ModelConfig
from runtime.model import Transformer
from training.data import Curriculum, make_levels
from training.train import build_parser, make_tokenizer, model_config_dict, task_options, train
from training.variants import DEFAULT_VARIANTS, TARGET, VARIANTS, compare, main, pack, summarize, unpack, variant

REPO = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
        "--intermediate", "64", "--tokens-per-batch", "600", "--eval-every", "0", "--final-per-task", "1"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_recipe_builds_a_curriculum_and_a_model_that_ships(name):
    # The variant's arguments come after scripts/train_gpu.sh's recipe, whose model and context are the
    # parser's defaults (6 layers, hidden 256, 8/4 heads of 32, MLP 768, 2048 tokens).
    args = build_parser().parse_args(["--out", "/nonexistent", "--min-context", "128", *variant(name).args])
    options, warmup = task_options(args)
    levels = make_levels(args.min_context, args.max_context, args.tasks, args.warmup_tasks, options, warmup)
    Curriculum(levels, advance_on=args.advance_on,
               shares=tuple(args.level_shares) if args.level_shares else None)  # shares name every level
    assert levels[-1].context == args.max_context
    assert "--max-context" in variant(name).args or args.max_context == 2048
    cfg = model_config_dict(make_tokenizer(), hidden=args.hidden, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate=args.intermediate,
                            block_size=args.block_size, rope_theta=args.rope_theta, max_context=args.max_context)
    params = sum(p.numel() for p in Transformer(ModelConfig.from_hf(cfg)).parameters())
    if name.startswith("ruler"):  # the long-context model: 64 MB shipped, and it travels to the device beside the repo
        assert 2 * params < 40 * 2**20
    else:  # bf16 weights: under the 20 MB limit and a 16 MiB packed transfer
        assert 2 * params < 15 * 2**20


def test_names_are_checked_and_listed(capsys):
    with pytest.raises(ValueError, match="unknown"):
        variant("nope")
    assert set(DEFAULT_VARIANTS) <= set(VARIANTS) and VARIANTS["baseline"].args == ()
    main(["args", "hops-deep"])
    assert capsys.readouterr().out.split() == list(VARIANTS["hops-deep"].args)
    main(["list"])
    listed = capsys.readouterr().out
    assert all(f"{name}" in listed and VARIANTS[name].changes in listed for name in VARIANTS)


def _tiny_run(work: Path, name: str) -> dict:
    folder = work / name
    folder.mkdir(parents=True)
    args = build_parser().parse_args(["--out", str(folder / "ckpt"), "--summary-json", str(folder / "train_summary.json"),
                                      "--steps", "2", "--max-context", "128", "--final-contexts", "128", *TINY])
    train(args)
    (folder / "train.log").write_text("(the run's console output)\n")
    return json.loads((folder / "train_summary.json").read_text())


def test_the_summary_ranks_by_mean_then_worst_task_and_packs_each_variant(tmp_path, capsys):
    work = tmp_path / "work"
    real = _tiny_run(work, "hops")
    # Two more variants from that real summary with set accuracies, so the ranking is known: b and c
    # tie on the mean, c has the better worst task; a is lower.
    for name, kv, vartrack in (("a", 0.5, 0.5), ("b", 1.0, 0.6), ("c", 0.8, 0.8)):
        folder = work / name
        folder.mkdir()
        acc = {"passkey": {"128": 1.0}, "multikey": {"128": 1.0}, "kv": {"128": kv}, "vartrack": {"128": vartrack}}
        mean = sum(cells["128"] for cells in acc.values()) / 4
        (folder / "train_summary.json").write_text(json.dumps({**real, "accuracy": acc, "mean": {"128": mean}}))
        (folder / "train.log").write_text("")
    (work / "crashed").mkdir()
    (work / "crashed" / "train.log").write_text("Traceback ...\n")
    result = compare(work)
    assert result["ranking"][:3] == ["c", "b", "a"] and result["best"] == "c"
    crashed = next(r for r in result["variants"] if r["name"] == "crashed")
    assert "failed before its first snapshot" in crashed["status"] and "crashed" not in result["ranking"]
    c = next(r for r in result["variants"] if r["name"] == "c")
    assert c["mean_at_length"] == pytest.approx(0.9) and c["min_at_length"] == 0.8 and not c["reaches_target"]
    assert c["compared_at"] == c["trained_length"] == 128 and TARGET == 0.95

    packed = tmp_path / "packed"
    summarize(work, ["hops", "c", "crashed"], pack_to=packed)
    printed = capsys.readouterr().out
    assert "best: c (mean 0.900" in printed and "| hops |" in printed and "| crashed |" in printed
    assert sorted(p.name for p in packed.iterdir()) == ["c.tar", "crashed.tar", "hops.tar", "variants_summary.json",
                                                        "variants_summary.md"]
    with tarfile.open(packed / "hops.tar") as tar:
        names = set(tar.getnames())
    assert {"hops/train.log", "hops/train_summary.json", "hops/ckpt/model.safetensors", "hops/ckpt/config.json",
            "hops/ckpt/tokenizer.json", "hops/ckpt/README.md", "hops/ckpt/demo_prompts.json"} <= names
    assert json.loads((work / "variants_summary.json").read_text())["best"] == "c"
    with pytest.raises(ValueError, match="no variant folders"):
        compare(tmp_path / "packed")


def test_pack_leaves_out_half_written_saves(tmp_path):
    folder = tmp_path / "v"
    (folder / "ckpt.saving").mkdir(parents=True)
    (folder / "ckpt.saving" / "model.safetensors").write_text("partial")
    (folder / "train.log").write_text("log")
    [packed] = pack(tmp_path, "v", tmp_path)
    with tarfile.open(packed) as tar:
        assert tar.getnames() == ["v/train.log"]


def test_a_large_pack_is_cut_into_parts_that_unpack_to_the_same_files(tmp_path):
    folder = tmp_path / "work" / "v"
    (folder / "ckpt").mkdir(parents=True)
    weights = os.urandom(50_000)
    (folder / "ckpt" / "model.safetensors").write_bytes(weights)
    (folder / "train.log").write_text("log")
    parts = pack(tmp_path / "work", "v", tmp_path / "out", part_bytes=16_384)
    assert [p.name for p in parts] == [f"v.tar.part-{i:03d}" for i in range(len(parts))] and len(parts) >= 4
    assert all(p.stat().st_size <= 16_384 for p in parts) and not (tmp_path / "out" / "v.tar").exists()
    restored = unpack(tmp_path / "out", "v", tmp_path / "back")
    assert (restored / "ckpt" / "model.safetensors").read_bytes() == weights
    assert (restored / "train.log").read_text() == "log"
    with pytest.raises(FileNotFoundError, match="v2.tar.part"):
        unpack(tmp_path / "out", "v2", tmp_path / "back")


def test_the_script_trains_variants_side_by_side_into_complete_checkpoints(tmp_path):
    work, packed = tmp_path / "work", tmp_path / "packed"
    env = {**os.environ, "PYTHON": sys.executable, "PACK_TO": str(packed)}
    # Paced by steps (the hop recipe's shares name its 7 levels up to 2048 tokens); tiny models on the CPU.
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "train_variants.sh"), str(work), "3", "baseline", "hops", "--",
         "--steps", "3", *TINY, "--data-workers", "0", "--final-contexts", "128", "--save-every", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "baseline: finished" in proc.stdout and "hops: finished" in proc.stdout and "best: " in proc.stdout
    for name in ("baseline", "hops"):
        ckpt = work / name / "ckpt"
        assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_config.json", "special_tokens_map.json",
                                                    "README.md", "training_log.json", "demo_prompts.json"}
        summary = json.loads((work / name / "train_summary.json").read_text())
        assert summary["finished"] and summary["steps"] == 3 and "[final eval]" in (work / name / "train.log").read_text()
    hops_log = json.loads((work / "hops" / "ckpt" / "training_log.json").read_text())
    assert hops_log["args"]["vartrack_any_query"] == 0.5 and len(hops_log["levels"]) == 7
    assert json.loads((work / "baseline" / "ckpt" / "training_log.json").read_text())["args"]["vartrack_any_query"] == 0
    assert sorted(p.name for p in packed.iterdir()) == ["baseline.tar", "hops.tar", "variants_summary.json",
                                                        "variants_summary.md"]
