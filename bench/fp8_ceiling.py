"""How close can FP8 (e4m3) KV storage get to the full-precision cache? Simulated roundings
on bench.fp8_accuracy's protocol (SmolLM2 teacher-forced over the stdlib's docstrings).

    python -m bench.fp8_ceiling --tokens 4096 --json-out bench/results/cpu-fp8-ceiling-DATE.json

Every run keeps a float32 cache and the reference backend; only what is stored changes:
bench/kv_rounding.py rounds each K/V row as a format would and stores the value a kernel
would read back. Configurations: element-wise roundings (e4m3 with scales per row / per
block of 32 or 16 elements, 3, 4 and 5 mantissa bits with unlimited exponent range, K-only
and V-only), then schemes that store e4m3 codes plus small metadata and may do better:
mean subtraction ("smoothing") of K and/or V with mu per page (its mean or first row, mu
kept in float32, bf16 or e4m3), per 64 positions, per sequence (first chunk) or static
(calibrated on other docstrings); a Hadamard rotation of each row; the first tokens kept
unrounded; and int8 rows for context. The first configuration, the float32 cache itself,
is the baseline. `--k-stats-tokens` also describes K's channel offsets (`k_offsets`).
docs/kernels.md ("FP8 accuracy") has the results.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.fp8_accuracy import stdlib_docstrings, summarize, teacher_forced, text_record
from bench.kv_rounding import ChannelMeans, ElementRounding, RowRounding, SideRounding, install
from server.engine import LLM, EngineConfig

# Docstrings for the static mu's calibration: none of STDLIB_MODULES, so not the scored text.
CALIBRATION_MODULES = ("csv", "random", "enum", "ast", "zipfile", "tarfile", "socket",
                       "unittest", "urllib.parse", "http.client", "email.message")
CALIBRATION_TOKENS = 2048


@dataclass
class Calibration:
    """Per-(layer, KV head) channel means of K and V over the calibration text."""

    k_mu: list[torch.Tensor]
    v_mu: list[torch.Tensor]


def calibrate(tokens: list[int]) -> Calibration:
    means = ChannelMeans()
    captured: dict[str, int] = {}

    def prepare(llm: LLM) -> None:
        captured["layers"] = len(llm.engine.pool.k_caches)
        means.install(llm.engine.pool)

    teacher_forced(tokens, "auto", "per-token-head", attention_backend="reference",
                   prepare=prepare)
    layers = captured["layers"]
    return Calibration(means.means("k", layers), means.means("v", layers))


def k_offsets(tokens: list[int]) -> list[dict[str, object]]:
    """Per layer and KV head, over `tokens` (full-precision cache): the norm of K's channel
    mean over the mean row norm, and the share of rows whose largest |element| sits in the
    head's most frequent such channel (the element a per-row scale stores exactly)."""
    rows: dict[int, list[torch.Tensor]] = {}

    def prepare(llm: LLM) -> None:
        pool = llm.engine.pool
        store = pool.store

        def recording_store(layer: int, k: torch.Tensor, v: torch.Tensor,
                            slots: torch.Tensor) -> None:
            rows.setdefault(layer, []).append(k.float().clone())
            store(layer, k, v, slots)

        pool.store = recording_store  # type: ignore[method-assign]

    teacher_forced(tokens, "auto", "per-token-head", attention_backend="reference",
                   prepare=prepare)
    out = []
    for layer in sorted(rows):
        k = torch.cat(rows[layer])  # [T, H, D]
        ratio = k.mean(0).norm(dim=-1) / k.norm(dim=-1).mean(0)
        argmax = k.abs().argmax(dim=-1)  # [T, H]
        share = [torch.bincount(argmax[:, h], minlength=k.shape[-1]).max().item() / k.shape[0]
                 for h in range(k.shape[1])]
        out.append({"layer": layer, "mean_norm_over_row_norm": [round(r, 3) for r in ratio.tolist()],
                    "largest_channel_share": [round(x, 3) for x in share]})
    return out


E4M3_ROW = ElementRounding("e4m3-row")
M3 = ElementRounding("mantissa", bits=3)
INT8_ROW = ElementRounding("int8-row")
BF16 = ElementRounding("mantissa", bits=7)  # bf16's rounding wherever its exponent reaches


def _both(element: ElementRounding) -> Callable[[Calibration | None], RowRounding]:
    return lambda _: RowRounding(SideRounding(element), SideRounding(element))


