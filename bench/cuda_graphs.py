"""Decode step time with and without CUDA graphs, through the engine (GPU).

    python -m bench.cuda_graphs --model llama3-8b --tokenizer DIR --batches 1,8,32

For each batch size, the same requests (short random prompts, `--output-len` greedy tokens,
EOS ignored) run through one EngineCore with graphs and one without, alternating
`--repeats` times; each engine step's wall time is recorded with the step's phase, and the
median decode-only step is reported (the whole step: scheduling, inputs, forward,
sampling). Also checks that both modes produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys

import torch

from model.loader import load_model, load_tokenizer
from scheduler.request import SamplingParams
from server.engine import EngineConfig, EngineCore, NullObserver

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
        rows.append({"batch": b, "eager_step_ms": round(eager_ms, 3),
                     "graph_step_ms": round(graph_ms, 3), "speedup": round(eager_ms / graph_ms, 3),
                     "identical_outputs": f"{same}/{b}"})
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
