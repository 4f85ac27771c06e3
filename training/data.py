"""Training data for block-diffusion retrieval: batch layout, the curriculum, and batch prefetching.

One training row (B = block size, blocks aligned to absolute position 0, as runtime/decoding.py
aligns them):

    clean:  [prompt ............ | answer EOS EOS..]      block-causal (the Qwen3 prompt_attention default)
    noisy:  copy 1 of the answer blocks, some answer positions [MASK]ed
            copy 2 ...                                    (noisy_copies, independent masks)
    pad

`layout_batch` builds a batch's arrays with numpy only (it runs in worker processes);
`to_device` adds the [N, L, L] visibility mask on the training device.

The curriculum is a list of levels (context length, tasks). Retrieval is learnt fastest where it
is easiest, so it starts at the shortest context with the pass-key task alone (one number to copy:
the model learns to find and copy digits), then all tasks at that context, then doubles the
context. A level is left when the periodic validation evaluation reaches `advance_at` on every one
of its tasks (or, with advance_on="mean", on their mean), or when a time floor says so (so the
run always ends at the longest context). Within a level, tasks are drawn with weight
`1 - accuracy` (at least `min_task_weight`): the steps go to what is not learnt yet. A level may
also vary its tasks for training (training.tasks.TaskOptions, e.g. shorter vartrack chains in a
warm-up level); evaluations always measure the unvaried tasks. The evaluations draw the validation
split (training/tasks.py), never the test split that reported numbers come from.
"""
from __future__ import annotations

import random
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from multiprocessing import get_context
from typing import Callable, Sequence

import numpy as np
import torch

from training.tasks import DEFAULT_OPTIONS, MIN_LENGTH, MIN_LENGTHS, TaskOptions, example_rng, make_example

CLEAN, NOISY, PAD = 0, 1, 2


# ----------------------------------------------------------------------------- text -> ids

class CharEncoder:
    """Text -> ids through a byte lookup table: the char tokenizer's encode, without its per-call cost."""

    def __init__(self, tokenizer):
        """tokenizer: a runtime.tokenizer.Tokenizer (or anything with token_to_id) of the char alphabet."""
        self.table = np.full(256, -1, dtype=np.int64)  # id of each ASCII code, -1: not in the alphabet
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


# ----------------------------------------------------------------------------- batch layout

