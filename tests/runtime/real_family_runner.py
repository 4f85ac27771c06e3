"""Runs the real modeling code of a model family (SDAR, TraDo, Fast-dLLM v2) on a small checkpoint.

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
  model through its own KV cache (`store_kv`) exactly as that function does.

Test stand-ins, not the real packages: `flash_attn` (not installable without CUDA) routes
`flash_attn_func` to torch's SDPA and `rms_norm_fn` to a plain fp32 RMSNorm, the computations they
implement; the hub-kernels package of the project's environment is hidden from the old transformers.
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


def import_family(modeling_dir: Path, package: str, work: Path):
    """The family's modeling and configuration modules, imported from a copy in a package of
    their own (the files import each other relatively)."""
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
    modeling = importlib.import_module(f"{package}.modeling_sdar")
    return modeling.SDARForCausalLM, importlib.import_module(f"{package}.configuration_sdar").SDARConfig


def load(model_cls, config_cls, model_dir: Path):
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop("auto_map", None)
    config = config_cls(**cfg)
    model = model_cls(config).float().eval()
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model


def block_causal(length: int, block: int) -> torch.Tensor:
    """[1, 1, L, L] float 0/1: SDAR's block_diffusion_attention_mask for the whole sequence."""
    blocks = -(-length // block)
    mask = torch.tril(torch.ones(blocks, blocks)).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return mask[:length, :length][None, None]


@torch.no_grad()
def sdar_logits(model, ids: list[int], block: int) -> torch.Tensor:
    x = torch.tensor([ids])
    return model(x, attention_mask=block_causal(len(ids), block), position_ids=torch.arange(len(ids))[None],
                 use_cache=False).logits[0].float()


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
            x0_p, x0 = F.softmax(logits.float(), dim=-1).max(-1)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            high_conf_mask = confidence[0] > confidence_threshold
            if high_conf_mask.sum() >= num_transfer_tokens[step]:
                transfer_index[0] = high_conf_mask
            else:
                transfer_index[0, torch.topk(confidence[0], num_transfer_tokens[step]).indices] = True
            cur_x[transfer_index] = x0[transfer_index]
        x[:, rows] = cur_x
        if stopping_criteria_idx and any(stop in x[0, prompt_length:] for stop in stopping_criteria_idx):
            break
    return x[0, prompt_length:].tolist()


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
        model_cls, config_cls = import_family(Path(task["modeling_dir"]), task["package"], Path(work))
        model = load(model_cls, config_cls, Path(task["model_dir"]))
        block = task["block_size"]
        fast = task["package"] == "fast_dllm_v2"
        logits = [(fast_dllm_logits if fast else sdar_logits)(model, ids, block) for ids in task["logits"]]
        decoded = []
        for job in task["decode"]:
            if fast:
                decoded.append(fast_dllm_generate(model, job["prompt"], task["mask_id"], job["gen_length"], block,
                                                  task["sub_block_size"], task["threshold"], job.get("stop")))
            else:
                stop = [job["stop"]] if job.get("stop") is not None else None
                decoded.append(sdar_block_diffusion_generate(model, job["prompt"], task["mask_id"], job["gen_length"],
                                                             block, task["steps"], task["threshold"], stop))
    import transformers

    torch.save({"logits": logits, "decoded": decoded, "transformers": transformers.__version__}, out_file)


if __name__ == "__main__":
    main(*sys.argv[1:3])
