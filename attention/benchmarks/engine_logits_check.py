"""Engine-level check on a GPU: the same workload through EngineCore with two attention
backends, teacher-forced, comparing the logits of every sampled row.

Both engines get an identical forced token stream (a sampler that records the logits and
returns tokens drawn from a generator seeded by the call index), so their schedules are
the same step for step and the logits can be compared row for row. The workload exercises
the prefix cache (a first request, then seven sharing its prefix) and chunked prefill.

  python -m attention.benchmarks.engine_logits_check --model llama3-8b --tokenizer DIR \
      --backends reference triton --layouts nhd:16 hnd:64 --json-out FILE
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys

import torch

from model.loader import load_model
from model.sampler import SamplerOutput
from model.tokenizer import Tokenizer
from scheduler.request import SamplingParams
from server.config import EngineConfig
from server.engine import EngineCore

logger = logging.getLogger(__name__)


class ForcedSampler:
    """Records logits; returns a token stream that depends only on the call index."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None] | None = None) -> SamplerOutput:
        self.logits.append(logits.float().cpu())
        gen = torch.Generator().manual_seed(len(self.logits))
        tokens = torch.randint(1000, 30000, (logits.shape[0],), generator=gen)
        return SamplerOutput(token_ids=tokens.to(logits.device))


def run_workload(engine: EngineCore, prompts: list[list[int]], max_tokens: int) -> list[torch.Tensor]:
    sampler = ForcedSampler()
    engine.runner.sampler = sampler
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for group in (prompts[:1], prompts[1:]):  # the first finishes before the rest arrive
        for p in group:
            engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()
    return sampler.logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", help="synthetic preset or weights")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", nargs=2, default=["reference", "triton"],
                    help="oracle backend, then the backend under test; PREFILL+DECODE names "
                         "a hybrid (e.g. reference+triton)")
    ap.add_argument("--layouts", nargs="+", default=["nhd:16"], help="layout:page_size ...")
    ap.add_argument("--prefix-len", type=int, default=600)
    ap.add_argument("--suffix-len", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--tolerance", type=float, default=2e-2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-cache-tokens", type=int, default=32768)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    loaded = load_model(args.model, dtype, device, with_tokenizer=args.tokenizer is None)
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        loaded.tokenizer = Tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 30000) for _ in range(args.prefix_len)]
    prompts = [prefix + [rng.randrange(1000, 30000) for _ in range(args.suffix_len + 7 * i)]
               for i in range(8)]
    rows = []
    ok = True
    for spec in args.layouts:
        layout, _, page = spec.partition(":")
        results = {}
        hits = {}
        for backend in args.backends:
            prefill_backend, _, decode_backend = backend.partition("+")
            config = EngineConfig(
                model=args.model, dtype=args.dtype, device=args.device,
                attention_backend=prefill_backend,
                prefill_backend=prefill_backend if decode_backend else None,
                decode_backend=decode_backend or None,
                kv_layout=layout, page_size=int(page or 16), kv_cache_tokens=args.kv_cache_tokens,
                max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_cache=True,
            )
            engine = EngineCore(config, loaded=loaded)
            results[backend] = run_workload(engine, prompts, args.max_tokens)
            hits[backend] = engine.scheduler.stats.prefix_cache_hit_tokens
            del engine
            torch.cuda.empty_cache()
        want, got = results[args.backends[0]], results[args.backends[1]]
        assert len(want) == len(got), "the two engines scheduled differently"
        errs = [float((g - w).norm() / w.norm()) for w, g in zip(want, got, strict=True)]
        worst = max(errs)
        ok &= worst < args.tolerance
        rows.append({"backends": list(args.backends), "layout": layout,
                     "page_size": int(page or 16), "steps_sampled": len(errs),
                     "max_rel_err": worst, "mean_rel_err": sum(errs) / len(errs),
                     "prefix_hit_tokens": hits, "passed": worst < args.tolerance})
        print(f"{spec:10s} sampled steps {len(errs):4d}  max rel err {worst:.2e}  "
              f"prefix hits {hits}  {'ok' if worst < args.tolerance else 'FAILED'}", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    record = {"device": name, "torch": torch.__version__,
              "model": args.model, "dtype": args.dtype, "backends": args.backends,
              "max_num_batched_tokens": args.max_num_batched_tokens, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
