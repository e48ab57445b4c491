"""Decode step time with and without CUDA graphs, through the engine (GPU).

    python -m bench.cuda_graphs --model llama3-8b --tokenizer DIR --batches 1,8,32

For each batch size, the same requests (short random prompts, `--output-len` greedy tokens,
EOS ignored) run through one EngineCore with graphs and one without, alternating
`--repeats` times; each engine step's wall time is recorded with the step's phase, and the
median decode-only step is reported (the whole step: scheduling, inputs, forward,
sampling). Also checks that both modes produced the same tokens, and for every sequence
whose streams differ, explains the first difference: both modes run once more with the top
2 logprobs of every token, and the report gives, at the first differing token, each mode's
top-2 gap (a logprob gap is the logit gap) against the bf16 spacing of the run's logits
(the LM head's output is bf16, widened) and against how far the two modes' logprobs of
the same tokens already differed before it. A divergence is a near-tie when one mode's
gap is within either.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys

import torch

from model.loader import load_model, load_tokenizer
from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore, NullObserver
from server.engine.outputs import TokenLogprob

logger = logging.getLogger(__name__)


class StepTimes(NullObserver):
    def __init__(self) -> None:
        self.decode_s: list[float] = []

    def on_step(self, phase: str, num_tokens: int, step_s: float, attention_s: float | None) -> None:
        if phase == "decode":
            self.decode_s.append(step_s)


def run_once(engine: EngineCore, times: StepTimes, prompts: list[list[int]],
             output_len: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    times.decode_s.clear()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[i] for i in ids]


class LogitRange:
    """Wraps a sampler to record the largest |logit| it is given (for the bf16 spacing)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.max_abs = 0.0

    def __call__(self, logits: torch.Tensor, *args, **kwargs):
        self.max_abs = max(self.max_abs, float(logits.abs().max()))
        return self.sampler(logits, *args, **kwargs)


def run_with_logprobs(engine: EngineCore, prompts: list[list[int]], output_len: int
                      ) -> list[list[TokenLogprob]]:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, logprobs=2)
    ids = [engine.add_request(p, params) for p in prompts]
    rows: dict[str, list[TokenLogprob]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            rows[out.request_id] += out.new_logprobs
    return [rows[i] for i in ids]


def bf16_spacing(value: float) -> float:
    """The gap between neighbouring bfloat16 numbers at |value| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(value), 1e-30))) - 7)


def divergences(eager: list[list[TokenLogprob]], graph: list[list[TokenLogprob]],
                max_abs_logit: float) -> list[dict]:
    """For each sequence whose greedy streams differ: the first differing token, explained."""
    spacing = bf16_spacing(max_abs_logit)
    found = []
    for seq, (e_rows, g_rows) in enumerate(zip(eager, graph, strict=True)):
        first = next((i for i, (e, g) in enumerate(zip(e_rows, g_rows, strict=False))
                      if e.token_id != g.token_id), None)
        if first is None:
            continue
        noise = max((abs(e.logprob - g.logprob) for e, g in zip(e_rows[:first], g_rows[:first],
                                                                 strict=True)), default=0.0)
        e, g = e_rows[first], g_rows[first]
        gap_e = e.top[0][1] - e.top[1][1]
        gap_g = g.top[0][1] - g.top[1][1]
        found.append({
            "sequence": seq, "first_differing_token": first,
            "eager_top2": e.top[:2], "graph_top2": g.top[:2],
            "eager_gap": gap_e, "graph_gap": gap_g,
            "bf16_spacing_of_logits": spacing, "cross_mode_logprob_diff_before": noise,
            "swapped_pair": {t for t, _ in e.top[:2]} == {t for t, _ in g.top[:2]},
            "near_tie": min(gap_e, gap_g) <= max(spacing, noise),
        })
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama3-8b", help="synthetic preset or weights")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf file (default: the model's)")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    device = torch.device("cuda")
    loaded = load_model(args.model, torch.bfloat16, device, with_tokenizer=args.tokenizer is None)
    if args.tokenizer is not None:
        loaded.tokenizer = load_tokenizer(args.tokenizer)
    batches = [int(b) for b in args.batches.split(",")]
    engines = {}
    for graphs in (False, True):
        times = StepTimes()
        config = EngineConfig(model=args.model, dtype="bfloat16", device="cuda",
                              attention_backend="triton", max_num_seqs=max(batches),
                              kv_cache_tokens=32768, cuda_graphs=graphs)
        engines[graphs] = (EngineCore(config, observer=times, loaded=loaded), times)
    rng = random.Random(0)
    rows = []
    for b in batches:
        prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt_len)] for _ in range(b)]
        medians: dict[bool, list[float]] = {False: [], True: []}
        outputs = {}
        for _ in range(args.repeats):
            for graphs in (False, True):
                engine, times = engines[graphs]
                outputs[graphs] = run_once(engine, times, prompts, args.output_len)
                medians[graphs].append(statistics.median(times.decode_s))
        eager_ms = 1e3 * statistics.median(medians[False])
        graph_ms = 1e3 * statistics.median(medians[True])
        same = sum(a == g for a, g in zip(outputs[False], outputs[True], strict=True))
        explained: list[dict] = []
        if same < b:
            ranges = {}
            with_logprobs = {}
            for graphs in (False, True):
                engine = engines[graphs][0]
                ranges[graphs] = engine.runner.sampler = LogitRange(engine.runner.sampler)
                with_logprobs[graphs] = run_with_logprobs(engine, prompts, args.output_len)
                engine.runner.sampler = ranges[graphs].sampler
            explained = divergences(with_logprobs[False], with_logprobs[True],
                                    max(r.max_abs for r in ranges.values()))
            for d in explained:
                print(f"  seq {d['sequence']:3d} token {d['first_differing_token']:3d}: top-2 gap "
                      f"eager {d['eager_gap']:.2e} graphs {d['graph_gap']:.2e}; bf16 spacing "
                      f"{d['bf16_spacing_of_logits']:.2e}; modes differed by "
                      f"{d['cross_mode_logprob_diff_before']:.2e} before; swapped pair "
                      f"{d['swapped_pair']}; near-tie {d['near_tie']}", flush=True)
        rows.append({"batch": b, "eager_step_ms": round(eager_ms, 3),
                     "graph_step_ms": round(graph_ms, 3), "speedup": round(eager_ms / graph_ms, 3),
                     "identical_outputs": f"{same}/{b}", "divergences": explained,
                     "all_divergences_near_ties": all(d["near_tie"] for d in explained)})
        print(f"batch {b:4d}: eager {eager_ms:7.2f} ms/step  graphs {graph_ms:7.2f} ms/step  "
              f"{eager_ms / graph_ms:5.2f}x  identical token streams {same}/{b}", flush=True)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": args.model, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "graphs_captured": engines[True][0].runner.graphs.num_graphs, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
