"""Engine-level check on a GPU: the same workload through EngineCore with two attention
backends, teacher-forced, comparing the logits of every sampled row.

Both engines get an identical forced token stream (a sampler that records the logits and
returns tokens drawn from a generator seeded by the call index), so their schedules are
the same step for step and the logits can be compared row for row. The workload exercises
the prefix cache (a first request, then seven sharing its prefix) and chunked prefill.

  python -m bench.engine_logits_check --model llama3-8b --tokenizer DIR \
      --backends reference triton --noise-floor sdpa --layouts nhd:16 hnd:64 --json-out FILE

In bf16 two correct attention implementations already differ end to end: their outputs
differ by about one rounding (~2e-3), and once two runs differ, every later bf16 rounding
in the model flips independently, so the gap grows with depth (on CPU, a 1024-wide proxy
of llama3-8b: 9e-3 after 2 layers, 1.8e-2 after 32). `--noise-floor sdpa` measures that
gap with torch's own kernel, so a tested backend can be judged against it; `--dtype
float32` takes the rounding noise away and leaves the kernels' own differences.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys

import torch

from model.loader import load_model, load_tokenizer
from model.sampler import SamplerOutput
from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore

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


def _run_backend(args, backend: str, layout: str, page: str, loaded,
                 prompts: list[list[int]]) -> tuple[list[torch.Tensor], int]:
    name, _, mode = backend.partition("@")
    prefill_backend, _, decode_backend = name.partition("+")
    config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device,
        attention_backend=prefill_backend,
        prefill_backend=prefill_backend if decode_backend else None,
        decode_backend=decode_backend or None,
        kv_layout=layout, page_size=int(page or 16), kv_cache_tokens=args.kv_cache_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_cache=True,
        cuda_graphs=mode != "eager",
    )
    engine = EngineCore(config, loaded=loaded)
    logits = run_workload(engine, prompts, args.max_tokens)
    hits = engine.scheduler.stats.prefix_cache_hit_tokens
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits, hits


def _step_errors(want: list[torch.Tensor], got: list[torch.Tensor]) -> list[float]:
    """Per sampled step: ||got - want|| / ||want|| over the step's logits."""
    assert len(want) == len(got), "the two engines scheduled differently"
    return [float((g - w).norm() / w.norm()) for w, g in zip(want, got, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", help="synthetic preset or weights")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf file (default: the model's)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", nargs="+", default=["reference", "triton"],
                    help="the oracle backend, then each backend compared with it;\n"
                         "PREFILL+DECODE names a hybrid (e.g. reference+triton);\n"
                         "a @eager suffix turns CUDA graphs off (e.g. triton@eager)")
    ap.add_argument("--noise-floor", default=None, metavar="BACKEND",
                    help="a trusted peer backend (e.g. sdpa) also compared with the oracle:\n"
                         "two correct bf16 implementations differ by this much end to end,\n"
                         "so a backend under test within --floor-margin of it passes too")
    ap.add_argument("--floor-margin", type=float, default=1.1,
                    help="pass when max rel err <= margin x the noise floor's (default 1.1)")
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
        loaded.tokenizer = load_tokenizer(args.tokenizer)
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 30000) for _ in range(args.prefix_len)]
    prompts = [prefix + [rng.randrange(1000, 30000) for _ in range(args.suffix_len + 7 * i)]
               for i in range(8)]
    rows = []
    ok = True
    oracle, *tested = args.backends
    compared = tested + ([args.noise_floor] if args.noise_floor else [])
    for spec in args.layouts:
        layout, _, page = spec.partition(":")
        results, hits = {}, {}
        for backend in [oracle, *compared]:
            results[backend], hits[backend] = _run_backend(args, backend, layout, page, loaded,
                                                           prompts)
        errors = {b: _step_errors(results[oracle], results[b]) for b in compared}
        floor = max(errors[args.noise_floor]) if args.noise_floor else None
        for backend in tested:
            errs = errors[backend]
            worst = max(errs)
            passed = worst < args.tolerance
            if floor is not None:
                passed |= worst <= args.floor_margin * floor
            ok &= passed
            rows.append({"oracle": oracle, "backend": backend, "layout": layout,
                         "page_size": int(page or 16), "steps_sampled": len(errs),
                         "max_rel_err": worst, "mean_rel_err": sum(errs) / len(errs),
                         "noise_floor": args.noise_floor, "noise_floor_max_rel_err": floor,
                         "prefix_hit_tokens": hits[backend], "passed": passed})
            floor_text = f"  noise floor ({args.noise_floor}) {floor:.2e}" if floor else ""
            print(f"{spec:10s} {backend:18s} vs {oracle}: steps {len(errs):3d}  max rel err "
                  f"{worst:.2e}{floor_text}  prefix hits {hits[backend]}  "
                  f"{'ok' if passed else 'FAILED'}", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    record = {"device": name, "torch": torch.__version__, "tolerance": args.tolerance,
              "model": args.model, "dtype": args.dtype, "backends": args.backends,
              "noise_floor": args.noise_floor, "floor_margin": args.floor_margin,
              "max_num_batched_tokens": args.max_num_batched_tokens, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
