"""Block-diffusion supervised training of the project's small retrieval model (SDAR / BD3-LM style).

    python -m training.train --minutes 5 --out checkpoints/retrieval-qwen3-5m
    python -m training.train --steps 20 --max-context 256 --device cpu --out /tmp/x   # smoke run

What one training sequence looks like (B = block size, blocks aligned to absolute position 0, as
runtime/decoding.py aligns them):

    clean:  [prompt ............ | answer EOS EOS..]      block-causal (the Qwen3 prompt_attention default)
    noisy:  copy 1 of the answer blocks, some answer positions [MASK]ed
            copy 2 ...                                    (--noisy-copies, independent masks)

The answer blocks run from the block holding the answer's first token through the block holding
EOS, padded with EOS to the block boundary. In every noisy copy each answer/EOS position is masked
with probability t ~ U(eps, 1) (drawn per copy, at least one position masked); prompt positions
inside the first answer block stay clean, because at inference the prompt's tail is fixed inside
the first generated block. A noisy block sees the clean positions before its block start and
itself (bidirectionally), and takes the absolute positions of its clean counterpart: exactly what
a DENOISE pass of runtime.generate.BlockDiffusionLoop sees over a committed KV cache
(tests/training/test_train.py checks the logits agree to 1e-5 in fp64). Noisy copies never see
each other, so several of them cost a few extra tokens and multiply the supervised positions.

Loss: cross-entropy on the masked positions of the noisy copies, averaged over them (default), or
weighted by 1/t and normalised by the number of maskable positions (`--loss-weighting inv_t`, the
MDLM/LLaDA estimator; noisier on tiny answers, hence not the default).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from runtime.attention import MaskedAttention
from runtime.checkpoint import save_checkpoint
from runtime.config import EngineConfig, ModelConfig
from runtime.engine import Engine, resolve_device
from runtime.model import Transformer
from runtime.tokenizer import (EOS_TOKEN, MASK_TOKEN, UNK_TOKEN, Tokenizer, build_char_tokenizer,
                               hf_tokenizer_config)
from training.evaluate import accuracy_table, evaluate
from training.tasks import MIN_LENGTH, TASKS, example_rng, generate_examples, make_example

CLEAN, NOISY, PAD = 0, 1, 2
# Defaults that depend on the device: a CPU smoke run must finish in well under a minute.
GPU_DEFAULTS = {"tokens_per_batch": 65536, "eval_per_task": 64, "final_per_task": 64}
CPU_DEFAULTS = {"tokens_per_batch": 2048, "eval_per_task": 4, "final_per_task": 4}


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


class CharEncoder:
    """Text -> ids through a byte lookup table: the char tokenizer's encode, without its per-call cost."""

    def __init__(self, tokenizer: Tokenizer):
        self.table = np.full(256, -1, dtype=np.int64)
        for code in range(128):
            tid = tokenizer.token_to_id(chr(code))
            if tid is not None:
                self.table[code] = tid

    def __call__(self, text: str) -> list[int]:
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        ids = self.table[raw]
        if (ids < 0).any():
            bad = sorted({chr(c) for c in raw[ids < 0]})
            raise ValueError(f"characters {bad!r} are not in the char tokenizer's alphabet")
        return ids.tolist()


# ----------------------------------------------------------------------------- batches and masks

