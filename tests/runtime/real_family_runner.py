"""Runs the real modeling code of a model family (SDAR, TraDo, Fast-dLLM v2, SDAR-MoE, LLaDA2.0) on
a small checkpoint.

Run as a script, in a process of its own (`real_family_code.run_real_code` starts it): the real
files were written for transformers 4.52-4.53, which cannot share a process with the project's
transformers. `python real_family_runner.py TASK.json OUT.pt`; TASK names the family, the folder
of its modeling files (shared/reference-models/...), the checkpoint folder and what to compute:
- "logits": for each id list, the logits of the whole sequence under the family's own attention
  mask (block-causal over the whole sequence, as both families prefill and decode);
- "decode": for each prompt, greedy decoding by the family's own rule: Fast-dLLM v2's
  `generate()` itself; for SDAR and TraDo, whose repositories keep `block_diffusion_generate`
  outside the modeling file (JetAstra/SDAR generate.py), `sdar_block_diffusion_generate` below,
  a restatement of it (low_confidence_dynamic remasking, argmax for greedy) that drives the real
  model through its own KV cache (`store_kv`) exactly as that function does; for SDAR-MoE, whose
  reference is transformers' own `Qwen3MoeForCausalLM` (no `store_kv`), the same rule recomputing
  the whole sequence under the block-causal mask at each step (what the cache saves); LLaDA2.0's
  `generate()` itself.

Test stand-ins, not the real packages: `flash_attn` (not installable without CUDA) routes
`flash_attn_func` to torch's SDPA and `rms_norm_fn` to a plain fp32 RMSNorm, the computations they
implement; the hub-kernels package of the project's environment is hidden from the old transformers;
LLaDA2.0's file, written for a later transformers, gets the one name it imports that 4.53 lacks
(`TransformersKwargs`, a TypedDict used only in annotations).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F


def install_flash_attn_stand_in() -> None:
    def flash_attn_func(q, k, v, causal=False, softmax_scale=None, **_):
        # flash_attn's layout is [batch, length, heads, dim]; SDPA's [batch, heads, length, dim]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    def rms_norm_fn(x, weight, bias=None, eps=1e-6, **_):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    modules = {name: types.ModuleType(name) for name in
               ("flash_attn", "flash_attn.ops", "flash_attn.ops.triton", "flash_attn.ops.triton.layer_norm")}
    for name, module in modules.items():
        # a spec without an installed distribution: transformers finds it but never takes it for FA2
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    modules["flash_attn"].flash_attn_func = flash_attn_func
    modules["flash_attn.ops.triton.layer_norm"].rms_norm_fn = rms_norm_fn
    sys.modules.update(modules)
    sys.modules["kernels"] = None  # the project's hub-kernels package needs a newer huggingface_hub


def import_family(modeling_dir: Path | None, package: str, work: Path):
    """The family's model and configuration classes: transformers' own for Qwen3-MoE, else
    imported from a copy of its files in a package of their own (they import each other relatively)."""
    if package == "qwen3_moe":
        import transformers

        return transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
    target = work / package
    target.mkdir()
    for file in modeling_dir.glob("*.py"):
        if file.name != "__init__.py":
            shutil.copy(file, target / file.name)
    (target / "__init__.py").write_text("")
    sys.path.insert(0, str(work))
    if package == "fast_dllm_v2":
        modeling = importlib.import_module(f"{package}.modeling")
        return modeling.Fast_dLLM_QwenForCausalLM, importlib.import_module(f"{package}.configuration").Fast_dLLM_QwenConfig
    if package == "llada2":
        # written for a later transformers, which adds TransformersKwargs, a TypedDict it only annotates with
        import typing

        import transformers.utils

        if not hasattr(transformers.utils, "TransformersKwargs"):
            transformers.utils.TransformersKwargs = typing.TypedDict("TransformersKwargs", {}, total=False)
        # the modeling file imports its configuration as configuration_llada2_moe
        shutil.copy(target / "configuration_llada2_moe_dllm.py", target / "configuration_llada2_moe.py")
        modeling = importlib.import_module(f"{package}.modeling_llada2_moe_dllm")
        return modeling.LLaDA2MoeModelLM, importlib.import_module(f"{package}.configuration_llada2_moe").LLaDA2MoeConfig
    modeling = importlib.import_module(f"{package}.modeling_sdar")
    return modeling.SDARForCausalLM, importlib.import_module(f"{package}.configuration_sdar").SDARConfig


def load(model_cls, config_cls, model_dir: Path):
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("auto_map", "model_type"):
        cfg.pop(key, None)
    config = config_cls(**cfg)
    # as from_pretrained picks it: LLaDA2.0 takes its block-diffusion mask as given only under SDPA
    config._attn_implementation = "sdpa"
    model = model_cls(config).float().eval()
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model


def block_causal(length: int, block: int) -> torch.Tensor:
    """[1, 1, L, L] float 0/1: SDAR's block_diffusion_attention_mask for the whole sequence."""
    blocks = -(-length // block)
    mask = torch.tril(torch.ones(blocks, blocks)).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return mask[:length, :length][None, None]


def additive(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as the additive one (0 / -inf) transformers' own models take as given."""
    return torch.zeros_like(mask).masked_fill(mask == 0, float("-inf"))


@torch.no_grad()
def sdar_logits(model, ids: list[int], block: int) -> torch.Tensor:
    x = torch.tensor([ids])
    return model(x, attention_mask=block_causal(len(ids), block), position_ids=torch.arange(len(ids))[None],
                 use_cache=False).logits[0].float()


@torch.no_grad()
def full_mask_logits(model, ids: list[int], block: int) -> torch.Tensor:
    """Logits of the whole sequence under the block-causal mask, given additively (Qwen3-MoE, LLaDA2.0)."""
    x = torch.tensor([ids])
    return model(x, attention_mask=additive(block_causal(len(ids), block)),
                 position_ids=torch.arange(len(ids))[None], use_cache=False).logits[0].float()


def low_confidence_dynamic(cur_x: torch.Tensor, logits: torch.Tensor, mask_id: int, quota: int,
                           threshold: float) -> None:
    """One step of SDAR's low_confidence_dynamic remasking, greedy, on cur_x [1, B] in place."""
    mask_index = cur_x == mask_id
    x0_p, x0 = F.softmax(logits.float(), dim=-1).max(-1)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    high_conf_mask = confidence[0] > threshold
    if high_conf_mask.sum() >= quota:
        transfer_index[0] = high_conf_mask
    else:
        transfer_index[0, torch.topk(confidence[0], quota).indices] = True
    cur_x[transfer_index] = x0[transfer_index]


@torch.no_grad()
def sdar_block_diffusion_generate(model, prompt: list[int], mask_id: int, gen_length: int, block_length: int,
                                  denoising_steps: int, confidence_threshold: float,
                                  stopping_criteria_idx: list[int] | None) -> list[int]:
    """SDAR's block_diffusion_generate (JetAstra/SDAR generate.py), remasking_strategy
    'low_confidence_dynamic', greedy: the argmax and its probability stand in for the sample."""
    from transformers.cache_utils import DynamicCache

    prompt_length = len(prompt)
    past_key_values = DynamicCache()
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    mask = block_causal(total_length, block_length)
    position_ids = torch.arange(total_length)[None]
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[0, :prompt_length] = torch.tensor(prompt)
    prefill_blocks = prompt_length // block_length
    prefill_length = prefill_blocks * block_length
    if prefill_length > 0:
        model(x[:, :prefill_length], attention_mask=mask[..., :prefill_length, :prefill_length],
              position_ids=position_ids[:, :prefill_length], past_key_values=past_key_values, use_cache=True,
              store_kv=True)
    base, remainder = divmod(block_length, denoising_steps)
    num_transfer_tokens = [base + (1 if s < remainder else 0) for s in range(denoising_steps)]
    for num_block in range(prefill_blocks, num_blocks):
        rows = slice(num_block * block_length, (num_block + 1) * block_length)
        cur_x = x[:, rows].clone()
        cur_mask = mask[..., rows, :(num_block + 1) * block_length]
        cur_positions = position_ids[:, rows]
        for step in range(denoising_steps + 1):
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:
                model(cur_x, attention_mask=cur_mask, position_ids=cur_positions, past_key_values=past_key_values,
                      use_cache=True, store_kv=True)
                break
            logits = model(cur_x, attention_mask=cur_mask, position_ids=cur_positions,
                           past_key_values=past_key_values, use_cache=True, store_kv=False).logits
            low_confidence_dynamic(cur_x, logits, mask_id, num_transfer_tokens[step], confidence_threshold)
        x[:, rows] = cur_x
        if stopping_criteria_idx and any(stop in x[0, prompt_length:] for stop in stopping_criteria_idx):
            break
    return x[0, prompt_length:].tolist()


@torch.no_grad()
def uncached_block_diffusion_generate(model, prompt: list[int], mask_id: int, gen_length: int, block_length: int,
                                      denoising_steps: int, confidence_threshold: float,
                                      stopping_criteria_idx: list[int] | None) -> list[int]:
    """`sdar_block_diffusion_generate` for a model without SDAR's `store_kv`: every step runs the
    sequence up to the block's end under the block-causal mask, the prompt and finished blocks
    included (the KV a cache would hold, recomputed)."""
    prompt_length = len(prompt)
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    x = torch.full((1, num_blocks * block_length), mask_id, dtype=torch.long)
    x[0, :prompt_length] = torch.tensor(prompt)
    mask = additive(block_causal(num_blocks * block_length, block_length))
    base, remainder = divmod(block_length, denoising_steps)
    num_transfer_tokens = [base + (1 if s < remainder else 0) for s in range(denoising_steps)]
    for num_block in range(prompt_length // block_length, num_blocks):
        end = (num_block + 1) * block_length
        for step in range(denoising_steps):
            cur_x = x[:, end - block_length:end]
            if (cur_x == mask_id).sum() == 0:
                break
            logits = model(x[:, :end], attention_mask=mask[..., :end, :end], position_ids=torch.arange(end)[None],
                           use_cache=False).logits[:, -block_length:]
            low_confidence_dynamic(cur_x, logits, mask_id, num_transfer_tokens[step], confidence_threshold)
        if stopping_criteria_idx and any(stop in x[0, prompt_length:end] for stop in stopping_criteria_idx):
            break
    return x[0, prompt_length:].tolist()


@torch.no_grad()
def llada2_generate(model, prompt: list[int], mask_id: int, gen_length: int, block_length: int, steps: int,
                    threshold: float, stop: int | None) -> list[int]:
    # generate() builds its additive mask in bf16 (0 / -inf, exact in any float dtype); SDPA wants the
    # fp32 model's dtype
    forward = model.forward

    def fp32_mask_forward(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(model.dtype)
        return forward(*args, attention_mask=attention_mask, **kwargs)

    model.forward = fp32_mask_forward
    out = model.generate(torch.tensor([prompt]), temperature=0.0, block_length=block_length, steps=steps,
                         gen_length=gen_length, threshold=threshold, eos_id=-1 if stop is None else stop,
                         mask_id=mask_id)
    return out[0].tolist()


@torch.no_grad()
def fast_dllm_logits(model, ids: list[int], block: int) -> torch.Tensor:
    # no cache: its eval mask is block-causal over the whole sequence
    return model(input_ids=torch.tensor([ids]), block_size=block).logits[0].float()


@torch.no_grad()
def fast_dllm_generate(model, prompt: list[int], mask_id: int, gen_length: int, block_length: int,
                       small_block_size: int, threshold: float, stop: int | None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=gen_length, mask_id=mask_id, threshold=threshold,
                         small_block_size=small_block_size, block_size=block_length,
                         stop_token=-1 if stop is None else stop, temperature=0)[0]
    return out[0, len(prompt):].tolist()


def main(task_file: str, out_file: str) -> None:
    task = json.loads(Path(task_file).read_text())
    install_flash_attn_stand_in()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        modeling_dir = Path(task["modeling_dir"]) if task.get("modeling_dir") else None
        model_cls, config_cls = import_family(modeling_dir, task["package"], Path(work))
        model = load(model_cls, config_cls, Path(task["model_dir"]))
        block = task["block_size"]
        package = task["package"]
        logits_of = {"fast_dllm_v2": fast_dllm_logits, "qwen3_moe": full_mask_logits,
                     "llada2": full_mask_logits}.get(package, sdar_logits)
        logits = [logits_of(model, ids, block) for ids in task["logits"]]
        decoded = []
        for job in task["decode"]:
            if package == "fast_dllm_v2":
                decoded.append(fast_dllm_generate(model, job["prompt"], task["mask_id"], job["gen_length"], block,
                                                  task["sub_block_size"], task["threshold"], job.get("stop")))
            elif package == "llada2":
                decoded.append(llada2_generate(model, job["prompt"], task["mask_id"], job["gen_length"], block,
                                               task["steps"], task["threshold"], job.get("stop")))
            elif package == "qwen3_moe":
                stop = [job["stop"]] if job.get("stop") is not None else None
                decoded.append(uncached_block_diffusion_generate(model, job["prompt"], task["mask_id"],
                                                                 job["gen_length"], block, task["steps"],
                                                                 task["threshold"], stop))
            else:
                stop = [job["stop"]] if job.get("stop") is not None else None
                decoded.append(sdar_block_diffusion_generate(model, job["prompt"], task["mask_id"], job["gen_length"],
                                                             block, task["steps"], task["threshold"], stop))
    import transformers

    torch.save({"logits": logits, "decoded": decoded, "transformers": transformers.__version__}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:3])
