"""Bad settings are refused when the configuration is built, with a message naming the setting,
the value given and what to choose instead (before any model, store or cache is allocated)."""
import pytest

from runtime.config import EngineConfig, SparseConfig


@pytest.mark.parametrize("change, message", [
    ({"budget_fraction": 0.0}, r"budget_fraction=0.0 must be in \(0, 1\]; 0 selects nothing"),
    ({"budget_fraction": 1.5}, r"budget_fraction=1.5 must be in \(0, 1\]"),
    ({"budget_tokens": 0}, r"budget_tokens=0 must be >= 1"),
    ({"page_size": 12}, r"page_size=12 must be a power of two"),
    ({"page_size": 0}, r"page_size=0 must be a power of two"),
    ({"granularity": "block"}, r"granularity='block'; choose one of"),
    ({"query": "last"}, r"query='last'; choose one of"),
    ({"source": "disk"}, r"source='disk'; choose one of"),
    ({"sink_tokens": -1}, r"sink_tokens=-1 and local_window=64 must be >= 0"),
    ({"dense_layers": -2}, r"dense_layers=-2 must be >= 0"),
    ({"compact_bits": 2}, r"compact_bits=2; choose 4 or 8"),
    ({"split_cpu_fraction": 1.2}, r"split_cpu_fraction=1.2 must be in \[0, 1\]"),
    ({"lookahead_fetch_programs": 0}, r"lookahead_fetch_programs=0 must be >= 1"),
])
def test_bad_sparse_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        SparseConfig(**change)


@pytest.mark.parametrize("change, message", [
    ({"mode": "fast"}, r"mode='fast'; choose one of"),
    ({"attention_backend": "cuda"}, r"attention_backend='cuda'; choose auto or one of"),
    ({"unmasking": "random"}, r"unmasking='random'; choose one of"),
    ({"confidence_threshold": 0.0}, r"confidence_threshold=0.0 must be in \(0, 1\]"),
    ({"block_size": 0}, r"block_size=0 must be >= 1"),
    ({"denoising_steps": 0}, r"denoising_steps=0 must be >= 1"),
    ({"max_batch_size": 0}, r"max_batch_size=0 must be >= 1"),
    ({"gpu_memory_gib": -1.0}, r"gpu_memory_gib=-1.0 must be > 0"),
])
def test_bad_engine_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model_path="unused", **change)


def test_the_defaults_are_valid_and_frozen():
    config = EngineConfig(model_path="unused")
    assert config.sparse == SparseConfig()
    with pytest.raises(AttributeError):
        config.mode = "dense"  # one configuration, passed down: nothing changes it on the way
