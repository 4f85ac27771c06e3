"""Block-diffusion decoding runtime: model forward, decoding loop, attention modes, API and CLI."""
from runtime.config import EngineConfig, ModelConfig
from runtime.decoding import GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineConfig", "ModelConfig", "GenerationRequest", "GenerationResult", "RequestError"]


def __getattr__(name: str):
    # Engine pulls in the model and checkpoint code, RequestError the kernels; import them on first use only.
    if name == "Engine":
        from runtime.engine import Engine
        return Engine
    if name == "RequestError":
        from runtime.attention import RequestError
        return RequestError
    raise AttributeError(name)
