"""EngineConfig: everything chosen at start-up (model, backend, layout, limits).

The one place for the engine's defaults: the CLI flags (server/engine/args.py) take theirs
from here, and the scheduler's settings (scheduler/config.py) have none of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvcache.kv_dtype import KVCacheDtype

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CPU_KV_TOKENS = 16384  # KV pool on CPU; on a GPU, gpu_memory_utilization sizes it
MAX_DEFAULT_MODEL_LEN = 8192  # the default max_model_len: the model's own, capped at this
# --decode-gemm's values (model/decode_gemm.py; named here so the CLI loads no kernels)
DECODE_GEMMS = ("torch", "triton")
MAX_DEFAULT_CUDA_GRAPH_BATCH = 256  # the default cuda_graph_max_batch: max_num_seqs, capped


@dataclass(frozen=True)
class KVPoolSize:
    """One way of sizing the KV pool (exactly one field set): a token count, bytes, the bytes
    of a token count in the model's full-precision dtype, or a fraction of GPU memory."""

    tokens: int | None = None
    memory_bytes: int | None = None
    model_dtype_tokens: int | None = None
    gpu_fraction: float | None = None


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None  # a tokenizer folder or .gguf; default: the model's own
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"
    attention_backend: str = "auto"  # auto: triton on GPU, paged on CPU (registry.default_backend)
    prefill_backend: str | None = None
    decode_backend: str | None = None
    attention_variant: str = "softmax"
    kv_layout: str = "nhd"
    page_size: int = 16
    kv_cache_tokens: int | None = None  # default: resolved_kv_cache_tokens()
    kv_cache_memory: int | None = None  # bytes for the KV pool, instead of a token count
    kv_cache_dtype: str = "auto"  # auto (the model dtype), fp8 or fp8_e4m3 (the same)
    kv_cache_scale: str = "per-token-head"  # FP8 scales: per-token-head or per-tensor (1.0)
    gpu_memory_utilization: float = 0.85
    # hybrid models (linear-attention layers): the linear layers' kernels (auto: triton on
    # GPU, reference on CPU), the state slots shared by running requests and prefix-cache
    # snapshots (default: twice max_num_seqs), and the snapshot interval in tokens
    linear_attention_backend: str = "auto"
    state_slots: int | None = None
    state_snapshot_interval: int = 256
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: resolved_max_model_len()
    # prefill tokens a step may hold while decodes run in it; None: max_num_batched_tokens
    max_prefill_tokens_with_decode: int | None = None
    # the host prepares step N+1 while the device runs step N (server/engine/core.py)
    overlap_schedule: bool = True
    enable_prefix_cache: bool = True
    schedule_policy: str = "fcfs"
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (GPU, backends that allow it)
    cuda_graph_max_batch: int | None = None  # default: resolved_cuda_graph_max_batch()
    # matrix multiplies of decode-sized calls: torch (F.linear) or triton (model/decode_gemm.py)
    decode_gemm: str = "torch"
    # seeds the synthetic presets' weights and the sampling of requests without a seed
    seed: int = 0
    # ranks the model is split over, one process each (server/engine/tensor_parallel.py)
    tensor_parallel_size: int = 1
    chat_template: str | None = None  # a Jinja file or string; default: the tokenizer's
    log_stats: bool = True  # the periodic stats line (server/engine/stats_logger.py)
    # Kept for the HTTP side, which owns the per-request access log (vLLM's flag)
    disable_log_requests: bool = False

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if self.dtype not in table:
            raise ValueError(f"unsupported --dtype {self.dtype!r}; use float32 or bfloat16")
        return table[self.dtype]

    def resolved_backend(self, cache_kind: str = "kv") -> str:
        """`--attention-backend`, with `auto` resolved for the device, the layers' cache kind
        (K/V heads or an MLA latent) and the KV cache dtype."""
        if self.attention_backend == "auto":
            from attention.registry import default_backend

            return default_backend(self.resolved_device().type, self.kv_layout, cache_kind,
                                   self.resolved_kv_cache_dtype().is_fp8)
        return self.attention_backend

    def resolved_linear_backend(self) -> str:
        if self.linear_attention_backend == "auto":
            from attention.backends.lightning import default_linear_impl

            return default_linear_impl(self.resolved_device().type)
        return self.linear_attention_backend

    def resolved_state_slots(self) -> int:
        """State slots for running requests and snapshots (the scratch slot not counted)."""
        slots = self.state_slots if self.state_slots is not None else 2 * self.max_num_seqs
        if slots < 1:
            raise ValueError(f"--state-slots must be >= 1, got {slots}")
        return slots

    def resolved_model_name(self) -> str:
        """The name the API reports: the embedded model's, or the spec's last path component."""
        if self.served_model_name:
            return self.served_model_name
        spec = self.model
        if spec is None or spec.lower() in ("smollm2", "smollm2-135m-instruct"):
            return EMBEDDED_MODEL_NAME
        return spec.rstrip("/").split("/")[-1].removeprefix("synthetic:")

    def resolved_max_model_len(self, model_max_positions: int) -> int:
        """Longest prompt + output: as configured, else the model's capped at
        MAX_DEFAULT_MODEL_LEN; never beyond the model's positions."""
        default = min(model_max_positions, MAX_DEFAULT_MODEL_LEN)
        return min(self.max_model_len or default, model_max_positions)

    def resolved_kv_cache_dtype(self) -> KVCacheDtype:
        """How K/V rows are stored (ValueError for an unknown --kv-cache-dtype/-scale)."""
        return KVCacheDtype.from_flags(self.kv_cache_dtype, self.kv_cache_scale,
                                       self.resolved_dtype())

    def kv_pool_size(self) -> KVPoolSize:
        """How the KV pool is sized: --kv-cache-tokens tokens; else --kv-cache-memory bytes;
        else on CPU the bytes DEFAULT_CPU_KV_TOKENS tokens take in the model's dtype (so an
        FP8 cache holds about twice the tokens); else gpu_memory_utilization of the GPU."""
        if self.kv_cache_tokens is not None:
            return KVPoolSize(tokens=self.kv_cache_tokens)
        if self.kv_cache_memory is not None:
            return KVPoolSize(memory_bytes=self.kv_cache_memory)
        if self.resolved_device().type != "cuda":
            return KVPoolSize(model_dtype_tokens=DEFAULT_CPU_KV_TOKENS)
        return KVPoolSize(gpu_fraction=self.gpu_memory_utilization)

    def resolved_cuda_graph_max_batch(self) -> int:
        """The largest decode batch captured in a graph; never above max_num_seqs."""
        default = min(self.max_num_seqs, MAX_DEFAULT_CUDA_GRAPH_BATCH)
        return min(self.cuda_graph_max_batch or default, self.max_num_seqs)

    def resolved_chat_template(self) -> str | None:
        """The --chat-template text: a file's contents, or the value itself when it is a
        Jinja template; None to keep the tokenizer's own. ValueError otherwise."""
        spec = self.chat_template
        if spec is None:
            return None
        path = Path(spec).expanduser()
        if path.is_file():
            return path.read_text()
        if "{{" in spec or "{%" in spec:
            return spec
        raise ValueError(f"--chat-template {spec!r}: no such file, and not a Jinja template")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
