"""lanner: a fast, compact, hackable LLM inference and serving engine."""
from lanner.engine.llm import LLM
from lanner.engine.request import CompletionOutput, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
