"""lanner: a fast, compact, hackable LLM inference and serving engine."""
from lanner.core.request import CompletionOutput, RequestOutput, RequestOutputKind, SamplingParams
from lanner.engine.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestOutputKind", "CompletionOutput", "__version__"]
