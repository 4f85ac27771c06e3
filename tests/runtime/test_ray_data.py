"""runtime.ray_data.Generate on a real local Ray cluster (CPU): two workers, each with its own
Engine, answer a dataset in its order, as Engine.generate does with the same seeds; a bad row
carries its error and the others run."""
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra (ray[data]): pip install -e '.[test]'")

from runtime import Engine, EngineConfig  # noqa: E402
from runtime.engine import CHECKPOINTS  # noqa: E402
from runtime.ray_data import Generate  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402

TINY = CHECKPOINTS / "tiny-random"
PROMPTS = ["abcdef", "hello", "x", "zzz top", "", "the key is", "once upon", "ab ab ab"]  # "" is refused
OPTIONS = dict(device="cpu", dtype="float64", max_batch_size=4)
PARAMS = dict(max_new_tokens=8, temperature=0.8, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the dataset's order across batches
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def test_two_workers_answer_in_order_as_generate_does(cluster):
    ds = ray.data.from_items([{"id": i, "prompt": p, "seed": 100 + i} for i, p in enumerate(PROMPTS)])
    out = ds.map_batches(Generate, fn_constructor_kwargs=dict(model_path=str(TINY), sampling_params=PARAMS, **OPTIONS),
                         concurrency=2, batch_size=3, num_cpus=1).take_all()
    assert [row["id"] for row in out] == list(range(len(PROMPTS)))
    engine = Engine(EngineConfig(model_path=str(TINY), progress=False, **OPTIONS))
    good = [i for i, p in enumerate(PROMPTS) if p]
    direct = engine.generate([PROMPTS[i] for i in good], sampling_params=[SamplingParams(seed=100 + i, **PARAMS)
                                                                          for i in good])
    for row, want in zip([out[i] for i in good], direct):
        assert row["prompt"] == PROMPTS[row["id"]]
        assert row["finish_reason"] == want.finish_reason
        assert row["generated_text"] == want.text and list(row["generated_token_ids"]) == want.tokens
    bad = out[PROMPTS.index("")]
    assert bad["finish_reason"] == "error" and "prompt='': is empty" in bad["error"] and len(bad["generated_token_ids"]) == 0
    assert all(row["error"] is None for row in out if row["prompt"])
    assert len({row["generated_text"] for row in out if row["prompt"]}) > 1  # real, varied answers


def test_a_bad_sampling_value_fails_its_row_alone():
    generate = Generate(str(TINY), sampling_params=PARAMS, **OPTIONS)
    import numpy as np

    out = generate({"prompt": np.array(["abc", "hello"]), "temperature": np.array([0.5, -1.0])})
    assert out["finish_reason"].tolist() == ["length", "error"]
    assert out["error"][0] is None and "temperature" in out["error"][1]
    assert out["generated_text"][0] and len(out["generated_token_ids"][0]) == 8