@dataclass
class TrainBatch:
    """One training forward: N rows of [clean sequence ; noisy copies of its answer blocks ; padding].

    input_ids, positions, kind, copy_id, targets: [N, L] int64 (kind: CLEAN / NOISY / PAD; copy_id:
    -1 outside noisy copies; targets: -100 where there is no loss). weights: [N, L] fp32 loss weight
    per masked position. `mask` (built on first use, as it is the one large tensor: 1 GiB per row at
    32K tokens, which training/attention.py's flex path never builds): [N, L, L] bool, True = the
    query (dim 1) sees the key (dim 2).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    kind: torch.Tensor
    copy_id: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    block_size: int
    real_tokens: int
    masked_tokens: int

    @cached_property
    def mask(self) -> torch.Tensor:
        return training_mask(self.kind, self.positions, self.copy_id, self.block_size)


ARRAY_NAMES = ("input_ids", "positions", "kind", "copy_id", "targets", "weights")


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


def layout_batch(sequences: Sequence[tuple[list[int], list[int]]], *, block_size: int, mask_token_id: int,
                 eos_token_id: int, noisy_copies: int, generator: np.random.Generator, eps: float = 1e-3,
                 loss_weighting: str = "none", pad_multiple: int = 1) -> dict[str, np.ndarray]:
    """The numpy arrays of a TrainBatch (all but the mask) for (prompt ids, answer ids) pairs.

    Per noisy copy t ~ U(eps, 1); each answer/EOS position of the answer blocks is masked with
    probability t, at least one. loss_weighting "none": weight 1 per masked position (the loss
    averages them); "inv_t": weight 1/t, scaled so the loss is sum(CE / t) per maskable position.
    Returns ARRAY_NAMES -> [N, L] arrays (int64; weights float32).
    """
    if noisy_copies < 1:
        raise ValueError(f"noisy_copies={noisy_copies} must be >= 1")
    if loss_weighting not in ("none", "inv_t"):
        raise ValueError(f"loss_weighting={loss_weighting!r}; choose none or inv_t")
    if not sequences:
        raise ValueError("a batch needs at least one sequence")
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
    if loss_weighting == "inv_t":
        # The loss divides by the sum of weights; this scale turns it into sum(CE / t) / maskable positions.
        weights *= weights.sum() / maskable_total
    return dict(zip(ARRAY_NAMES, (ids, pos, kind, cid, targets, weights)))


def to_device(arrays: dict[str, np.ndarray], block_size: int, device: torch.device | str) -> TrainBatch:
    """A TrainBatch on `device` from `layout_batch` arrays (its mask is built there when first asked
    for). On CUDA the host arrays are pinned first so the copies do not wait for the GPU to drain the
    previous step."""
    dev = torch.device(device)
    pin = dev.type == "cuda"
    t_ = {}
    for name in ARRAY_NAMES:
        host = torch.from_numpy(arrays[name])
        t_[name] = (host.pin_memory() if pin else host).to(dev, non_blocking=pin)
    return TrainBatch(**t_, block_size=block_size, real_tokens=int((arrays["kind"] != PAD).sum()),
                      masked_tokens=int((arrays["targets"] != -100).sum()))


def build_batch(sequences: Sequence[tuple[list[int], list[int]]], *, block_size: int, mask_token_id: int,
                eos_token_id: int, noisy_copies: int, generator: np.random.Generator, eps: float = 1e-3,
                loss_weighting: str = "none", pad_multiple: int = 1,
                device: torch.device | str = "cpu") -> TrainBatch:
    """`layout_batch` then `to_device`: training rows for (prompt ids, answer ids) pairs."""
    arrays = layout_batch(sequences, block_size=block_size, mask_token_id=mask_token_id, eos_token_id=eos_token_id,
                          noisy_copies=noisy_copies, generator=generator, eps=eps, loss_weighting=loss_weighting,
                          pad_multiple=pad_multiple)
    return to_device(arrays, block_size, device)


# ----------------------------------------------------------------------------- what each step trains on

@dataclass(frozen=True)
class BatchRequest:
    """Batch number `index`: `rows` examples of `context` tokens, tasks drawn with `weights` and
    built with `options`."""

    index: int
    context: int
    rows: int
    tasks: tuple[str, ...]
    weights: tuple[float, ...]
    options: TaskOptions = DEFAULT_OPTIONS


@dataclass(frozen=True)
class LayoutSettings:
    """Everything a worker needs to turn a BatchRequest into arrays (picklable)."""

    seed: int
    block_size: int
    mask_token_id: int
    eos_token_id: int
    noisy_copies: int
    eps: float
    loss_weighting: str
    pad_multiple: int
    max_rows: int
    encoder: CharEncoder
    # > 0: rows are padded to a multiple of max(pad_multiple, context // length_buckets) as well, so
    # a level sees two or three distinct lengths (flex attention compiles a kernel per length)
    length_buckets: int = 0

    def pad_for(self, context: int) -> int:
        if self.length_buckets <= 0:
            return self.pad_multiple
        return max(self.pad_multiple, context // self.length_buckets)


def make_batch_arrays(settings: LayoutSettings, request: BatchRequest) -> dict[str, np.ndarray]:
    """The arrays of one batch. Deterministic in (seed, request): workers may run in any order."""
    rng = random.Random(f"train-batch/{settings.seed}/{request.index}")
    tasks = rng.choices(request.tasks, weights=request.weights, k=request.rows)
    pairs = []
    for row, task in enumerate(tasks):
        ex = make_example(task, request.context, example_rng(
            "train", settings.seed, task, request.context, request.index * settings.max_rows + row), request.options)
        pairs.append((settings.encoder(ex.prompt), settings.encoder(ex.answer)))
    return layout_batch(pairs, block_size=settings.block_size, mask_token_id=settings.mask_token_id,
                        eos_token_id=settings.eos_token_id, noisy_copies=settings.noisy_copies,
                        generator=np.random.default_rng([settings.seed, request.index]), eps=settings.eps,
                        loss_weighting=settings.loss_weighting, pad_multiple=settings.pad_for(request.context))


class BatchSource:
    """Batches made ahead by worker processes (or inline with workers=0), in request order.

    `lookahead` requests are kept in flight; a request is made by `next_request` when it is
    submitted, so a curriculum change reaches the batches `lookahead` steps later. Worker
    processes are spawned (never forked: the parent may hold a CUDA context). If the pool fails,
    the source says so and makes batches inline from then on: a run never dies of its data.
    """

    def __init__(self, settings: LayoutSettings, workers: int, lookahead: int | None = None):
        self.make = partial(make_batch_arrays, settings)
        self.lookahead = max(1, lookahead if lookahead is not None else 2 * workers)
        self.pending: deque[tuple[BatchRequest, Future | None]] = deque()
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))

    def next(self, next_request: Callable[[], BatchRequest]) -> tuple[BatchRequest, dict[str, np.ndarray]]:
        """The oldest pending batch (topping the queue up with new requests first)."""
        while self.pool is not None and len(self.pending) < self.lookahead:
            request = next_request()
            future = self._submit(request)  # may replace self.pending (pool failure): look it up after
            self.pending.append((request, future))
        if not self.pending:
            request = next_request()
            return request, self.make(request)
        request, future = self.pending.popleft()
        if future is not None:
            try:
                return request, future.result()
            except Exception as exc:  # noqa: BLE001 - any pool failure: fall back, keep training
                self._fail(exc)
        return request, self.make(request)

    def _submit(self, request: BatchRequest) -> Future | None:
        try:
            return self.pool.submit(self.make, request)
        except Exception as exc:  # noqa: BLE001 - a dead or shut-down pool
            self._fail(exc)
            return None

    def _fail(self, exc: Exception) -> None:
        if self.pool is None:
            return
        print(f"data workers failed ({type(exc).__name__}: {exc}); making batches inline from now on",
              file=sys.stderr, flush=True)
        self.close()
        self.pending = deque((r, None) for r, _ in self.pending)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


# ----------------------------------------------------------------------------- curriculum

def doubling_contexts(min_context: int, max_context: int) -> list[int]:
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
    """Index of the stage the time schedule asks for at `progress` in [0, 1]: stages enter evenly
    over [0, ramp_end), the last one holds from ramp_end to the end."""
    if num_stages == 1:
        return 0
    return min(num_stages - 1, int(progress / ramp_end * (num_stages - 1)))


def stage_at_shares(progress: float, shares: Sequence[float]) -> int:
    """Index of the stage the time schedule asks for at `progress` in [0, 1] when stage i is given
    shares[i] / sum(shares) of training (stage i enters at the sum of the shares before it)."""
    total, edge = sum(shares), 0.0
    for i, share in enumerate(shares[:-1]):
        edge += share / total
        if progress < edge:
            return i
    return len(shares) - 1


@dataclass(frozen=True)
class Level:
    context: int
    tasks: tuple[str, ...]
    options: TaskOptions = DEFAULT_OPTIONS  # how training examples of this level vary the tasks


def fitting_tasks(context: int, tasks: Sequence[str]) -> tuple[str, ...]:
    """The tasks (in order) whose examples fit `context` tokens (training.tasks.MIN_LENGTHS)."""
    return tuple(t for t in tasks if MIN_LENGTHS[t] <= context)


def make_levels(min_context: int, max_context: int, tasks: Sequence[str],
                warmup_tasks: Sequence[str] = (), options: TaskOptions = DEFAULT_OPTIONS,
                warmup_options: TaskOptions | None = None) -> list[Level]:
    """[warm-up tasks at the shortest context (if they are a strict subset)]
    + [all tasks at the shortest context built with `warmup_options` (if given)]
    + all tasks at each context, built with `options`.

    A level holds the tasks that fit its context (a RULER-style task from its MIN_LENGTHS entry on),
    so a run may start short with the tasks that fit there and take the others in as it grows."""
    contexts = doubling_contexts(min_context, max_context)
    unknown = set(warmup_tasks) - set(tasks)
    if unknown:
        raise ValueError(f"warm-up tasks {sorted(unknown)} are not among the trained tasks {list(tasks)}")
    unknown = [t for t in tasks if t not in MIN_LENGTHS]
    if unknown:
        raise ValueError(f"tasks {unknown} are unknown; choose from {tuple(MIN_LENGTHS)}")
    never = [t for t in tasks if MIN_LENGTHS[t] > max_context]
    if never:
        raise ValueError(f"tasks {never} need contexts of at least {[MIN_LENGTHS[t] for t in never]} tokens, "
                         f"beyond max_context={max_context}")
    first = fitting_tasks(contexts[0], tasks)
    if not first or set(warmup_tasks) - set(first):
        raise ValueError(f"the shortest context {contexts[0]} holds the tasks {list(first)} only (training.tasks."
                         f"MIN_LENGTHS), not all of {list(warmup_tasks) or list(tasks)}: raise min_context or "
                         "choose other warm-up tasks")
    levels = []
    if warmup_tasks and set(warmup_tasks) != set(first):
        levels.append(Level(contexts[0], tuple(t for t in first if t in warmup_tasks), options))
    if warmup_options is not None:
        levels.append(Level(contexts[0], first, warmup_options))
    return levels + [Level(c, fitting_tasks(c, tasks), options) for c in contexts]


ADVANCE_RULES = ("all", "mean")


@dataclass
class Curriculum:
    """The level each step trains at: max(the level evaluations earned, the time floor).

    advance_at: leave a level when every one of its tasks scores at least this in a validation
    evaluation at its context (advance_on="all"), or their mean does (advance_on="mean": one slow
    task does not hold every other back at a short context); None: never, the time floor alone
    moves. ramp_end: the fraction of training by which the time floor reaches the last level.
    replay: probability that a step trains on an earlier level's (shorter) context, with the
    current tasks that fit it, against forgetting.
    shares: one weight per level; the time floor then gives level i shares[i] / sum(shares) of
    training instead of the even ramp (ramp_end is unused): e.g. more time where a skill is learnt
    (short contexts) and at the longest context, less in between.
    """

    levels: list[Level]
    advance_at: float | None = 0.9
    ramp_end: float = 0.8
    replay: float = 0.2
    min_task_weight: float = 0.15
    seed: int = 0
    advance_on: str = "all"
    shares: tuple[float, ...] | None = None
    earned: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a curriculum needs at least one level")
        if self.advance_on not in ADVANCE_RULES:
            raise ValueError(f"advance_on={self.advance_on!r}; choose one of {ADVANCE_RULES}")
        if self.shares is not None:
            if len(self.shares) != len(self.levels) or min(self.shares) <= 0:
                raise ValueError(f"level time shares {list(self.shares)} must be {len(self.levels)} positive numbers, "
                                 f"one per level: {[(lv.context, list(lv.tasks)) for lv in self.levels]}")
        self.rng = random.Random(f"curriculum/{self.seed}")

    def floor_at(self, progress: float) -> int:
        """The level the time floor asks for at `progress` in [0, 1]."""
        if self.shares is not None:
            return stage_at_shares(progress, self.shares)
        return stage_at(progress, len(self.levels), self.ramp_end)

    def level_at(self, progress: float) -> int:
        return max(self.earned, self.floor_at(progress))

    def record(self, level: int, accuracy: dict[str, float], step: int, elapsed: float) -> bool:
        """Take a validation evaluation of `level` (task -> accuracy at its context); True if it earned
        the next level."""
        self.accuracy.update(accuracy)
        lv = self.levels[level]
        scores = [accuracy.get(t, 0.0) for t in lv.tasks]
        score = min(scores) if self.advance_on == "all" else sum(scores) / len(scores)
        passed = (self.advance_at is not None and level + 1 < len(self.levels) and level >= self.earned
                  and score >= self.advance_at)
        if passed:
            self.earned = level + 1
            self.history.append({"step": step, "elapsed_s": round(elapsed, 1), "earned_level": self.earned,
                                 "context": self.levels[self.earned].context,
                                 "tasks": list(self.levels[self.earned].tasks), "by": "evaluation"})
        return passed

    def weights(self, tasks: Sequence[str]) -> tuple[float, ...]:
        """Sampling weight of each task: 1 - its last accuracy, floored (1 before any evaluation)."""
        return tuple(max(self.min_task_weight, 1.0 - self.accuracy.get(t, 0.0)) for t in tasks)

    def request(self, index: int, progress: float, tokens_per_batch: int, max_rows: int) -> BatchRequest:
        """What batch `index` trains on at `progress`."""
        level = self.level_at(progress)
        lv = self.levels[level]
        context = lv.context
        shorter = sorted({x.context for x in self.levels[:level] if x.context < lv.context})
        if shorter and self.rng.random() < self.replay:
            context = self.rng.choice(shorter)
        tasks = fitting_tasks(context, lv.tasks)  # a replayed context holds the tasks that fit it
        rows = max(1, min(max_rows, tokens_per_batch // context))
        return BatchRequest(index=index, context=context, rows=rows, tasks=tasks, weights=self.weights(tasks),
                            options=lv.options)


__all__ = ["CLEAN", "NOISY", "PAD", "ARRAY_NAMES", "CharEncoder", "TrainBatch", "training_mask", "layout_batch",
           "to_device", "build_batch", "BatchRequest", "LayoutSettings", "make_batch_arrays", "BatchSource",
           "doubling_contexts", "stage_at", "stage_at_shares", "Level", "fitting_tasks", "make_levels", "ADVANCE_RULES",
           "Curriculum"]
