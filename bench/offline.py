"""Offline benchmarks: `bench throughput` (attnserve vs transformers); `bench prefix` (the
same shared-prefix workload with the prefix cache on and off) lives in bench/prefix.py."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import time
from pathlib import Path

import torch

from scheduler.request import SamplingParams
from server.engine import LLM
from server.engine.args import add_engine_args, engine_config_from_args

logger = logging.getLogger(__name__)


def sample_lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    """Uniform in [mean(1-R), mean(1+R)], as vLLM's random dataset draws them."""
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_prompts(rng: random.Random, lengths: list[int], vocab_lo: int = 1000,
                   vocab_hi: int = 30000) -> list[list[int]]:
    return [[rng.randrange(vocab_lo, vocab_hi) for _ in range(n)] for n in lengths]


def transformers_throughput(
    hf: object, prompts: list[list[int]], out_lens: list[int], batch_size: int,
) -> float:
    """transformers' batched `generate`: left-padded batches, each running to its longest output.
    Only the requested output tokens count."""

    total, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(prompts), batch_size):
            chunk, lens = prompts[s : s + batch_size], out_lens[s : s + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens),
                        min_new_tokens=max(lens), do_sample=False, pad_token_id=0)
            total += sum(lens)
    return total / (time.perf_counter() - t0)


def _throughput(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="attnserve bench throughput",
                                description="attnserve vs transformers generate, same prompts")
    p.add_argument("--num-prompts", type=int, default=32, help="random prompts to generate for")
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length in tokens")
    p.add_argument("--output-len", type=int, default=64, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L(1-R), L(1+R)], as vLLM's random dataset")
    p.add_argument("--bench-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--skip-transformers", action="store_true", help="measure attnserve only")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each, alternating; the medians are reported (CPU speed "
                        "drifts by 10-20%% between runs on a shared machine)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: attnserve_tok_s, transformers_tok_s, ratio")
    p.add_argument("--json-out", default=None, help="also write that JSON object to this file")
    add_engine_args(p)
    args = p.parse_args(argv)
    rng = random.Random(args.bench_seed)
    in_lens = sample_lengths(rng, args.num_prompts, args.input_len, args.range_ratio)
    out_lens = sample_lengths(rng, args.num_prompts, args.output_len, args.range_ratio)
    prompts = random_prompts(rng, in_lens)
    config = engine_config_from_args(args)
    llm = LLM(config)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:2], params[:2])  # warm-up
    hf = None
    if not args.skip_transformers:
        from model.hf_reference import load_hf_model

        hf = load_hf_model(args.model, str(llm.engine.dtype))
        transformers_throughput(hf, prompts[:2], [2, 2], 2)  # warm-up
    ours_runs: list[float] = []
    theirs_runs: list[float] = []
    load_before = os.getloadavg()[0]
    for _ in range(max(1, args.repeats)):
        llm.engine.reset_prefix_cache()  # every run starts cold, as transformers' does
        t0 = time.perf_counter()
        llm.generate(prompts, params, progress=not args.json)
        ours_runs.append(sum(out_lens) / (time.perf_counter() - t0))
        if hf is not None:
            theirs_runs.append(transformers_throughput(hf, prompts, out_lens, args.max_num_seqs))
    ours = statistics.median(ours_runs)
    theirs = statistics.median(theirs_runs) if theirs_runs else None
    result = {"attnserve_tok_s": ours, "transformers_tok_s": theirs,
              "ratio": ours / theirs if theirs else None,
              "attnserve_runs": ours_runs, "transformers_runs": theirs_runs,
              "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "range_ratio": args.range_ratio,
              "attention_backend": llm.engine.backend.name,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
              "load_avg_1m": [load_before, os.getloadavg()[0]]}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"attnserve:    {ours:8.1f} output tok/s")
        if theirs:
            print(f"transformers: {theirs:8.1f} output tok/s")
            print(f"ratio:        {ours / theirs:8.2f}x")
        print(f"load average (1 min) {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


def main(what: str, argv: list[str]) -> int:
    if what == "throughput":
        return _throughput(argv)
    if what == "prefix":
        from bench.prefix import main as prefix_main

        return prefix_main(argv)
    raise SystemExit(f"unknown benchmark {what!r}")
