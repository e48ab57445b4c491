"""The engine: everything that turns requests into tokens, with no HTTP in it.

This is its public interface; the HTTP layer (server/api/) and the CLI import from here
only. `EngineCore` runs one step at a time (the offline `LLM` drives it in the caller's
thread); `AsyncEngine` runs it on its own thread for the server; `EngineMetrics` is the
observer that records Prometheus metrics as the engine runs.
"""

from model.loader import LoadedModel
from scheduler.request import SamplingParams
from scheduler.validation import RequestRejected
from server.engine.async_engine import AsyncEngine, EngineState, EngineUnavailable, RequestStream
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.llm import LLM, Completion
from server.engine.metrics import EngineMetrics, parse_buckets
from server.engine.outputs import EngineObserver, NullObserver, RequestOutput, TokenLogprob

__all__ = [
    "LLM",
    "AsyncEngine",
    "Completion",
    "EngineConfig",
    "EngineCore",
    "EngineMetrics",
    "EngineObserver",
    "EngineState",
    "EngineUnavailable",
    "LoadedModel",
    "NullObserver",
    "RequestOutput",
    "RequestRejected",
    "RequestStream",
    "SamplingParams",
    "TokenLogprob",
    "parse_buckets",
]