def _smoothed(k_mu: str, v_mu: str, element: ElementRounding = E4M3_ROW,
              rotate: bool = False, mu_tokens: int | None = None,
              mu_element: ElementRounding = ElementRounding(),
              ) -> Callable[[Calibration | None], RowRounding]:
    def build(cal: Calibration | None) -> RowRounding:
        def side(source: str, static: list[torch.Tensor] | None) -> SideRounding:
            return SideRounding(element, source, rotate,
                                static_mu=static if source == "static" else None,
                                mu_tokens=mu_tokens, mu_element=mu_element)

        return RowRounding(side(k_mu, cal.k_mu if cal else None),
                           side(v_mu, cal.v_mu if cal else None))

    return build


# name -> (what it is, builder given the calibration (None unless a config needs it))
CONFIGS: dict[str, tuple[str, Callable[[Calibration | None], RowRounding]]] = {
    "full": ("float32 cache (baseline)", _both(ElementRounding())),
    "e4m3/row": ("e4m3, one scale per (token, KV head) row: production per-token-head",
                 _both(E4M3_ROW)),
    "m3": ("3 mantissa bits, unlimited exponent: e4m3's best with any scale", _both(M3)),
    "e4m3/block32": ("e4m3, a scale per 32 elements of a row",
                     _both(ElementRounding("e4m3-block", block=32))),
    "e4m3/block16": ("e4m3, a scale per 16 elements of a row",
                     _both(ElementRounding("e4m3-block", block=16))),
    "m4": ("4 mantissa bits, unlimited exponent", _both(ElementRounding("mantissa", bits=4))),
    "m5": ("5 mantissa bits, unlimited exponent", _both(ElementRounding("mantissa", bits=5))),
    "K-only m3": ("K at 3 mantissa bits, V full precision",
                  lambda _: RowRounding(SideRounding(M3), SideRounding())),
    "V-only m3": ("V at 3 mantissa bits, K full precision",
                  lambda _: RowRounding(SideRounding(), SideRounding(M3))),
    "e4m3/row K-mu/page": ("e4m3 rows; K minus its page's (16 rows) channel mean, added back",
                            _smoothed("page", "none")),
    "e4m3/row K-mu/sequence": ("e4m3 rows; K minus the mean of the sequence's first chunk",
                                _smoothed("first-chunk", "none")),
    "e4m3/row K-mu/static": ("e4m3 rows; K minus a calibrated per-(layer, head) mean",
                              _smoothed("static", "none")),
    "e4m3/row V-mu/page": ("e4m3 rows; V minus its page's channel mean, added back",
                            _smoothed("none", "page")),
    "e4m3/row KV-mu/page": ("e4m3 rows; K and V minus their page's channel means",
                              _smoothed("page", "page")),
    "e4m3/row KV-mu/static": ("e4m3 rows; K and V minus calibrated means",
                                _smoothed("static", "static")),
    "e4m3/row Hadamard": ("e4m3 rows of K and V rotated by a Hadamard matrix",
                           _smoothed("none", "none", rotate=True)),
    "e4m3/row Hadamard KV-mu/page": ("Hadamard-rotated rows minus their page means",
                                        _smoothed("page", "page", rotate=True)),
    "m3 KV-mu/page": ("3 mantissa bits, unlimited exponent, after page-mean subtraction",
                        _smoothed("page", "page", element=M3)),
    "e4m3/row K-mu/page e4m3-mu": ("K-mu/page with each mu stored as an e4m3 row (+ scale)",
                                   _smoothed("page", "none", mu_element=E4M3_ROW)),
    "e4m3/row K-mu/page bf16-mu": ("K-mu/page with each mu rounded to bf16",
                                   _smoothed("page", "none", mu_element=BF16)),
    "e4m3/row K-mu/page-first-row": ("K minus its page's first row (a decode-time rule)",
                                     _smoothed("page-first-row", "none")),
    "e4m3/row K-mu/64": ("K minus the channel mean of each 64 positions (pages of 64)",
                         _smoothed("page", "none", mu_tokens=64)),
    "e4m3/row RHadamard": ("e4m3 rows of K and V rotated by a Hadamard matrix with random "
                           "column signs (seed 0)",
                           lambda _: RowRounding(SideRounding(E4M3_ROW, rotate=True, sign_seed=0),
                                                 SideRounding(E4M3_ROW, rotate=True, sign_seed=0))),
    "e4m3/row K-Hadamard": ("e4m3 rows; K rotated by a Hadamard matrix (q would be too), V not",
                            lambda _: RowRounding(SideRounding(E4M3_ROW, rotate=True),
                                                  SideRounding(E4M3_ROW))),
    "e4m3/row RHadamard seed1": ("as e4m3/row RHadamard, other random signs (seed 1)",
                                 lambda _: RowRounding(
                                     SideRounding(E4M3_ROW, rotate=True, sign_seed=1),
                                     SideRounding(E4M3_ROW, rotate=True, sign_seed=1))),
    "K-only e4m3/row": ("K as e4m3 rows, V full precision",
                        lambda _: RowRounding(SideRounding(E4M3_ROW), SideRounding())),
    "V-only e4m3/row": ("V as e4m3 rows, K full precision",
                        lambda _: RowRounding(SideRounding(), SideRounding(E4M3_ROW))),
    "e4m3/row sink16": ("e4m3 rows, the sequence's first 16 tokens full precision",
                        lambda _: RowRounding(SideRounding(E4M3_ROW, keep_first=16),
                                              SideRounding(E4M3_ROW, keep_first=16))),
    "int8/row": ("context, not FP8: int8 codes, one scale amax/127 per row", _both(INT8_ROW)),
    "int8/row KV-mu/page": ("context, not FP8: int8 rows after page-mean subtraction",
                            _smoothed("page", "page", element=INT8_ROW)),
    "K int8/row V e4m3/row": ("context, not FP8: K as int8 rows, V as e4m3 rows",
                               lambda _: RowRounding(SideRounding(INT8_ROW),
                                                     SideRounding(E4M3_ROW))),
}
NEEDS_CALIBRATION = ("static",)


