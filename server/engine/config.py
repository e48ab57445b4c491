"""EngineConfig: everything chosen at start-up (model, backend, layout, limits)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None  # a tokenizer folder or .gguf; default: the model's own
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"
    attention_backend: str = "auto"  # auto: triton on GPU, reference on CPU
    prefill_backend: str | None = None
    decode_backend: str | None = None
    attention_variant: str = "softmax"
    kv_layout: str = "nhd"
    page_size: int = 16
    kv_cache_tokens: int | None = None  # CPU default 16384 tokens
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's, capped at 8192
    enable_prefix_cache: bool = True
    schedule_policy: str = "fcfs"
    attention_timing_every: int = 64
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (GPU, backends that allow it)
    cuda_graph_max_batch: int | None = None  # default: max_num_seqs, at most 256
    seed: int = 0

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

    def resolved_backend(self) -> str:
        if self.attention_backend == "auto":
            return "triton" if self.resolved_device().type == "cuda" else "reference"
        return self.attention_backend

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