@dataclass
class TrainBatch:
    """One training forward: N rows of [clean sequence ; noisy copies of its answer blocks ; padding].

    input_ids, positions, kind, copy_id, targets: [N, L] int64 (kind: CLEAN / NOISY / PAD; copy_id:
    -1 outside noisy copies; targets: -100 where there is no loss). weights: [N, L] fp32 loss weight
    per masked position. mask: [N, L, L] bool, True = the query (dim 1) sees the key (dim 2).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    kind: torch.Tensor
    copy_id: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    real_tokens: int
    masked_tokens: int


def training_mask(kind: torch.Tensor, positions: torch.Tensor, copy_id: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, L, L] bool visibility (query, key) of a training batch; inputs [N, L].

    clean -> clean: block-causal. noisy -> clean: keys in blocks before the query's block.
    noisy -> noisy: same copy and same block (bidirectional). Padding sees only itself, so its
    softmax row is defined, and nothing sees padding.
    """
    blk = positions // block_size
    bq, bk = blk[:, :, None], blk[:, None, :]
    kq, kk = kind[:, :, None], kind[:, None, :]
    clean_q, clean_k, noisy_q, noisy_k = kq == CLEAN, kk == CLEAN, kq == NOISY, kk == NOISY
    same_copy = copy_id[:, :, None] == copy_id[:, None, :]
    mask = (clean_q & clean_k & (bk <= bq)) | (noisy_q & clean_k & (bk < bq)) | (noisy_q & noisy_k & same_copy & (bk == bq))
    n = kind.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=kind.device)[None]
    return mask | ((kq == PAD) & eye)


