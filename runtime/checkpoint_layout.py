"""How each family stores the model's tensors: checkpoint names and shapes <-> the forward's.

The forward (runtime/model.py) names its tensors as Qwen does. Most families store exactly those;
where one does not, each of the forward's tensors is assembled from stored ones:
- LLaDA2.0 keeps q, k and v as row ranges of one `attention.query_key_value`, names o_proj
  `attention.dense`, the q/k norms `query_layernorm` / `key_layernorm`, the embedding
  `word_embeddings`;
- the MoE families (Qwen3-MoE / SDAR-30B-A3B, LLaDA2.0) store each expert's gate_proj, up_proj and
  down_proj apart (`mlp.experts.{e}.gate_proj.weight`) and the router as `mlp.gate`; the forward
  runs stacked [E, ...] expert tensors (runtime/moe.py), its router is `mlp.router`.

A `Stored` recipe says how: the forward's tensor is the stack (over experts) of the concatenation
(along dim 0) of row ranges of stored tensors. Loading assembles by it; saving takes it apart, so
a checkpoint the project writes is one the family's own code loads.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from runtime.config import ModelConfig


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of stored tensor `name` (all rows when `rows` is None), and columns
    (dim 1) [start, stop) of them (all when `cols` is None: only a tensor-parallel shard narrows them)."""

    name: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None


@dataclass(frozen=True)
class Stored:
    """A forward tensor = stack over `parts` (when `stacked`) of cat(dim 0) over each part's pieces."""

    parts: tuple[tuple[Piece, ...], ...]
    stacked: bool = False

    def pieces(self) -> list[Piece]:
        return [piece for part in self.parts for piece in part]


def _identity(name: str) -> Stored:
    return Stored(((Piece(name),),))


def _renamed(name: str, config: ModelConfig) -> str:
    """The stored name of a forward tensor that is stored whole."""
    if config.architecture == "llada2_moe":
        name = name.replace("model.embed_tokens.", "model.word_embeddings.")
        name = name.replace(".self_attn.o_proj.", ".attention.dense.")
        name = name.replace(".self_attn.q_norm.", ".attention.query_layernorm.")
        name = name.replace(".self_attn.k_norm.", ".attention.key_layernorm.")
    return name.replace(".mlp.router.weight", ".mlp.gate.weight").replace(".mlp.router.expert_bias",
                                                                           ".mlp.gate.expert_bias")


_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_QKV = re.compile(r"^(model\.layers\.\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def stored_as(config: ModelConfig, forward_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Stored]:
    """For each of the forward's tensors (name -> shape), how the checkpoint stores it."""
    out = {}
    for name, shape in forward_shapes.items():
        if (m := _EXPERTS.match(name)) is not None:
            prefix, which = m.groups()
            names = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
            out[name] = Stored(tuple(tuple(Piece(f"{prefix}.{e}.{n}.weight") for n in names)
                                     for e in range(shape[0])), stacked=True)
        elif config.architecture == "llada2_moe" and (m := _QKV.match(name)) is not None:
            prefix, which, kind = m.groups()
            q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            start = {"q": 0, "k": q, "v": q + kv}[which]
            out[name] = Stored(((Piece(f"{prefix}.attention.query_key_value.{kind}", (start, start + shape[0])),),))
        else:
            out[name] = _identity(_renamed(name, config))
    return out


def stored_shapes(config: ModelConfig, forward_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, recipe in stored_as(config, forward_shapes).items():
        shape = forward_shapes[name][1:] if recipe.stacked else forward_shapes[name]
        for part in recipe.parts:
            for piece in part:
                if piece.rows is None:  # a whole tensor: a part's pieces split its rows evenly (gate, up)
                    shapes[piece.name] = (shape[0] // len(part), *shape[1:])
                else:  # a row range: the stored tensor reaches at least to its end
                    rows = max(shapes.get(piece.name, (0,))[0], piece.rows[1])
                    shapes[piece.name] = (rows, *shape[1:])
    return shapes


def assemble(recipe: Stored, read: Callable[[Piece], torch.Tensor]) -> torch.Tensor:
    """The forward's tensor from the stored ones (`read(piece)` gives a piece's rows and columns)."""
    parts = []
    for part in recipe.parts:
        pieces = [read(p) for p in part]
        parts.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    return torch.stack(parts) if recipe.stacked else parts[0]


def shard(recipes: Mapping[str, Stored], shapes: Mapping[str, tuple[int, ...]], kinds: Mapping[str, str],
          rank: int, world_size: int) -> dict[str, Stored]:
    """The recipes of one tensor-parallel rank's shard.

    recipes, shapes: the whole model's (`stored_as`, the forward's shapes); kinds: for each tensor
    the shard holds, "rows" (each piece's rows split in `world_size` chunks: q/k/v, gate/up, so
    that LLaDA2.0's fused QKV and an expert's gate and up rows each give the rank its heads and
    its intermediate slice), "cols" (dim 1 of the stored tensor: o_proj, down_proj) or "replicated".
    """
    out = {}
    for name, kind in kinds.items():
        recipe = recipes[name]
        if kind == "replicated":
            out[name] = recipe
            continue
        rows_of_forward = shapes[name][1] if recipe.stacked else shapes[name][0]
        parts = []
        for part in recipe.parts:
            pieces = []
            for piece in part:
                if kind == "rows":
                    start, stop = piece.rows or (0, rows_of_forward // len(part))
                    chunk = (stop - start) // world_size
                    pieces.append(Piece(piece.name, (start + rank * chunk, start + (rank + 1) * chunk)))
                else:
                    chunk = shapes[name][-1] // world_size
                    pieces.append(Piece(piece.name, piece.rows, (rank * chunk, (rank + 1) * chunk)))
            parts.append(tuple(pieces))
        out[name] = Stored(tuple(parts), recipe.stacked)
    return out


def disassemble(recipes: Mapping[str, Stored], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stored tensors of a forward state dict (the inverse of `assemble`)."""
    out: dict[str, torch.Tensor] = {}
    ranges: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, recipe in recipes.items():
        for index, part in enumerate(recipe.parts):
            rows = state[name][index] if recipe.stacked else state[name]
            for piece, chunk in zip(part, rows.chunk(len(part))):
                if piece.rows is None:
                    out[piece.name] = chunk
                else:
                    ranges.setdefault(piece.name, []).append((piece.rows[0], rows))
    for name, chunks in ranges.items():
        out[name] = torch.cat([chunk for _, chunk in sorted(chunks, key=lambda c: c[0])])
    return out
