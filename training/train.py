"""Block-diffusion supervised training of the project's small retrieval model (SDAR / BD3-LM style).

    python -m training.train --minutes 9 --out checkpoints/retrieval-qwen3 --summary-json /tmp/summary.json
    python -m training.train --steps 20 --max-context 256 --device cpu --out /tmp/x   # smoke run

What a training row looks like and how the curriculum moves: training/data.py. A noisy answer
block sees the clean positions before its block start and itself (bidirectionally), and takes the
absolute positions of its clean counterpart: exactly what a DENOISE pass of
runtime.generate.BlockDiffusionLoop sees over a committed KV cache (tests/training/test_train.py
checks the logits agree to 1e-5 in fp64). Noisy copies never see each other, so several of them
cost a few extra tokens and multiply the supervised positions. Prompt positions inside the first
answer block stay clean, because at inference the prompt's tail is fixed inside the first
generated block.

Loss: cross-entropy on the masked positions of the noisy copies, averaged over them (default), or
weighted by 1/t and normalised by the number of maskable positions (`--loss-weighting inv_t`, the
MDLM/LLaDA estimator; noisier on tiny answers, hence not the default).

Why this recipe (measured on a CPU with 0.4-0.8M-parameter models, exact match on held-out
examples): retrieval is learnt from the number of examples, and far sooner where the facts are not
diluted in filler. The pass key alone (2 layers) is learnt after ~1500 steps of 8 examples at 192
tokens, ~500 steps of 32 (about the same number of examples), ~400 steps of 8 at 112 tokens. The
four tasks mixed from the first step learn nothing in 2500 steps of 16 at 128 tokens; after a
pass-key warm-up (4 layers: 0.97 at step 279) the others rise: at 128 tokens, 16 per step,
multikey 0.94 / kv 0.66 / vartrack 0.25 after 5000 steps, 1.00 / 0.91 / 0.44 after 10000. Positions
do not generalise (0% at 256 tokens for that model) but adapt fast once trained on (800 examples
at 256: pass key 0.75, multikey 0.81, kv 0.56). So the run starts with the pass key at the
shortest context, many examples per step, and doubles the context once the validation accuracy says
the tasks are learnt, or when the time floor says so: every length up to the longest is trained.

Variable tracking needed more than that. Asked for a bare number, it was a composition of 1-2
lookups in one pass (the 4.75M model trained as above: 0.44-0.59 at every length, the distractor's
number about as often as the right one), and supervising the single lookup (`--vartrack-any-query`:
questions about any name, 0-2 indirections; `--vartrack-warmup-chain`: a level of short chains
first) did not teach it either (0.33-0.59). Its answer is now worked (training/tasks.py:
`RTE = MPL = QXJ = 48213`): each step is the cloze lookup the other tasks ask, and the 6.3M
default model answers it 0.98 at 2048 tokens. `--level-shares` shapes the time floor (more time
where skills are learnt and at the trained length); training/variants.py names the recipes compared.

Evaluations: every evaluation this module runs (the periodic ones that move the curriculum and
weight the tasks, and the final one written to the summary and README) draws the validation split
of training/tasks.py, the instances training's decisions are taken on; reported numbers come from
`training.evaluate` and the benchmarks, on the test split no decision here saw.

Time: `--minutes` bounds the whole run. Training stops `--final-eval-seconds` before the end; the
checkpoint is saved, then the final evaluation runs contexts (the trained length first) while they
fit. A snapshot is also saved every `--save-every` seconds, so a killed run still leaves a model.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from runtime.checkpoint import load_model, save_checkpoint
from runtime.config import EngineConfig, ModelConfig
from runtime.engine import Engine, resolve_device
from runtime.model import Transformer
from runtime.tokenizer import (EOS_TOKEN, MASK_TOKEN, UNK_TOKEN, Tokenizer, build_char_tokenizer,
                               hf_tokenizer_config)
from training.attention import TRAINING_ATTENTION, attention_for
from training.data import (ADVANCE_RULES, CLEAN, NOISY, PAD, BatchRequest, BatchSource, CharEncoder, Curriculum,
                           LayoutSettings, Level, TrainBatch, build_batch, doubling_contexts, layout_batch,
                           make_levels, stage_at, to_device, training_mask)
from training.evaluate import accuracy_table, add_tasks_argument, evaluate
from training.tasks import MIN_LENGTH, MIN_LENGTHS, RULER_TASKS, TASKS, TaskOptions, generate_examples

# Defaults that depend on the device: a CPU smoke run must finish in well under a minute.
GPU_DEFAULTS = {"tokens_per_batch": 16384, "eval_per_task": 32, "final_per_task": 64, "data_workers": 4,
                "eval_every": 15.0}
CPU_DEFAULTS = {"tokens_per_batch": 2048, "eval_per_task": 8, "final_per_task": 4, "data_workers": 0,
                "eval_every": 30.0}
# Files a checkpoint folder written by this module holds; --out may only be a folder of these.
OWN_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "training_log.json", "README.md", "demo_prompts.json"}


# ----------------------------------------------------------------------------- model and tokenizer

def make_tokenizer() -> Tokenizer:
    """The project's character tokenizer (101 ids) with eos/pad/mask named, as checkpoints store it."""
    backend = build_char_tokenizer()
    return Tokenizer(backend, hf_tokenizer_config(backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                                  mask_token=MASK_TOKEN, unk_token=UNK_TOKEN))