def build_batch(sequences: list[tuple[list[int], list[int]]], *, block_size: int, mask_token_id: int,
                eos_token_id: int, noisy_copies: int, generator: np.random.Generator, eps: float = 1e-3,
                loss_weighting: str = "none", pad_multiple: int = 1,
                device: torch.device | str = "cpu") -> TrainBatch:
    """Lay out (prompt ids, answer ids) pairs as training rows on `device` (see TrainBatch).

    Per noisy copy t ~ U(eps, 1); each answer/EOS position of the answer blocks is masked with
    probability t, at least one. loss_weighting "none": weight 1 per masked position (the loss
    averages them); "inv_t": weight 1/t, scaled so the loss is sum(CE / t) per maskable position.
    The layout is built with numpy on the CPU; the [N, L, L] mask is built on `device` (it is the
    only large tensor, and building it on the host would cost more than the GPU step).
    """
    if noisy_copies < 1:
        raise ValueError(f"noisy_copies={noisy_copies} must be >= 1")
    if loss_weighting not in ("none", "inv_t"):
        raise ValueError(f"loss_weighting={loss_weighting!r}; choose none or inv_t")
    b = block_size
    lengths = []
    for prompt, answer in sequences:
        if not prompt:
            raise ValueError("every training example needs a non-empty prompt")
        clean_len = -(-(len(prompt) + len(answer) + 1) // b) * b
        lengths.append(clean_len + noisy_copies * (clean_len - len(prompt) // b * b))
    n, length = len(sequences), -(-max(lengths) // pad_multiple) * pad_multiple
    ids = np.full((n, length), eos_token_id, dtype=np.int64)
    pos = np.zeros((n, length), dtype=np.int64)
    kind = np.full((n, length), PAD, dtype=np.int64)
    cid = np.full((n, length), -1, dtype=np.int64)
    targets = np.full((n, length), -100, dtype=np.int64)
    weights = np.zeros((n, length), dtype=np.float32)
    maskable_total = 0
    for i, (prompt, answer) in enumerate(sequences):
        p, a = len(prompt), len(answer)
        clean_len = -(-(p + a + 1) // b) * b
        start = p // b * b  # first answer block
        span = clean_len - start
        ids[i, :p], ids[i, p:p + a] = prompt, answer  # the rest of the clean part stays EOS
        pos[i, :clean_len] = np.arange(clean_len)
        kind[i, :clean_len] = CLEAN
        block = ids[i, start:clean_len].copy()  # [span]
        maskable = np.arange(start, clean_len) >= p  # answer + EOS positions
        t = eps + (1 - eps) * generator.random(noisy_copies)  # [copies]
        masked = (generator.random((noisy_copies, span)) < t[:, None]) & maskable[None]
        for c in np.flatnonzero(~masked.any(1)):
            masked[c, generator.choice(np.flatnonzero(maskable))] = True
        lo, hi = clean_len, clean_len + noisy_copies * span
        ids[i, lo:hi] = np.where(masked, mask_token_id, block[None]).reshape(-1)
        pos[i, lo:hi] = np.tile(np.arange(start, clean_len), noisy_copies)
        kind[i, lo:hi] = NOISY
        cid[i, lo:hi] = np.repeat(np.arange(noisy_copies), span)
        targets[i, lo:hi] = np.where(masked, block[None], -100).reshape(-1)
        per_copy = 1.0 / t if loss_weighting == "inv_t" else np.ones(noisy_copies)
        weights[i, lo:hi] = (masked * per_copy[:, None]).reshape(-1)
        maskable_total += int(maskable.sum()) * noisy_copies
    masked_tokens = int((targets != -100).sum())
    if loss_weighting == "inv_t":
        # The loss divides by the sum of weights; this scale turns it into sum(CE / t) / maskable positions.
        weights *= weights.sum() / maskable_total
    dev = torch.device(device)
    t_ = {name: torch.from_numpy(arr).to(dev, non_blocking=True)
          for name, arr in (("input_ids", ids), ("positions", pos), ("kind", kind), ("copy_id", cid),
                            ("targets", targets), ("weights", weights))}
    mask = training_mask(t_["kind"], t_["positions"], t_["copy_id"], block_size)
    return TrainBatch(**t_, mask=mask, real_tokens=int((kind != PAD).sum()), masked_tokens=masked_tokens)


def batch_loss(model: Transformer, batch: TrainBatch) -> torch.Tensor:
    """Weighted mean cross-entropy over the masked positions of the noisy copies (a scalar).

    Computed over every position with ignore_index, not by boolean selection, so the step never
    waits for the GPU (selection would need the count on the host).
    """
    logits = model(batch.input_ids, batch.positions, MaskedAttention(batch.mask))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100,
                         reduction="none")
    w = batch.weights.flatten()
    return (ce * w).sum() / w.sum()


# ----------------------------------------------------------------------------- schedules

def curriculum(min_context: int, max_context: int) -> list[int]:
    """Context lengths doubling from min to max (max always included)."""
    if min_context < MIN_LENGTH or max_context < min_context:
        raise ValueError(f"need {MIN_LENGTH} <= min_context <= max_context, got {min_context}, {max_context}")
    stages = []
    ctx = min_context
    while ctx < max_context:
        stages.append(ctx)
        ctx *= 2
    return stages + [max_context]


def stage_at(progress: float, num_stages: int, ramp_end: float) -> int:
    """Index of the curriculum stage at `progress` in [0, 1]: stages enter evenly over [0, ramp_end),
    the last one holds from ramp_end to the end (most of the long-context adaptation happens there)."""
    if num_stages == 1:
        return 0
    return min(num_stages - 1, int(progress / ramp_end * (num_stages - 1)))


def lr_at(progress: float, base_lr: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine down to min_ratio * base_lr."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 1e-3)
    frac = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ----------------------------------------------------------------------------- training

def inference_engine(model: Transformer, tokenizer: Tokenizer, device: torch.device, *, max_batch_size: int,
                     attention_backend: str = "auto") -> Engine:
    """An Engine over a detached inference copy of `model`, in the dtype the checkpoint ships (bf16 on
    CUDA; fp32 on CPU, as the engine's dtype="auto" would load it)."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    copy_ = copy.deepcopy(model).to(getattr(torch, dtype)).eval().requires_grad_(False)
    config = EngineConfig(model_path="<in-memory model>", mode="dense", device=str(device), dtype=dtype,
                          attention_backend=attention_backend, max_batch_size=max_batch_size, progress=False)
    return Engine(config, model=copy_, tokenizer=tokenizer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the training loop (periodic evals included; the final "
                        "evaluation and saving come after it). With --steps, whichever ends first.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
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
    g = p.add_argument_group("data and curriculum")
    g.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    g.add_argument("--min-context", type=int, default=None, help="default: min(256, --max-context)")
    g.add_argument("--max-context", type=int, default=2048)
    g.add_argument("--ramp-end", type=float, default=0.6,
                   help="fraction of training by which the curriculum reaches --max-context")
    g.add_argument("--replay", type=float, default=0.25,
                   help="probability that a step uses an earlier (shorter) curriculum stage")
    g.add_argument("--tokens-per-batch", type=int, default=None,
                   help="batch rows = this // context length (capped by --max-batch); "
                        f"default {GPU_DEFAULTS['tokens_per_batch']} on CUDA, {CPU_DEFAULTS['tokens_per_batch']} on CPU")
    g.add_argument("--max-batch", type=int, default=256)
    g.add_argument("--noisy-copies", type=int, default=4, help="independently masked copies of the answer blocks")
    g.add_argument("--eps", type=float, default=1e-3, help="t ~ U(eps, 1)")
    g.add_argument("--loss-weighting", default="none", choices=("none", "inv_t"))
    g = p.add_argument_group("optimiser")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=float, default=0.03, help="warmup as a fraction of training")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--eval-every", type=float, default=60.0,
                   help="seconds of training between quick evals at the current context (0: none)")
    g.add_argument("--eval-per-task", type=int, default=None,
                   help="held-out examples per task in the quick evals; default "
                        f"{GPU_DEFAULTS['eval_per_task']} on CUDA, {CPU_DEFAULTS['eval_per_task']} on CPU")
    g.add_argument("--eval-seed", type=int, default=1234)
    g.add_argument("--eval-batch", type=int, default=64, help="engine max_batch_size in evals")
    g.add_argument("--eval-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="DenseAttention backend of the evals (auto: triton on CUDA)")
    g.add_argument("--final-contexts", type=int, nargs="*", default=None,
                   help="contexts of the final eval (default: the curriculum stages and 2x the max)")
    g.add_argument("--final-per-task", type=int, default=None,
                   help=f"default {GPU_DEFAULTS['final_per_task']} on CUDA, {CPU_DEFAULTS['final_per_task']} on CPU")
    return p


class Sampler:
    """Training examples: task uniform over `tasks`, context from the curriculum, a seeded stream."""

    def __init__(self, tasks: list[str], seed: int, encoder: CharEncoder):
        self.tasks, self.seed, self.encode = tasks, seed, encoder
        self.rng = random.Random(f"train-sampler/{seed}")
        self.counter = 0

    def batch(self, length: int, rows: int) -> list[tuple[list[int], list[int]]]:
        out = []
        for _ in range(rows):
            task = self.rng.choice(self.tasks)
            ex = make_example(task, length, example_rng("train", self.seed, task, length, self.counter))
            self.counter += 1
            out.append((self.encode(ex.prompt), self.encode(ex.answer)))
        return out


def quick_eval(model: Transformer, tokenizer: Tokenizer, device: torch.device, args: argparse.Namespace,
               contexts: list[int], per_task: int) -> dict[str, Any]:
    was_training = model.training
    engine = inference_engine(model, tokenizer, device, max_batch_size=args.eval_batch,
                              attention_backend=args.eval_backend)
    result = evaluate(engine, args.tasks, contexts, per_task, args.eval_seed)
    model.train(was_training)
    return result


def train(args: argparse.Namespace) -> dict[str, Any]:
    if args.steps is None and args.minutes is None:
        raise ValueError("give --steps N and/or --minutes M: the run needs an end")
    device = resolve_device(args.device)
    for key, value in (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.manual_seed(args.seed)
    tokenizer = make_tokenizer()
    encoder = CharEncoder(tokenizer)
    if args.min_context is None:
        args.min_context = min(256, args.max_context)
    stages = curriculum(args.min_context, args.max_context)
    cfg = model_config_dict(tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                            kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate=args.intermediate,
                            block_size=args.block_size, rope_theta=args.rope_theta, max_context=args.max_context,
                            position_factor=args.position_factor)
    config = ModelConfig.from_hf(cfg)
    model = Transformer(config)
    model.init_weights(std=cfg["initializer_range"], generator=torch.Generator().manual_seed(args.seed))
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    sampler = Sampler(args.tasks, args.seed, encoder)
    noise_gen = np.random.default_rng(args.seed + 1)
    stage_rng = random.Random(f"stage/{args.seed}")
    pad_multiple = 64 if device.type == "cuda" else 1
    budget = args.minutes * 60 if args.minutes is not None else None

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}), "
          f"torch {torch.__version__}; model {n_params / 1e6:.2f}M params ({args.layers} layers, hidden "
          f"{args.hidden}, {args.heads}/{args.kv_heads} heads of {args.head_dim}), block {args.block_size}; "
          f"curriculum {stages}; tasks {args.tasks}", flush=True)
    log: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "device": str(device), "torch": torch.__version__, "params": n_params,
                           "curriculum": stages, "loss": [], "evals": []}
    if device.type == "cuda":
        log["device_name"] = torch.cuda.get_device_name(device)

    def timed_eval(step: int, contexts: list[int], per_task: int, elapsed: float) -> None:
        t0 = time.perf_counter()
        res = quick_eval(model, tokenizer, device, args, contexts, per_task)
        entry = {"step": step, "elapsed_s": round(elapsed, 1), "eval_s": round(time.perf_counter() - t0, 1),
                 "per_task": per_task, "accuracy": res["accuracy"]}
        log["evals"].append(entry)
        print(f"[eval step {step}] {entry['eval_s']}s\n{accuracy_table(res)}", flush=True)

    start = time.perf_counter()
    # A 1-example eval before any training: the inference path fails here, in seconds, if it will fail.
    timed_eval(0, [stages[0]], 1, 0.0)
    step, progress = 0, 0.0
    last_eval = time.perf_counter()
    window: dict[str, float] = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
    while progress < 1.0:
        elapsed = time.perf_counter() - start
        progress = max(step / args.steps if args.steps else 0.0, elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            break
        stage = stage_at(progress, len(stages), args.ramp_end)
        ctx = stages[stage_rng.randrange(stage)] if stage and stage_rng.random() < args.replay else stages[stage]
        rows = max(1, min(args.max_batch, args.tokens_per_batch // ctx))
        batch = build_batch(sampler.batch(ctx, rows), block_size=args.block_size,
                            mask_token_id=config.mask_token_id, eos_token_id=config.eos_token_ids[0],
                            noisy_copies=args.noisy_copies, generator=noise_gen, eps=args.eps,
                            loss_weighting=args.loss_weighting, pad_multiple=pad_multiple, device=device)
        lr = lr_at(progress, args.lr, args.warmup, args.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        # bf16 autocast on CUDA (fp32 master weights), plain fp32 on the CPU
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        window["loss"] += loss.detach()
        window["n"] += 1
        window["tokens"] += batch.real_tokens
        if step % args.log_every == 0:
            mean_loss = float(window["loss"]) / window["n"]
            dt = time.perf_counter() - window["t0"]
            entry = {"step": step, "elapsed_s": round(time.perf_counter() - start, 1), "context": ctx, "rows": rows,
                     "loss": round(mean_loss, 4), "lr": lr, "grad_norm": round(float(grad_norm), 3),
                     "tokens_per_s": round(window["tokens"] / dt)}
            if device.type == "cuda":
                entry["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            log["loss"].append(entry)
            print(" ".join(f"{k} {v:.2e}" if k == "lr" else f"{k} {v}" for k, v in entry.items()), flush=True)
            window = {"loss": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
        if args.eval_every > 0 and time.perf_counter() - last_eval >= args.eval_every:
            timed_eval(step, [stages[stage]], args.eval_per_task, time.perf_counter() - start)
            last_eval = time.perf_counter()
    train_s = time.perf_counter() - start
    print(f"trained {step} steps in {train_s:.1f} s", flush=True)

    # Save first, so a failure in the final evaluation never loses the model.
    out = Path(args.out)
    shipped = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    save_checkpoint(shipped, cfg, out, tokenizer)
    contexts = args.final_contexts if args.final_contexts else sorted({*stages, 2 * args.max_context})
    contexts = [c for c in contexts if c <= cfg["max_position_embeddings"]]
    t0 = time.perf_counter()
    final = quick_eval(model, tokenizer, device, args, contexts, args.final_per_task)
    print(f"[final eval] {time.perf_counter() - t0:.1f}s\n{accuracy_table(final)}", flush=True)
    log.update(steps=step, train_wall_s=round(train_s, 1), total_wall_s=round(time.perf_counter() - start, 1),
               final_eval=final)
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    (out / "demo_prompts.json").write_text(json.dumps(demo_prompts(tokenizer), indent=1) + "\n")
    (out / "README.md").write_text(readme(cfg, args, log, final, n_params))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB): {sorted(f.name for f in out.iterdir())}", flush=True)
    return log


def demo_prompts(tokenizer: Tokenizer) -> list[dict[str, str]]:
    """One short held-out example per task (a stream no eval uses), for `dllm demo`."""
    out = []
    for task in TASKS:
        ex = generate_examples(task, 384, 1, seed=0, split="demo")[0]
        out.append({"task": task, "prompt": ex.prompt, "answer": ex.answer})
    return out


def readme(cfg: dict[str, Any], args: argparse.Namespace, log: dict[str, Any], final: dict[str, Any],
           n_params: int) -> str:
    device = log.get("device_name", log["device"])
    cmd = getattr(args, "command", None) or "training.train.train() called from Python"
    return f"""# Block-diffusion retrieval model ({n_params / 1e6:.1f}M parameters)

A small Qwen3-architecture block-diffusion language model trained from scratch by
`training/train.py` on synthetic long-context retrieval (no external data). It is the project's
bundled model for demos and accuracy runs of the offloading runtime. Character-level tokenizer
(printable ASCII + newline, {cfg['vocab_size']} ids).

## Model
- Qwen3 (q/k RMSNorm, no attention bias, tied embeddings), bf16 weights
- hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} query / \
{cfg['num_key_value_heads']} KV heads of dim {cfg['head_dim']}, MLP {cfg['intermediate_size']}
- RoPE theta {cfg['rope_theta']:g}; trained up to {cfg['training_context_length']} tokens \
(`original_max_position_embeddings`); `max_position_embeddings` {cfg['max_position_embeddings']}
- block diffusion: `block_size` {cfg['block_size']}, `mask_token_id` {cfg['mask_token_id']}, \
`eos_token_id` {cfg['eos_token_id']}; prompt attention block-causal (the runtime's Qwen3 default)

## Tasks (training/tasks.py)
Prompts of filler sentences with facts at random depths, ending in a question; the answer is a
5-6 digit number followed by EOS. `passkey` (one pass key), `multikey` (labelled pass keys, ask for
one), `kv` (`k3f9: 51207` lines among filler), `vartrack` (assignment chains `QXJ = 48213.`,
`MPL = QXJ.`, plus a distractor chain). Exact match after stripping whitespace.

## Training
SDAR/BD3-LM style: [clean sequence ; {args.noisy_copies} noisy copies of the answer blocks], clean part
block-causal, each noisy block sees the clean positions before it and itself; answer positions
masked with probability t ~ U({args.eps}, 1); cross-entropy on masked positions (weighting:
{args.loss_weighting}). Curriculum {log['curriculum']} (reaching the max at {args.ramp_end:.0%} of training,
{args.replay:.0%} replay of shorter stages), {args.tokens_per_batch} tokens per batch, AdamW lr {args.lr:g}
(warmup {args.warmup:.0%}, cosine to {args.min_lr_ratio:g}x), weight decay {args.weight_decay}, clip {args.clip},
{"bf16 autocast" if log["device"].startswith("cuda") else "fp32"}. {log['steps']} steps in {log['train_wall_s']} s on {device} (torch {log['torch']}).

Command: `{cmd}`

## Measured accuracy (exact match, dense engine, greedy, held-out seed {args.eval_seed}, \
{args.final_per_task} per task and context)
{accuracy_table(final, markdown=True)}

`training_log.json` holds the loss curve, the periodic evaluations and the arguments.
Re-measure: `python -m training.evaluate --model <this folder> --contexts 512 1024 2048 4096 --per-task 50`.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command = " ".join(["python -m training.train", *argv])
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
