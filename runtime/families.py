"""Model families: which checkpoint is which, and how each one decodes by default.

A family is recognised from config.json's `model_type` or `architectures`. It names the forward
that runs it (`architecture`) and the decoding defaults its authors publish, for the settings
the hub files leave out (SDAR's config.json states no block size, Fast-dLLM v2's no sub-block).
`runtime.engine.resolve_settings` is the one place that decides a setting: the user's
`EngineConfig` first, then the checkpoint's files, then these defaults.

Decoding rules (`decoding`):
- "sdar": every [MASK] position of the block is predicted from its own logits; the prompt's whole
  blocks are prefilled and its tail shares the first generated block (SDAR's
  `block_diffusion_generate`; TraDo and the project's own checkpoints decode the same way).
- "fast_dllm_v2": token shift: position i is predicted from the logits at i - 1. A block's first
  position is decoded autoregressively: from the last logits of the finished previous block (or
  of the prompt, when it ends on a block boundary). The block unmasks left to right in sub-blocks
  of `sub_block_size`, each by threshold (at least one token a pass) before the next opens
  (Fast-dLLM v2's `generate()`).

The MoE families (SDAR-30B-A3B on Qwen3-MoE, LLaDA2.0) run on the same forward with a
mixture-of-experts MLP (runtime/moe.py). LLaDA2.0's `generate()` is SDAR's rule at its own numbers
(block 32, 32 steps, threshold 0.95: one token a step at least, every one above the threshold).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DecodingRule = Literal["sdar", "fast_dllm_v2"]
DECODING_RULES: tuple[str, ...] = ("sdar", "fast_dllm_v2")


@dataclass(frozen=True)
class Family:
    """A model family: how to recognise its config.json and its published decoding defaults.

    None means the family publishes no default: the checkpoint must state it (or the user).
    """

    name: str
    description: str
    architecture: str  # the forward it runs on: qwen2 | qwen3 | qwen3_moe | llada2_moe
    model_types: tuple[str, ...]  # config.json model_type values, lower case
    architectures: tuple[str, ...]  # config.json `architectures` entries
    decoding: DecodingRule = "sdar"
    block_size: int | None = None
    denoising_steps: int | None = None  # None: one step per block position at most
    unmasking: str = "threshold"
    threshold: float = 0.9
    sub_block_size: int | None = None  # fast_dllm_v2: positions unmasked left to right at a time
    mask_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # only where config.json, generation_config.json and the tokenizer name none
    prompt_attention: str = "block_causal"  # how the prompt's whole blocks see each other when prefilled
    partial_rotary: bool = False  # RoPE on part of the head dims (config.json partial_rotary_factor)

    def describe(self) -> str:
        keys = ", ".join([*(f"model_type {t!r}" for t in self.model_types), *self.architectures])
        return f"{self.name} ({self.description}: {keys})"


FAMILIES: tuple[Family, ...] = (
    # SDAR's block_diffusion_generate and its model card: block 4, 4 steps, low_confidence_dynamic
    # at 0.9; mask <|MASK|> 151669. TraDo (Gen-Verse/dLLM-RL) ships SDAR's config and code.
    Family("sdar", "SDAR and TraDo, Qwen3-based", "qwen3", ("sdar",), ("SDARForCausalLM",),
           block_size=4, denoising_steps=4, threshold=0.9, mask_token_id=151669),
    # Fast-dLLM v2's generate() and model card: bd_size 32, small_block_size 8, threshold 0.9,
    # mask |<MASK>| 151665; its eval mask prefills the prompt block-causally.
    Family("fast_dllm_v2", "Fast-dLLM v2, Qwen2.5-based", "qwen2", ("fast_dllm_qwen",),
           ("Fast_dLLM_QwenForCausalLM",), decoding="fast_dllm_v2", block_size=32, threshold=0.9,
           sub_block_size=8, mask_token_id=151665),
    # The project's own checkpoints (training/): config.json states block size and mask.
    Family("qwen3", "Qwen3 block-diffusion checkpoints", "qwen3", ("qwen3",), ("Qwen3ForCausalLM",)),
    Family("qwen2", "Qwen2 block-diffusion checkpoints", "qwen2", ("qwen2",), ("Qwen2ForCausalLM",),
           prompt_attention="causal"),
    # SDAR-30B-A3B: Qwen3-MoE's keys and tensors, decoded as SDAR.
    Family("sdar_moe", "SDAR-30B-A3B, Qwen3-MoE-based", "qwen3_moe", ("sdar_moe",), ("SDARMoeForCausalLM",),
           block_size=4, denoising_steps=4, threshold=0.9, mask_token_id=151669),
    Family("qwen3_moe", "Qwen3-MoE block-diffusion checkpoints", "qwen3_moe", ("qwen3_moe",),
           ("Qwen3MoeForCausalLM",)),
    # LLaDA2.0's generate(): block 32, 32 steps, threshold 0.95, mask 156895, eos 156892.
    Family("llada2_moe", "LLaDA2.0", "llada2_moe", ("llada2_moe",), ("LLaDA2MoeModelLM",),
           block_size=32, denoising_steps=32, threshold=0.95, mask_token_id=156895, eos_token_ids=(156892,),
           partial_rotary=True),
)


def supported_families() -> str:
    return "; ".join(f.describe() for f in FAMILIES)


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"family {name!r} is not known; known: {[f.name for f in FAMILIES]}")


def detect_family(cfg: dict[str, Any]) -> Family:
    """The family config.json describes (model_type first, then architectures), refusing an
    unknown one with every supported family named, and partial rotary embeddings in a family that
    rotates whole heads."""
    model_type = str(cfg.get("model_type") or "").lower()
    archs = list(cfg.get("architectures") or [])
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    family = family or next((f for f in FAMILIES if any(a in f.architectures for a in archs)), None)
    if family is None:
        raise ValueError(f"config.json has model_type={cfg.get('model_type')!r}, architectures={archs!r}, "
                         f"which is none of the supported families: {supported_families()}")
    partial = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0) and not family.partial_rotary:
        raise ValueError(f"config.json sets partial_rotary_factor={partial}, but the {family.name} family rotates "
                         "the whole head dimension: remove the key (or set it to 1.0) if the model was trained so")
    return family
