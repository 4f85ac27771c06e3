"""Batch inference on Ray Data: `ray.data.Dataset.map_batches(Generate, ...)` holds one Engine per
worker and answers each batch's prompt column (needs the `ray` extra: `pip install -e '.[ray]'`).

    import ray
    from runtime.ray_data import Generate
    ds = ray.data.read_json("prompts.jsonl")                      # a "prompt" column (text or token ids)
    out = ds.map_batches(Generate, fn_constructor_kwargs=dict(model_path="checkpoints/retrieval-6m",
                         sampling_params={"max_new_tokens": 64}), concurrency=2, batch_size=16)   # num_gpus=1 on GPUs
    out.write_json("answers/")

Each worker is an actor that loads the model once (`concurrency` of them; on a GPU cluster pass
`num_gpus=1` to map_batches so that each holds a GPU of its own) and decodes a batch with one
`Engine.generate` call, `max_batch_size` rows at a time. The output keeps every input column and
adds `generated_text`, `generated_token_ids`, `finish_reason` and `error` (None when the row ran),
row for row in the batch's order. A bad row (an empty prompt, a prompt the tokenizer cannot
encode, a bad sampling value) gets its error there and the others run. Columns named like
SamplingParams fields (`seed`, `max_new_tokens`, `temperature`, `stop`, ...) override
`sampling_params` for their row. Ray Data keeps the dataset's order across batches only with
`DataContext.get_current().execution_options.preserve_order = True`; otherwise keep an id column.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import numpy as np

from runtime.config import EngineConfig, SparseConfig
from runtime.decoding import GenerationRequest
from runtime.sampling import SamplingParams

OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "finish_reason", "error")
_PARAM_FIELDS = frozenset(f.name for f in fields(SamplingParams)) - {"n"}


def _plain(value: Any) -> Any:
    """A cell as Python: numpy scalars and arrays (Ray's batches are numpy) as ints, floats, lists."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Generate:
    """A map_batches callable: one Engine per Ray worker (see the module's docstring).

    model_path: the model directory (as every worker sees it). sampling_params: SamplingParams or a
    dict of its fields, for every row (n must be 1: one output row per input row). prompt_column:
    the column of prompts (text, token ids, or a chat's list of messages). engine_options: the other
    EngineConfig fields (mode, device, dtype, max_batch_size, ...; `sparse` as a SparseConfig or a
    dict of its fields).
    """

    def __init__(self, model_path: str, sampling_params: SamplingParams | dict[str, Any] | None = None,
                 prompt_column: str = "prompt", **engine_options: Any):
        from runtime.engine import Engine

        if isinstance(sampling_params, dict):
            sampling_params = SamplingParams.from_dict(sampling_params)
        self.params = sampling_params or SamplingParams()
        if self.params.n != 1:
            raise ValueError(f"sampling_params n={self.params.n}: map_batches gives one output row per input row; "
                             "repeat the rows with other seeds instead")
        if isinstance(engine_options.get("sparse"), dict):
            engine_options["sparse"] = SparseConfig(**engine_options["sparse"])
        engine_options.setdefault("progress", False)
        self.prompt_column = prompt_column
        self.engine = Engine(EngineConfig(model_path=str(model_path), **engine_options))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.prompt_column not in batch:
            raise KeyError(f"the batch has no {self.prompt_column!r} column (prompt_column); it has "
                           f"{sorted(batch)}")
        rows = len(batch[self.prompt_column])
        overrides = sorted(_PARAM_FIELDS & set(batch))
        requests: list[GenerationRequest] = []
        errors: dict[int, str] = {}
        for i in range(rows):
            try:  # a row's bad prompt or sampling value is that row's error, not the batch's
                prompt = _plain(batch[self.prompt_column][i])
                if prompt is None:
                    raise ValueError(f"the {self.prompt_column!r} column is empty on this row")
                params = replace(self.params, **{k: _plain(batch[k][i]) for k in overrides}) if overrides else self.params
                requests += params.requests(prompt, str(i))
            except (ValueError, TypeError) as err:
                errors[i] = f"refused: {err}"
        results = {int(r.request_id): r for r in self.engine.generate(requests)} if requests else {}
        out = {name: [] for name in OUTPUT_COLUMNS}
        for i in range(rows):
            r = results.get(i)
            out["generated_text"].append(r.text if r is not None else "")
            out["generated_token_ids"].append(np.asarray(r.tokens if r is not None else [], dtype=np.int64))
            out["finish_reason"].append(r.finish_reason if r is not None else "error")
            out["error"].append(r.error if r is not None else errors[i])
        columns = {k: v for k, v in batch.items() if k not in OUTPUT_COLUMNS}
        token_ids = np.empty(rows, dtype=object)  # ragged: one array per row
        token_ids[:] = out.pop("generated_token_ids")
        return {**columns, **{k: np.asarray(v, dtype=object) for k, v in out.items()}, "generated_token_ids": token_ids}
