"""Tensor parallelism against the unsplit engine, end to end: greedy tokens and their logprobs.

    python -m bench.tp_check --model llama3-8b --sizes 1,2,4 --dtype float32 \\
        --json-out bench/results/DEVICE-tp-check-DATE.json

For each size in `--sizes` (the first is the reference, normally 1) one engine is built with
the engine flags given (CUDA graphs, the Triton backend and the layout as configured), the
same random prompts are generated greedily with their logprobs, and the engine is shut down
before the next. Per size: how many outputs equal the reference's token for token, the
first position where one differs, and the largest |logprob difference| over the positions
before any divergence. In float32 a split model's logits differ from the unsplit ones only by
the order of the additions, so the tokens should match; in bf16 the rounding of partial sums
already moves logits by about 1e-2, and synthetic weights' near ties then flip early.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import random
import time
from dataclasses import asdict, dataclass

import torch

from model.loader import peek_model_config
from scheduler.request import SamplingParams
from server.engine import LLM
from server.engine.args import add_engine_args, engine_config_from_args

logger = logging.getLogger(__name__)


@dataclass
class Outputs:
    tokens: list[list[int]]
    logprobs: list[list[float]]
    seconds: float


@dataclass
class SizeRow:
    tensor_parallel_size: int
    identical: int  # outputs equal to the reference's, token for token
    outputs: int
    first_divergence: int | None  # smallest position where an output differs; None: none
    max_logprob_diff: float  # over the positions before each output's divergence
    generate_s: float


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = min(1000, vocab // 4), min(30000, vocab)
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(num)]


def run_size(args: argparse.Namespace, size: int, prompts: list[list[int]]) -> Outputs:
    config = dataclasses.replace(engine_config_from_args(args), tensor_parallel_size=size)
    with LLM(config) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                                logprobs=0)
        t0 = time.perf_counter()
        done = llm.generate(prompts, params)
        seconds = time.perf_counter() - t0
    return Outputs([c.token_ids for c in done], [[t.logprob for t in c.logprobs] for c in done],
                   seconds)


def compare(size: int, ref: Outputs, out: Outputs) -> SizeRow:
    identical, first, worst = 0, None, 0.0
    for ref_ids, ids, ref_lp, lp in zip(ref.tokens, out.tokens, ref.logprobs, out.logprobs,
                                        strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref_ids, ids, strict=True)) if a != b),
                    len(ids))
        identical += same == len(ids)
        if same < len(ids):
            first = same if first is None else min(first, same)
        for i in range(same):  # the same token chosen after the same inputs
            worst = max(worst, abs(ref_lp[i] - lp[i]))
    return SizeRow(size, identical, len(out.tokens), first, round(worst, 6),
                   round(out.seconds, 3))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tp_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,2", help="tensor-parallel sizes, the reference first")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.max_model_len is None:
        args.max_model_len = args.input_len + args.output_len + 16
    vocab = peek_model_config(args.model).vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.prompt_seed)
    runs = {size: run_size(args, size, prompts) for size in sizes}
    rows = [compare(s, runs[sizes[0]], runs[s]) for s in sizes]
    for r in rows:
        print(f"TP {r.tensor_parallel_size}: {r.identical}/{r.outputs} identical, first "
              f"divergence {r.first_divergence}, max |logprob diff| {r.max_logprob_diff:.2e}, "
              f"{r.generate_s:.2f} s")
    if args.json_out:
        device = engine_config_from_args(args).resolved_device()
        record = {
            "bench": "tp_check", "date": datetime.date.today().isoformat(),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
            "torch": torch.__version__, "model": args.model, "dtype": args.dtype,
            "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "rows": [asdict(r) for r in rows],
        }
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
