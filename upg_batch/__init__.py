"""upg-batch: distributed batch inference for LLaMA-family language models."""

from upg_batch.engine import Completion, Engine, EngineError, SamplingParams, TokenLogprobs

__version__ = "0.1.0"
__all__ = ["Completion", "Engine", "EngineError", "SamplingParams", "TokenLogprobs", "__version__"]
