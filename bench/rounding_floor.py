"""How far apart two correct bf16 attention implementations leave a deep model's logits.

A CPU experiment behind the engine-level bound of the logits check: a llama-shaped bf16
model with random weights (the scaled initialisation of `model/presets.py`; no rotary, no
GQA: neither changes the rounding), run once with exact (float32) attention and then with
attention whose probabilities P are rounded before P.V the way kernels round them:

  bf16p             P in bf16, row sums from float32 P (FlashAttention-2/3, our kernels)
  bf16p_consistent  P in bf16, row sums from the rounded P
  fp16p             P and V in fp16 (3 more mantissa bits for P)
  bf16p_split       P as a bf16 pair hi + lo (about 16 bits; two P.V products)
  float64           everything in float64: exact attention computed a second way

Every variant rounds its output to bf16, as the exact one does. The report is the relative
logits error per position against the exact run. If it barely moves while P's precision
grows 256-fold, the gap is not the kernel's rounding but the model amplifying any
difference in a bf16 activation, and only a bit-identical implementation closes it.

  python -m bench.rounding_floor --layers 32 --width 1024 --tokens 384
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import torch

logger = logging.getLogger(__name__)
MODES = ("bf16p", "bf16p_consistent", "fp16p", "bf16p_split", "float64")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    """Causal attention of [H, T, D] bf16 tensors; scores in float32 from exact products."""
    T, D = q.shape[1], q.shape[2]
    s = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.exp(s.masked_fill(~causal, float("-inf")) - s.amax(-1, keepdim=True))
    row_sum = p.sum(-1, keepdim=True)
    if mode == "float64":
        s64 = (q.double() @ k.double().transpose(1, 2)) / math.sqrt(D)
        p64 = torch.exp(s64.masked_fill(~causal, float("-inf")) - s64.amax(-1, keepdim=True))
        return (p64 @ v.double() / p64.sum(-1, keepdim=True)).bfloat16()
    if mode == "exact":
        out = p @ v.float() / row_sum
    elif mode == "bf16p":
        out = p.bfloat16().float() @ v.float() / row_sum
    elif mode == "bf16p_consistent":
        pb = p.bfloat16().float()
        out = pb @ v.float() / pb.sum(-1, keepdim=True)
    elif mode == "fp16p":
        out = p.half().float() @ v.half().float() / row_sum
    elif mode == "bf16p_split":
        hi = p.bfloat16().float()
        out = (hi + (p - hi).bfloat16().float()) @ v.float() / row_sum
    else:
        raise ValueError(mode)
    return out.bfloat16()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A bf16 GEMM: float32 accumulation, bf16 output (CPU bf16 matmuls are slow)."""
    return (a.float() @ b.float()).bfloat16()


def _rms(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()


def _model(layers: int, width: int, vocab: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def lin(fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(fan_in, fan_out, generator=gen) * gain / math.sqrt(fan_in)).bfloat16()

    ffn = 11 * width // 4
    residual = 1 / math.sqrt(2 * layers)
    return {
        "embed": (torch.randn(vocab, width, generator=gen) * 0.02).bfloat16(),
        "layers": [
            {
                "qkv": lin(width, 3 * width),
                "o": lin(width, width, residual),
                "up": lin(width, 2 * ffn),
                "down": lin(ffn, width, residual),
            }
            for _ in range(layers)
        ],
        "head": lin(width, vocab),
    }


def _logits(model: dict, tokens: torch.Tensor, heads: int, mode: str) -> torch.Tensor:
    x = model["embed"][tokens]
    T, W = x.shape
    for layer in model["layers"]:
        q, k, v = _mm(_rms(x), layer["qkv"]).view(T, 3, heads, W // heads).permute(1, 2, 0, 3)
        x = x + _mm(_attention(q, k, v, mode).transpose(0, 1).reshape(T, W), layer["o"])
        gate, up = _mm(_rms(x), layer["up"]).chunk(2, -1)
        x = x + _mm(torch.nn.functional.silu(gate.float()).bfloat16() * up, layer["down"])
    return _mm(_rms(x), model["head"]).float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (default 32)")
    ap.add_argument("--width", type=int, default=1024, help="hidden size (default 1024)")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    ap.add_argument("--tokens", type=int, default=384, help="sequence length (default 384)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated rounding modes")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one model and prompt each")
    ap.add_argument("--json-out", default=None, help="write the errors here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results: dict[str, dict[str, float]] = {}
    for seed in [int(x) for x in args.seeds.split(",")]:
        model = _model(args.layers, args.width, args.vocab, seed)
        tokens = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(seed))
        exact = _logits(model, tokens, args.heads, "exact")
        for mode in args.modes.split(","):
            logger.info("seed %d: running %s", seed, mode)
            rows = (_logits(model, tokens, args.heads, mode) - exact).norm(dim=-1) / exact.norm(dim=-1)
            errors = {"max_rel_err": float(rows.max()), "mean_rel_err": float(rows.mean())}
            results[f"{mode}/seed{seed}"] = errors
            print(f"seed {seed} {mode:18s} max {rows.max():.3e}  mean {rows.mean():.3e}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
