"""Block-diffusion decoding runtime: model forward, decoding loop, attention modes, API and CLI."""
from runtime.config import EngineConfig, ModelConfig
from runtime.decoding import GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineConfig", "ModelConfig", "GenerationRequest", "GenerationResult"]


def __getattr__(name: str):
    # Engine pulls in the model and checkpoint code; import it on first use only.
    if name == "Engine":
        from runtime.engine import Engine
        return Engine
    raise AttributeError(name)