def run_configs(tokens: list[int], names: list[str], calibration_tokens: list[int],
                json_out: str | None, header: dict[str, object]) -> dict[str, object]:
    """Every named configuration in order, the baseline first; JSON rewritten after each."""
    if names[0] != "full":
        names = ["full", *[n for n in names if n != "full"]]
    needs_cal = any(any(w in n for w in NEEDS_CALIBRATION) for n in names)
    calibration = calibrate(calibration_tokens) if needs_cal else None
    result: dict[str, object] = {**header, "results": {}}
    rows: dict[str, object] = result["results"]  # type: ignore[assignment]
    base = None
    for name in names:
        what, build = CONFIGS[name]
        rounding = build(calibration)
        run = teacher_forced(tokens, "auto", "per-token-head", attention_backend="reference",
                             prepare=lambda llm, r=rounding: install(llm.engine.pool, r))
        base = base or run
        rows[name] = {"what": what, **summarize(run, base)}
        print(f"{name:34s} ppl ratio {rows[name]['perplexity_ratio']:.4f}  "  # type: ignore[index]
              f"top-1 {rows[name]['top1_agreement']:.4f}", flush=True)  # type: ignore[index]
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens of text scored (default 4096)")
    p.add_argument("--skip-tokens", type=int, default=0,
                   help="score the text from this token on (another sample of it; default 0)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated configuration names (default: all; `full` is added)")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                   help=f"tokens of the static mu's calibration text (default {CALIBRATION_TOKENS})")
    p.add_argument("--k-stats-tokens", type=int, default=512,
                   help="tokens over which K's channel offsets are described (0: skip)")
    p.add_argument("--json-out", help="write the results here (rewritten after each config)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; known: {list(CONFIGS)}")
    text, cal_text = stdlib_docstrings(), stdlib_docstrings(CALIBRATION_MODULES)
    tokenizer = LLM(EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=64,
                                 log_stats=False)).tokenizer
    tokens = tokenizer.encode(text)[args.skip_tokens : args.skip_tokens + args.tokens]
    cal_tokens = tokenizer.encode(cal_text)[: args.calibration_tokens]
    if len(tokens) < args.tokens:
        raise SystemExit(f"the text has only {len(tokens)} tokens")
    header = {
        "what": "SmolLM2-135M-Instruct (embedded GGUF, float32, CPU, reference backend), "
                "teacher-forced; K/V rows rounded as each configuration says (bench/"
                "kv_rounding.py) and stored in a float32 cache; each against the float32 cache",
        "text": text_record(text, first_token=args.skip_tokens, tokens_scored=len(tokens) - 1),
        "calibration": {"modules": list(CALIBRATION_MODULES), "tokens": len(cal_tokens),
                        "used_by": "configurations with a static mu"},
        "page_size": 16, "prefill_chunk": 2048,
        "machine": platform.machine(), "torch": torch.__version__,
    }
    if args.k_stats_tokens:
        header["k_offsets"] = {"tokens": args.k_stats_tokens,
                               "layers": k_offsets(tokens[: args.k_stats_tokens])}
    result = run_configs(tokens, names, cal_tokens, args.json_out, header)
    print(json.dumps(result["results"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
