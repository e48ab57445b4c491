"""Engine flags shared by `serve`, `generate` and the offline benchmarks (vLLM's spelling).

Defaults come from EngineConfig (server/engine/config.py), so a flag and the Python API
never disagree."""

from __future__ import annotations

import argparse

from kvcache.kv_dtype import KV_CACHE_DTYPES, KV_CACHE_SCALES
from server.engine.config import (
    DECODE_GEMMS,
    DEFAULT_CPU_KV_TOKENS,
    EMBEDDED_MODEL_NAME,
    MAX_DEFAULT_CUDA_GRAPH_BATCH,
    MAX_DEFAULT_MODEL_LEN,
    EngineConfig,
)

D = EngineConfig  # every flag's default is its field's default


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=D.model,
                   help="weights: a .gguf file; a Hugging Face folder (config.json + "
                        "safetensors); or a synthetic preset (smollm2-135m, llama3-8b, "
                        "llama3-70b, qwen2.5-7b, qwen3-8b, deepseek-v2-lite) with seeded random "
                        "weights; nothing is downloaded "
                        f"(default: the embedded {EMBEDDED_MODEL_NAME} GGUF)")
    g.add_argument("--tokenizer", default=D.tokenizer,
                   help="tokenizer folder or .gguf file to use instead of the model's own (e.g. "
                        "for a synthetic preset on a machine without the embedded SmolLM2) "
                        "(default: the model's own)")
    g.add_argument("--served-model-name", default=D.served_model_name,
                   help="model name reported by the API and used in metric labels (default: "
                        "the model's file or folder name)")
    g.add_argument("--dtype", default=D.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype; auto = float32 on CPU, bfloat16 on GPU")
    g.add_argument("--device", default=D.device, help="cpu, cuda, cuda:N or auto (GPU when present)")
    g.add_argument("--attention-backend", default=D.attention_backend,
                   help="attention backend: reference, paged, sdpa, flex, triton (auto = triton on GPU, "
                        "paged on CPU for the token and nhd layouts, else reference)")
    g.add_argument("--prefill-backend", default=D.prefill_backend,
                   help="backend for prefill/extend sequences (default: --attention-backend)")
    g.add_argument("--decode-backend", default=D.decode_backend,
                   help="backend for decode sequences (default: --attention-backend)")
    g.add_argument("--attention-variant", default=D.attention_variant,
                   help="logits transform: softmax, softcap:CAP, sliding_window:W, alibi, sigmoid, "
                        "silu, or module:function for your own Triton transform")
    g.add_argument("--kv-layout", default=D.kv_layout, choices=["token", "nhd", "hnd", "hnd_x"],
                   help="KV-cache layout (token forces page size 1)")
    g.add_argument("--page-size", "--block-size", dest="page_size", type=int,
                   default=D.page_size,
                   help="tokens per KV page (--block-size is vLLM's name for it)")
    g.add_argument("--kv-cache-tokens", type=int, default=D.kv_cache_tokens,
                   help=f"KV pool size in tokens (CPU default {DEFAULT_CPU_KV_TOKENS}; GPU default: "
                        "--gpu-memory-utilization)")
    g.add_argument("--kv-cache-memory", type=_at_least_one, default=D.kv_cache_memory,
                   help="KV pool size in bytes (instead of --kv-cache-tokens or "
                        "--gpu-memory-utilization); the tokens it holds follow from the bytes "
                        "per token of --kv-cache-dtype")
    g.add_argument("--kv-cache-dtype", default=D.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                   help="K/V storage: auto = the model's dtype; fp8 (= fp8_e4m3): e4m3 codes, "
                        "about half the bytes per token (vLLM's spelling)")
    g.add_argument("--kv-cache-scale", default=D.kv_cache_scale, choices=list(KV_CACHE_SCALES),
                   help="FP8 scales: per-token-head = one float32 scale per (token, KV head) "
                        "row, computed when it is stored; per-tensor = a fixed scale of 1.0 "
                        "(vLLM's uncalibrated default)")
    g.add_argument("--gpu-memory-utilization", type=float, default=D.gpu_memory_utilization,
                   help="fraction of GPU memory for weights + KV cache")
    g.add_argument("--linear-attention-backend", default=D.linear_attention_backend,
                   choices=["auto", "reference", "triton"],
                   help="hybrid models (MiniMax): kernels of the linear-attention layers "
                        "(auto: triton on a GPU, the torch reference on CPU)")
    g.add_argument("--state-slots", type=_at_least_one, default=D.state_slots,
                   help="hybrid models: float32 recurrent-state slots, one per running request "
                        "plus the prefix cache's snapshots (default: 2 x --max-num-seqs)")
    g.add_argument("--state-snapshot-interval", type=int, default=D.state_snapshot_interval,
                   help="hybrid models with the prefix cache: keep the recurrent state every "
                        "this many prompt tokens, so a prompt that extends a cached prefix "
                        "resumes there (a multiple of 64 and of --page-size)")
    g.add_argument("--max-num-seqs", type=int, default=D.max_num_seqs, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=D.max_num_batched_tokens,
                   help="token budget of one step (prefill chunks + decodes)")
    g.add_argument("--max-prefill-tokens-with-decode", type=_at_least_one,
                   default=D.max_prefill_tokens_with_decode,
                   help="most prefill tokens in a step that also decodes running requests: "
                        "bounds how long a prefill chunk stalls their streams (default: "
                        "--max-num-batched-tokens, no separate bound)")
    g.add_argument("--no-overlap-schedule", dest="overlap_schedule", action="store_false",
                   default=D.overlap_schedule,
                   help="wait for each step's tokens before scheduling the next (default: the "
                        "host schedules and stages step N+1 while the device runs step N)")
    g.add_argument("--max-model-len", type=int, default=D.max_model_len,
                   help="longest prompt + output (default: the model's, capped at "
                        f"{MAX_DEFAULT_MODEL_LEN})")
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_cache",
                   action=argparse.BooleanOptionalAction, default=D.enable_prefix_cache,
                   help="the radix prefix cache (vLLM's spelling; --no-enable-prefix-caching "
                        "turns it off)")
    g.add_argument("--no-prefix-cache", dest="enable_prefix_cache", action="store_false",
                   help="turn off the radix prefix cache (same as --no-enable-prefix-caching; "
                        "default: the cache is on)")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="accepted for vLLM compatibility: prefill is always chunked under "
                        "--max-num-batched-tokens, so --no-enable-chunked-prefill is refused")
    g.add_argument("--schedule-policy", default=D.schedule_policy, choices=["fcfs", "lpm"],
                   help="waiting-queue order: first come first served, or longest prefix match")
    g.add_argument("--seed", "--weights-seed", dest="seed", type=int, default=D.seed,
                   help="seed of the synthetic presets' random weights and of the sampling of "
                        "requests that bring no seed of their own (--weights-seed: its old name)")
    g.add_argument("--chat-template", default=D.chat_template,
                   help="Jinja chat template, a file or the template itself, used instead of "
                        "the tokenizer's (default: the tokenizer's own)")
    g.add_argument("--disable-log-stats", action="store_true", default=not D.log_stats,
                   help="no periodic stats line (running, waiting, KV use, tokens/s, prefix "
                        "hits) in the log")
    g.add_argument("--disable-log-requests", action="store_true", default=D.disable_log_requests,
                   help="no per-request log lines (kept in EngineConfig for the HTTP layer, "
                        "which writes them)")
    g.add_argument("--no-cuda-graphs", "--enforce-eager", dest="no_cuda_graphs",
                   action="store_true",
                   help="run decode steps eagerly instead of replaying captured CUDA graphs "
                        "(graphs are used on a GPU with the triton backend); --enforce-eager "
                        "is vLLM's name for it")
    g.add_argument("--tensor-parallel-size", "-tp", type=_at_least_one,
                   default=D.tensor_parallel_size,
                   help="split the model over N ranks (Megatron-style, Llama family): the "
                        "server starts one process per rank, GPUs cuda:0..N-1 (NCCL) or CPU "
                        "processes (gloo); see docs/tensor-parallel.md")
    g.add_argument("--cuda-graph-max-batch", type=_at_least_one, default=D.cuda_graph_max_batch,
                   help="largest decode batch captured in a graph (default: --max-num-seqs, "
                        f"at most {MAX_DEFAULT_CUDA_GRAPH_BATCH}); larger decode steps run eagerly")
    g.add_argument("--decode-gemm", default=D.decode_gemm, choices=list(DECODE_GEMMS),
                   help="matrix multiplies of at most 64 rows (decode steps' projections and "
                        "LM head): torch (F.linear) or triton (a skinny GEMM that streams the "
                        "weights; GPU); larger calls always use torch")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed flags; ValueError (a one-line message) for a combination
    the engine cannot honour."""
    if args.kv_cache_tokens is not None and args.kv_cache_memory is not None:
        raise ValueError("--kv-cache-tokens and --kv-cache-memory both size the KV pool: "
                         "give one of them")
    if not args.enable_chunked_prefill:
        raise ValueError("--no-enable-chunked-prefill: attnserve always chunks prefill; to run "
                         "a prompt in one step, raise --max-num-batched-tokens to at least "
                         "--max-model-len")
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device, attention_backend=args.attention_backend,
        prefill_backend=args.prefill_backend, decode_backend=args.decode_backend,
        attention_variant=args.attention_variant, kv_layout=args.kv_layout,
        page_size=1 if args.kv_layout == "token" else args.page_size,
        kv_cache_tokens=args.kv_cache_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_scale=args.kv_cache_scale,
        linear_attention_backend=args.linear_attention_backend, state_slots=args.state_slots,
        state_snapshot_interval=args.state_snapshot_interval,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_cache=args.enable_prefix_cache,
        max_prefill_tokens_with_decode=args.max_prefill_tokens_with_decode,
        overlap_schedule=args.overlap_schedule,
        schedule_policy=args.schedule_policy, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        cuda_graphs=not args.no_cuda_graphs, cuda_graph_max_batch=args.cuda_graph_max_batch,
        decode_gemm=args.decode_gemm,
        chat_template=args.chat_template, log_stats=not args.disable_log_stats,
        disable_log_requests=args.disable_log_requests,
    )