def model_config_dict(tokenizer: Tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                      intermediate: int, block_size: int, rope_theta: float, max_context: int,
                      position_factor: int = 4, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json of the trained model (Hugging Face Qwen3 field names plus the block-diffusion ones).

    max_position_embeddings = position_factor x the trained context, so longer-context tests can run;
    the trained length is recorded as `original_max_position_embeddings` / `training_context_length`
    for a later YaRN rope_scaling entry.
    """
    eos, mask = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(MASK_TOKEN)
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": position_factor * max_context,
        "original_max_position_embeddings": max_context,
        "training_context_length": max_context,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "mask_token_id": mask,
        "block_size": block_size,
        "torch_dtype": torch_dtype,
    }


def batch_loss(model: Transformer, batch: TrainBatch, attention: str = "auto") -> torch.Tensor:
    """Weighted mean cross-entropy over the masked positions of the noisy copies (a scalar).

    `attention`: training/attention.py's choice (dense mask, or flex attention on CUDA). Computed
    over every position with ignore_index, not by boolean selection, so the step never waits for
    the GPU (selection would need the count on the host).
    """
    logits = model(batch.input_ids, batch.positions, attention_for(batch, attention))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100,
                         reduction="none")
    w = batch.weights.flatten()
    return (ce * w).sum() / w.sum()


# ----------------------------------------------------------------------------- schedules

# config.json fields that fix the parameters' shapes and meaning (the context length may change)
_ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "block_size", "rope_theta", "mask_token_id",
                        "tie_word_embeddings")


def load_initial_weights(model: Transformer, cfg: dict[str, Any], path: Path) -> None:
    """Copy a saved checkpoint's weights (fp32) into `model`, whose config.json would be `cfg`.

    Refuses, naming every difference, a checkpoint whose architecture differs from what the flags
    build: the run would otherwise train a model other than the one its flags describe."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"--init-from {path}: no config.json there; give a folder this trainer wrote")
    theirs = json.loads(config_file.read_text())
    diff = [f"{name}: checkpoint {theirs.get(name)!r}, flags {cfg[name]!r}" for name in _ARCHITECTURE_FIELDS
            if theirs.get(name) != cfg[name]]
    if diff:
        raise ValueError(f"--init-from {path} is not the model these flags build ({'; '.join(diff)}): pass the "
                         "checkpoint's model flags (its config.json and training_log.json list them) or drop --init-from")
    loaded, _ = load_model(path, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)


def curriculum(min_context: int, max_context: int) -> list[int]:
    """Context lengths doubling from min to max (max always included)."""
    return doubling_contexts(min_context, max_context)


def lr_at(progress: float, base_lr: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine down to min_ratio * base_lr."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 1e-3)
    frac = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ----------------------------------------------------------------------------- evaluation and saving

def inference_engine(model: Transformer, tokenizer: Tokenizer, device: torch.device, *, max_batch_size: int,
                     attention_backend: str = "auto") -> Engine:
    """An Engine over a detached inference copy of `model`, in the dtype the checkpoint ships (bf16 on
    CUDA; fp32 on CPU, as the engine's dtype="auto" would load it)."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    copy_ = copy.deepcopy(model).to(getattr(torch, dtype)).eval().requires_grad_(False)
    # fused_layers off: evaluations during training use the reference layer path, so a checkpoint's
    # numbers never depend on a kernel under test elsewhere
    config = EngineConfig(model_path="<in-memory model>", mode="dense", device=str(device), dtype=dtype,
                          attention_backend=attention_backend, max_batch_size=max_batch_size, progress=False,
                          fused_layers=False)
    return Engine(config, model=copy_, tokenizer=tokenizer)


def quick_eval(model: Transformer, tokenizer: Tokenizer, device: torch.device, args: argparse.Namespace,
               contexts: list[int], per_task: int, tasks: list[str] | None = None,
               deadline: float | None = None) -> dict[str, Any]:
    """Exact-match accuracy of the model as it is now on the validation split (training/evaluate.py on the
    dense engine): what training's decisions are taken on, never a reported number."""
    was_training = model.training
    engine = inference_engine(model, tokenizer, device, max_batch_size=args.eval_batch,
                              attention_backend=args.eval_backend)
    result = evaluate(engine, tasks or args.tasks, contexts, per_task, args.validation_seed, split="validation",
                      deadline=deadline)
    model.train(was_training)
    return result


def check_out_folder(out: Path) -> None:
    """--out is replaced wholesale by each save: refuse a folder holding anything this module did not write."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise ValueError(f"--out {out} holds files this trainer did not write ({foreign[:5]}); "
                             "give an empty or new folder")


def save_folder(model: Transformer, cfg: dict[str, Any], out: Path, tokenizer: Tokenizer,
                files: dict[str, str]) -> None:
    """Write the checkpoint (bf16 weights + config + tokenizer) and `files` (name -> text) to `out`,
    replacing it only once the new folder is complete, so a run killed mid-save keeps the last one."""
    out = Path(out)
    fresh, old = out.with_name(out.name + ".saving"), out.with_name(out.name + ".old")
    for leftover in (fresh, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    shipped = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    save_checkpoint(shipped, cfg, fresh, tokenizer)
    for name, text in files.items():
        (fresh / name).write_text(text)
    if out.exists():
        out.rename(old)
    fresh.rename(out)
    if old.exists():
        shutil.rmtree(old)


def demo_prompts(context: int, tasks: Sequence[str] = ("passkey", "kv", "vartrack")) -> list[dict[str, Any]]:
    """Long-context demo prompts at the trained length, from the demo split (training/tasks.py), which
    no training, evaluation or benchmark draws."""
    out = []
    for task in tasks:
        ex = generate_examples(task, context, 1, seed=0, split="demo")[0]
        out.append({"task": task, "context": context, "prompt": ex.prompt, "answer": ex.answer})
    return out


def demo_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The tasks a checkpoint's demo prompts show: passkey, kv and vartrack where trained, else the first
    three trained."""
    shown = tuple(t for t in ("passkey", "kv", "vartrack") if t in tasks)
    return shown or tuple(tasks[:3])


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (new, or one this wrote)")
    p.add_argument("--steps", type=int, default=None, help="stop training after this many steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the whole run from the start of training: training, periodic "
                        "evals and snapshots, final save and final evaluation. With --steps, whichever ends first.")
    p.add_argument("--final-eval-seconds", type=float, default=None,
                   help="seconds of --minutes kept for the final save and evaluation "
                        "(default: min(60, 15%% of --minutes))")
    p.add_argument("--summary-json", type=Path, default=None,
                   help="also write the run's summary (accuracy table, steps, params, wall time) here; it is "
                        "rewritten at each snapshot with finished=false")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between snapshots of the model (0: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="start from the weights of a checkpoint this trainer wrote (same model flags) instead of "
                        "random ones: a run longer than one device call continues in the next, e.g. at its long "
                        "levels only (--min-context, --warmup-tasks with no task)")
    g = p.add_argument_group("model (Qwen3 architecture)")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=6)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=4)
    g.add_argument("--head-dim", type=int, default=32)
    g.add_argument("--intermediate", type=int, default=768)
    g.add_argument("--block-size", type=int, default=4,
                   help="4: the runtime's tiny default, and a 5-6 digit answer + EOS spans 2-3 blocks, so "
                        "later digits are predicted after earlier ones are committed (easier to learn)")
    g.add_argument("--rope-theta", type=float, default=10000.0,
                   help="10000: the slowest rotary wavelength (~35K positions at head_dim 32) exceeds "
                        "4x a 2048 training context")
    g.add_argument("--position-factor", type=int, default=4,
                   help="max_position_embeddings = this x --max-context")
    g = p.add_argument_group("data and curriculum (training/data.py)")
    add_tasks_argument(g, help="tasks trained (mixed; a level holds those that fit its context)")
    add_tasks_argument(g, "--warmup-tasks", default=["passkey"], nargs="*",
                       help="tasks of the first level, alone at the shortest context (none: no warm-up level)")
    g.add_argument("--min-context", type=int, default=None,
                   help=f"default: the shortest context a trained task fits ({MIN_LENGTH} for the original tasks, "
                        "training.tasks.MIN_LENGTHS), at most --max-context")
    g.add_argument("--max-context", type=int, default=2048)
    g.add_argument("--advance-at", type=float, default=0.9,
                   help="validation accuracy every task of a level must reach to move to the next (0: only the "
                        "time floor moves)")
    g.add_argument("--ramp-end", type=float, default=0.8,
                   help="fraction of training by which the time floor reaches the last level")
    g.add_argument("--level-shares", type=float, nargs="+", default=None, metavar="SHARE",
                   help="instead of --ramp-end: one relative time share per curriculum level (the start-up "
                        "line lists the levels); the time floor gives level i share i / the sum of training")
    g.add_argument("--replay", type=float, default=0.2,
                   help="probability that a step uses an earlier (shorter) context")
    g.add_argument("--min-task-weight", type=float, default=0.15,
                   help="tasks are drawn with weight 1 - last accuracy, at least this")
    g.add_argument("--advance-on", default="all", choices=ADVANCE_RULES,
                   help="leave a level when every task (all) or the mean over its tasks (mean) reaches --advance-at")
    g = p.add_argument_group("training-only task variations (training.tasks.TaskOptions; evaluations never use them)")
    g.add_argument("--vartrack-any-query", type=float, default=0.0,
                   help="probability that a vartrack question asks a random name of either chain (any depth) "
                        "instead of the chain's last name")
    g.add_argument("--vartrack-chain", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="names in the asked vartrack chain (default: the evaluated 2, or 2-3 from 256 tokens)")
    g.add_argument("--vartrack-warmup-chain", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="add a level at the shortest context, after the task warm-up, where vartrack chains have "
                        "MIN-MAX names (e.g. 1 2: direct lookups and one indirection)")
    g.add_argument("--kv-near-miss", type=float, default=0.0,
                   help="probability that a kv prompt holds up to 3 keys one character away from the asked key")
    g.add_argument("--tokens-per-batch", type=int, default=None,
                   help="batch rows = this // context length (capped by --max-batch); "
                        f"default {GPU_DEFAULTS['tokens_per_batch']} on CUDA, {CPU_DEFAULTS['tokens_per_batch']} on CPU")
    g.add_argument("--max-batch", type=int, default=256)
    g.add_argument("--noisy-copies", type=int, default=4, help="independently masked copies of the answer blocks")
    g.add_argument("--eps", type=float, default=1e-3, help="t ~ U(eps, 1)")
    g.add_argument("--loss-weighting", default="none", choices=("none", "inv_t"))
    g.add_argument("--data-workers", type=int, default=None,
                   help="processes making batches ahead (0: inline); default "
                        f"{GPU_DEFAULTS['data_workers']} on CUDA, {CPU_DEFAULTS['data_workers']} on CPU")
    g = p.add_argument_group("optimiser")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=float, default=0.02, help="warmup as a fraction of training")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--attention", default="auto", choices=TRAINING_ATTENTION,
                   help="training attention (training/attention.py): auto = flex attention on CUDA (empty tiles "
                        "skipped, no [L, L] mask: what makes 16K-32K rows affordable), the dense mask on the CPU")
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--eval-every", type=float, default=None,
                   help="seconds of training between quick evals at the current level, at least 9x the last "
                        f"eval's time (0: none, and then only the time floor moves the curriculum); default {GPU_DEFAULTS['eval_every']:g} on CUDA, "
                        f"{CPU_DEFAULTS['eval_every']:g} on CPU")
    g.add_argument("--eval-per-task", type=int, default=None,
                   help="validation examples per task in the quick evals; default "
                        f"{GPU_DEFAULTS['eval_per_task']} on CUDA, {CPU_DEFAULTS['eval_per_task']} on CPU")
    g.add_argument("--validation-seed", type=int, default=1234,
                   help="seed of the validation split every evaluation here draws (training/tasks.py)")
    g.add_argument("--eval-batch", type=int, default=64, help="engine max_batch_size in evals")
    g.add_argument("--eval-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="DenseAttention backend of the evals (auto: triton on CUDA)")
    g.add_argument("--final-contexts", type=int, nargs="*", default=None,
                   help="contexts of the final eval (default: the curriculum's and 2x the max); the trained "
                        "length runs first, the rest while time is left")
    g.add_argument("--final-per-task", type=int, default=None,
                   help=f"default {GPU_DEFAULTS['final_per_task']} on CUDA, {CPU_DEFAULTS['final_per_task']} on CPU")
    return p


# ----------------------------------------------------------------------------- training

def _apply_device_defaults(args: argparse.Namespace, device: torch.device) -> None:
    for key, value in (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.min_context is None:
        args.min_context = min(max(MIN_LENGTH, min(MIN_LENGTHS[t] for t in args.tasks)), args.max_context)


def task_options(args: argparse.Namespace) -> tuple[TaskOptions, TaskOptions | None]:
    """(options of every level, options of the vartrack warm-up level or None) from the arguments."""
    chain = tuple(args.vartrack_chain) if args.vartrack_chain else None
    options = TaskOptions(vartrack_chain=chain, vartrack_any_query=args.vartrack_any_query,
                          kv_near_miss=args.kv_near_miss)
    warmup = None
    if args.vartrack_warmup_chain:
        warmup = TaskOptions(vartrack_chain=tuple(args.vartrack_warmup_chain),
                             vartrack_any_query=args.vartrack_any_query, kv_near_miss=args.kv_near_miss)
    return options, warmup


def options_text(options: TaskOptions, tasks: Sequence[str] = TASKS) -> str:
    """The non-default variations of `options` that touch `tasks`, e.g. 'vartrack chain 1-2, vartrack
    any-name questions 0.5'."""
    parts = []
    if "vartrack" in tasks and options.vartrack_chain is not None:
        parts.append(f"vartrack chain {options.vartrack_chain[0]}-{options.vartrack_chain[1]}")
    if "vartrack" in tasks and options.vartrack_any_query:
        parts.append(f"vartrack any-name questions {options.vartrack_any_query:g}")
    if "kv" in tasks and options.kv_near_miss:
        parts.append(f"kv near-miss keys {options.kv_near_miss:g}")
    return ", ".join(parts)


def level_dict(level: Level) -> dict[str, Any]:
    """A curriculum level as the log and summary store it."""
    out: dict[str, Any] = {"context": level.context, "tasks": list(level.tasks)}
    if options_text(level.options, level.tasks):
        out["options"] = options_text(level.options, level.tasks)
    return out


def _budgets(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """(whole-run budget, training budget) in seconds, None without --minutes."""
    if args.minutes is None:
        return None, None
    total = args.minutes * 60
    reserve = args.final_eval_seconds if args.final_eval_seconds is not None else min(60.0, 0.15 * total)
    if not 0 <= reserve < total:
        raise ValueError(f"--final-eval-seconds {reserve:g} must be >= 0 and below --minutes x 60 = {total:g}")
    return total, total - reserve


def train(args: argparse.Namespace) -> dict[str, Any]:
    if args.steps is None and args.minutes is None:
        raise ValueError("give --steps N and/or --minutes M: the run needs an end")
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        raise ValueError(f"--steps {args.steps} / --minutes {args.minutes}: give at least one step and a positive time")
    device = resolve_device(args.device)
    _apply_device_defaults(args, device)
    total_budget, train_budget = _budgets(args)
    out = Path(args.out)
    check_out_folder(out)
    torch.manual_seed(args.seed)
    tokenizer = make_tokenizer()
    options, warmup_options = task_options(args)
    levels = make_levels(args.min_context, args.max_context, args.tasks, args.warmup_tasks, options, warmup_options)
    cur = Curriculum(levels, advance_at=args.advance_at if args.advance_at > 0 else None, ramp_end=args.ramp_end,
                     replay=args.replay, min_task_weight=args.min_task_weight, seed=args.seed,
                     advance_on=args.advance_on, shares=tuple(args.level_shares) if args.level_shares else None)
    cfg = model_config_dict(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate=args.intermediate,
                            block_size=args.block_size, rope_theta=args.rope_theta, max_context=args.max_context,
                            position_factor=args.position_factor)
    config = ModelConfig.from_hf(cfg)
    model = Transformer(config)
    model.init_weights(std=cfg["initializer_range"], generator=torch.Generator().manual_seed(args.seed))
    if args.init_from is not None:
        load_initial_weights(model, cfg, args.init_from)
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    flex = args.attention == "flex" or (args.attention == "auto" and device.type == "cuda")
    if flex and device.type != "cuda":
        raise ValueError(f"--attention flex trains on CUDA only (torch's flex attention has no backward on {device.type}); "
                         "use --attention auto or mask there")
    pad_multiple = 128 if flex else (64 if device.type == "cuda" else 1)  # flex: whole 128-token tiles
    settings = LayoutSettings(seed=args.seed, block_size=args.block_size, mask_token_id=config.mask_token_id,
                              eos_token_id=config.eos_token_ids[0], noisy_copies=args.noisy_copies, eps=args.eps,
                              loss_weighting=args.loss_weighting, pad_multiple=pad_multiple,
                              max_rows=args.max_batch, encoder=CharEncoder(tokenizer),
                              length_buckets=8 if flex else 0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"device {device} ({device_name}), torch {torch.__version__}; model {n_params / 1e6:.2f}M params "
          f"({args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads of {args.head_dim}), "
          f"block {args.block_size}; levels {[tuple(level_dict(lv).values()) for lv in levels]}; "
          f"{args.tokens_per_batch} tokens/batch, {args.data_workers} data workers; budget "
          f"{'-' if total_budget is None else f'{total_budget:.0f} s ({train_budget:.0f} s training)'}", flush=True)
    log: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "device": str(device), "device_name": device_name, "torch": torch.__version__,
                           "params": n_params, "levels": [level_dict(lv) for lv in levels],
                           "loss": [], "evals": [], "snapshots": []}
    counters = {"steps": 0, "examples": 0, "tokens": 0, "max_context": 0, "data_wait_s": 0.0}
    start = time.perf_counter()

    def summary(final: dict[str, Any] | None, finished: bool) -> dict[str, Any]:
        now = time.perf_counter()
        out_summary = {"finished": finished, "checkpoint": str(out), "params": n_params, "steps": counters["steps"],
                       "examples": counters["examples"], "tokens": counters["tokens"],
                       "trained_max_context": counters["max_context"], "level": cur.level_at(progress),
                       "level_history": cur.history, "levels": log["levels"],
                       "train_wall_s": round(log.get("train_wall_s", now - start), 1),
                       "total_wall_s": round(now - start, 1), "data_wait_s": round(counters["data_wait_s"], 1),
                       "device": str(device), "device_name": device_name, "torch": torch.__version__,
                       "command": getattr(args, "command", None), "last_quick_eval": log["evals"][-1] if log["evals"] else None}
        if final is not None:
            out_summary.update(split=final["split"], seed=final["seed"], accuracy=final["accuracy"],
                               mean=final["mean"], contexts=final["contexts"],
                               skipped_contexts=final["skipped_contexts"], per_task=final["total"],
                               final_eval_s=final["wall_s"], table=accuracy_table(final))
        return out_summary

    def write_summary(data: dict[str, Any]) -> None:
        if args.summary_json is not None:
            path = Path(args.summary_json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(path)

    def snapshot(final: dict[str, Any] | None, finished: bool) -> None:
        t0 = time.perf_counter()
        data = summary(final, finished)
        files = {"training_log.json": json.dumps({**log, "summary": data}, indent=1) + "\n",
                 "demo_prompts.json": json.dumps(demo_prompts(args.max_context, demo_tasks(args.tasks)), indent=1)
                 + "\n"}
        if final is not None:
            files["README.md"] = readme(cfg, args, log, final, n_params, cur)
        save_folder(model, cfg, out, tokenizer, files)
        write_summary(data)
        log["snapshots"].append({"step": counters["steps"], "elapsed_s": round(t0 - start, 1),
                                 "save_s": round(time.perf_counter() - t0, 2)})

    def timed_eval(step: int, level: int, per_task: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        lv = levels[level]
        res = quick_eval(model, tokenizer, device, args, [lv.context], per_task, tasks=list(lv.tasks))
        acc = {t: res["accuracy"][t][str(lv.context)] for t in lv.tasks}
        entry = {"step": step, "elapsed_s": round(t0 - start, 1), "eval_s": round(time.perf_counter() - t0, 1),
                 "level": level, "context": lv.context, "per_task": per_task, "accuracy": acc}
        log["evals"].append(entry)
        print(f"[eval step {step} level {level}] {entry['eval_s']}s " + " ".join(f"{t} {a:.2f}" for t, a in acc.items()),
              flush=True)
        return acc

    # A 1-example eval before any training: the inference path fails here, in seconds, if it will fail.
    timed_eval(0, 0, 1)
    source = BatchSource(settings, workers=args.data_workers)
    step, progress, shown_level = 0, 0.0, -1
    last_eval = last_save = time.perf_counter()
    costs = {"eval": 0.0, "save": 0.0}  # seconds the last periodic eval / snapshot took

    def fits(seconds: float) -> bool:
        return train_budget is None or time.perf_counter() + seconds < start + train_budget

    window: dict[str, Any] = {"loss": 0.0, "n": 0, "tokens": 0, "examples": 0, "t0": time.perf_counter()}

    request_index = itertools.count()

    def next_request() -> BatchRequest:  # called when a batch is queued: it trains at the level of that moment
        return cur.request(next(request_index), progress, args.tokens_per_batch, args.max_batch)

    try:
        while True:
            elapsed = time.perf_counter() - start
            progress = max(step / args.steps if args.steps else 0.0, elapsed / train_budget if train_budget else 0.0)
            if progress >= 1.0:
                break
            level = cur.level_at(progress)
            if level != shown_level:
                lv = levels[level]
                by = "start" if shown_level < 0 else ("evaluation" if cur.earned >= level else "time floor")
                if by == "time floor":
                    cur.history.append({"step": step, "elapsed_s": round(elapsed, 1), "level": level,
                                        "context": lv.context, "tasks": list(lv.tasks), "by": by})
                print(f"[level {level}/{len(levels) - 1}] context {lv.context}, tasks {list(lv.tasks)} "
                      f"(step {step}, {elapsed:.0f} s, by {by})", flush=True)
                shown_level = level
            t_wait = time.perf_counter()
            request, arrays = source.next(next_request)
            counters["data_wait_s"] += time.perf_counter() - t_wait
            batch = to_device(arrays, args.block_size, device)
            lr = lr_at(progress, args.lr, args.warmup, args.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            # bf16 autocast on CUDA (fp32 master weights), plain fp32 on the CPU
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = batch_loss(model, batch, args.attention)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            step += 1
            counters.update(steps=step, examples=counters["examples"] + request.rows,
                            tokens=counters["tokens"] + batch.real_tokens,
                            max_context=max(counters["max_context"], request.context))
            window["loss"] += loss.detach()
            window["n"] += 1
            window["tokens"] += batch.real_tokens
            window["examples"] += request.rows
            if step % args.log_every == 0:
                mean_loss = float(window["loss"]) / window["n"]
                dt = time.perf_counter() - window["t0"]
                entry = {"step": step, "elapsed_s": round(time.perf_counter() - start, 1), "level": level,
                         "context": request.context, "rows": request.rows, "loss": round(mean_loss, 4), "lr": lr,
                         "grad_norm": round(float(grad_norm), 3), "steps_per_s": round(window["n"] / dt, 2),
                         "examples_per_s": round(window["examples"] / dt), "tokens_per_s": round(window["tokens"] / dt),
                         "data_wait_s": round(counters["data_wait_s"], 1)}
                if device.type == "cuda":
                    entry["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                log["loss"].append(entry)
                print(" ".join(f"{k} {v:.2e}" if k == "lr" else f"{k} {v}" for k, v in entry.items()), flush=True)
                window = {"loss": 0.0, "n": 0, "tokens": 0, "examples": 0, "t0": time.perf_counter()}
            # Periodic evals and snapshots only while they fit before the training budget ends.
            # ... and at most ~10% of the time: long-context evals space out by 9x their cost.
            since_eval = time.perf_counter() - last_eval
            if args.eval_every > 0 and since_eval >= max(args.eval_every, 9 * costs["eval"]) and fits(costs["eval"]):
                t0 = time.perf_counter()
                acc = timed_eval(step, level, args.eval_per_task)
                costs["eval"] = time.perf_counter() - t0
                if cur.record(level, acc, step, time.perf_counter() - start):
                    print(f"[curriculum] level {level} passed (every task >= {args.advance_at:g})", flush=True)
                last_eval = time.perf_counter()
            if args.save_every > 0 and time.perf_counter() - last_save >= args.save_every and fits(costs["save"]):
                t0 = time.perf_counter()
                snapshot(None, finished=False)
                costs["save"] = time.perf_counter() - t0
                last_save = time.perf_counter()
    finally:
        source.close()
    train_s = time.perf_counter() - start
    log.update(steps=step, train_wall_s=round(train_s, 1))
    print(f"trained {step} steps ({counters['examples']} examples, {counters['tokens']} tokens) in {train_s:.1f} s",
          flush=True)

    # Save first, so a failure or a kill in the final evaluation never loses the model.
    t0 = time.perf_counter()
    snapshot(None, finished=False)
    costs["save"] = time.perf_counter() - t0
    contexts = args.final_contexts if args.final_contexts else sorted({*(lv.context for lv in levels),
                                                                       2 * args.max_context})
    contexts = [c for c in contexts if c <= cfg["max_position_embeddings"]]
    short = [c for c in contexts if any(c < MIN_LENGTHS[t] for t in args.tasks)]
    if short:
        print(f"[final eval] contexts {short} left out: some trained task needs a longer one", flush=True)
        contexts = [c for c in contexts if c not in short]
    first = [args.max_context] if args.max_context in contexts else []
    ordered = first + [c for c in sorted(contexts) if c not in first]
    # The last save (with README) takes about what the one above took: keep twice that for it.
    deadline = start + total_budget - 2 * costs["save"] - 0.5 if total_budget is not None else None
    t0 = time.perf_counter()
    final = quick_eval(model, tokenizer, device, args, ordered, args.final_per_task, deadline=deadline)
    print(f"[final eval] {time.perf_counter() - t0:.1f}s, {args.final_per_task} per task\n{accuracy_table(final)}",
          flush=True)
    log.update(final_eval=final, total_wall_s=round(time.perf_counter() - start, 1))
    snapshot(final, finished=True)
    log["summary"] = summary(final, True)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): {sorted(f.name for f in out.iterdir())}"
          + (f"; summary {args.summary_json}" if args.summary_json else "")
          + f"; total {time.perf_counter() - start:.1f} s", flush=True)
    return log


def tasks_text(tasks: Sequence[str]) -> str:
    """The README's description of the trained tasks."""
    parts = []
    if any(t in TASKS for t in tasks):
        parts.append("""Prompts of filler sentences with facts at random depths, ending in a question; the answer is a
5-6 digit number followed by EOS. `passkey` (one pass key), `multikey` (labelled pass keys, ask for
one), `kv` (`k3f9: 51207` lines among filler), `vartrack` (assignment chains `QXJ = 48213.`,
`MPL = QXJ.`, `RTE = MPL.` plus a distractor chain; asked `Which number does RTE hold? RTE = `,
the answer is worked: `MPL = QXJ = 48213`). Exact match after stripping whitespace.""")
    ruler = [t for t in tasks if t in RULER_TASKS]
    if ruler:
        parts.append(f"""RULER's synthetic categories, by RULER's names: {", ".join(f"`{t}`" for t in ruler)}
(needles in noise, essay-like text or among other needles; variable tracking; common and frequent
word extraction). Single answers by exact match; list answers by their items: niah_multiquery's in
the order asked, the others as sets (none missing, none extra).""")
    return "\n\n".join([f"Trained on {', '.join(tasks)}."] + parts)


def readme(cfg: dict[str, Any], args: argparse.Namespace, log: dict[str, Any], final: dict[str, Any],
           n_params: int, cur: Curriculum) -> str:
    device = log.get("device_name", log["device"])
    cmd = getattr(args, "command", None) or "training.train.train() called from Python"
    levels = ", ".join(f"{lv.context}:{'+'.join(lv.tasks) if len(lv.tasks) < len(args.tasks) else 'all'}"
                       + (f" ({options_text(lv.options, lv.tasks)})" if options_text(lv.options, lv.tasks) else "")
                       for lv in cur.levels)
    rule = "every task" if args.advance_on == "all" else "the mean over its tasks"
    if cur.shares is None:
        floor = f"reaching the last level at\n{args.ramp_end:.0%} of training"
    else:
        floor = "giving the levels " + "/".join(f"{s / sum(cur.shares):.0%}" for s in cur.shares) + " of training"
    moves = "; ".join(f"level {h.get('earned_level', h.get('level'))} at step {h['step']} ({h['by']})"
                      for h in cur.history) or "none"
    return f"""# Block-diffusion retrieval model ({n_params / 1e6:.1f}M parameters)

A small Qwen3-architecture block-diffusion language model trained from scratch by
`training/train.py` on synthetic long-context retrieval (no external data). Character-level
tokenizer (printable ASCII + newline, {cfg['vocab_size']} ids).

## Model
- Qwen3 (q/k RMSNorm, no attention bias, tied embeddings), bf16 weights
- hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} query / \
{cfg['num_key_value_heads']} KV heads of dim {cfg['head_dim']}, MLP {cfg['intermediate_size']}
- RoPE theta {cfg['rope_theta']:g}; trained up to {cfg['training_context_length']} tokens \
(`original_max_position_embeddings`); `max_position_embeddings` {cfg['max_position_embeddings']}
- block diffusion: `block_size` {cfg['block_size']}, `mask_token_id` {cfg['mask_token_id']}, \
`eos_token_id` {cfg['eos_token_id']}; prompt attention block-causal (the runtime's Qwen3 default)

## Tasks (training/tasks.py)
{tasks_text(args.tasks)}
`demo_prompts.json`: held-out prompts at {args.max_context} tokens with their answers.

## Training
SDAR/BD3-LM style: [clean sequence ; {args.noisy_copies} noisy copies of the answer blocks], clean part
block-causal, each noisy block sees the clean positions before it and itself; answer positions
masked with probability t ~ U({args.eps}, 1); cross-entropy on masked positions (weighting:
{args.loss_weighting}). Curriculum levels (context:tasks) {levels}; a level is left when {rule}
reaches {args.advance_at:g} validation accuracy{" (on the unvaried tasks)" if options_text(cur.levels[-1].options) or args.vartrack_warmup_chain else ""}, or by a time floor {floor}; moves: {moves}. Tasks drawn with weight 1 - accuracy (at least
{args.min_task_weight:g}); {args.replay:.0%} of steps replay a shorter context. {args.tokens_per_batch} tokens per
batch, AdamW lr {args.lr:g} (warmup {args.warmup:.0%}, cosine to {args.min_lr_ratio:g}x), weight decay
{args.weight_decay}, clip {args.clip}, {"bf16 autocast" if log["device"].startswith("cuda") else "fp32"}.
{log['steps']} steps in {log['train_wall_s']} s on {device} (torch {log['torch']}).

Command: `{cmd}`

## Measured accuracy (exact match, dense engine, greedy, validation split seed {args.validation_seed}, \
{args.final_per_task} per task and context)
{accuracy_table(final, markdown=True)}

These instances come from the validation split, the stream the curriculum moved on. For a number to report, measure the
test split, which no training-time decision saw:
`python -m training.evaluate --model <this folder> --contexts 512 1024 2048 4096 --per-task 50`.
`training_log.json` holds the loss curve, the periodic evaluations, the curriculum moves and the arguments.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python -m training.train", *argv])
    train(args)
    return 0


# Batch layout names are re-exported: tests and callers import them from here, as before the split.
__all__ = ["CLEAN", "NOISY", "PAD", "CharEncoder", "TrainBatch", "build_batch", "layout_batch", "training_mask",
           "to_device", "curriculum", "doubling_contexts", "stage_at", "lr_at", "batch_loss", "make_tokenizer",
           "model_config_dict", "inference_engine", "quick_eval", "save_folder", "demo_prompts", "build_parser",
           "train", "main"]


if __name__ == "__main__":
    sys.exit(main())
