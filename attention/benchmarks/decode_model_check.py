"""Model-level check of the `triton` backend (GPU): teacher-forced logits vs `reference`.

    python -m attention.benchmarks.decode_model_check --model synthetic:smollm2-135m

A batch of prompts is prefilled, then decoded for several steps with the same fixed
(teacher-forced) tokens through each backend, one step mixing decodes with a new prompt's
prefill; the logits of every step must match the reference backend's (relative error
under 2e-2: random bf16 weights make greedy ties too common for token equality).
"""

from __future__ import annotations

import argparse
import logging
import random

import torch

from attention.batch import ForwardBatch
from attention.registry import build_attention_backend
from kvcache.layout import KVLayout
from kvcache.pool import KVPool, KVPoolConfig
from model.llama import attention_config
from model.loader import load_model

logger = logging.getLogger(__name__)


def run_trace(model, attn_cfg, backend: str, layout_name: str, page_size: int,  # type: ignore[no-untyped-def]
              prompts: list[list[int]], forced: list[list[int]], late_prompt: list[int],
              decode_backend: str | None) -> list[torch.Tensor]:
    """Logits (float32, last row of each sequence) of every step."""
    cfg = model.config
    device = model.device
    layout = KVLayout.create(layout_name, page_size, cfg.num_kv_heads, cfg.head_dim,
                             str(model.dtype))
    max_len = max(len(p) for p in prompts + [late_prompt]) + len(forced[0]) + 2
    pages_per_seq = -(-max_len // layout.page_size)
    num_pages = (len(prompts) + 1) * pages_per_seq + 1
    pool = KVPool(KVPoolConfig(layout, cfg.num_layers, num_pages, model.dtype, device))
    ids = list(range(1, num_pages))
    random.Random(0).shuffle(ids)
    tables = [ids[i * pages_per_seq:(i + 1) * pages_per_seq] for i in range(len(prompts) + 1)]
    attn = build_attention_backend(attn_cfg, pool, backend, decode_backend=decode_backend)
    lens = [len(p) for p in prompts]
    logits: list[torch.Tensor] = []

    def step(tokens: list[list[int]], prefix: list[int], seq_tables: list[list[int]]) -> None:
        q_lens = [len(t) for t in tokens]
        batch = ForwardBatch.build(q_lens, prefix, seq_tables, layout.page_size, device)
        attn.plan(batch)
        flat = torch.tensor([t for ts in tokens for t in ts], device=device)
        hidden = model(flat, batch.positions, attn)
        last = torch.tensor(batch.qo_indptr_host[1:], device=device) - 1
        logits.append(model.compute_logits(hidden[last]))

    with torch.no_grad():
        step(prompts, [0] * len(prompts), tables[:-1])
        for i in range(len(forced[0])):
            tokens = [[f[i]] for f in forced]
            seqs = tables[:-1]
            prefix = list(lens)
            if i == 1:  # a mixed step: every decode plus a new prompt's prefill
                tokens = tokens + [late_prompt]
                seqs = seqs + [tables[-1]]
                prefix = prefix + [0]
            step(tokens, prefix, seqs)
            lens = [n + 1 for n in lens]
    return logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attention.benchmarks.decode_model_check")
    ap.add_argument("--model", default="synthetic:smollm2-135m")
    ap.add_argument("--layouts", default="token:1,nhd:16,hnd:64,hnd_x:16")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompt-lens", default="37,250,1,129,700,64")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    loaded = load_model(args.model, getattr(torch, args.dtype), device, with_tokenizer=False)
    model = loaded.model
    attn_cfg = attention_config(loaded.config)
    rng = random.Random(1)
    vocab = loaded.config.vocab_size
    prompt_lens = [int(n) for n in args.prompt_lens.split(",")]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in prompt_lens]
    forced = [[rng.randrange(vocab) for _ in range(args.steps)] for _ in prompts]
    late = [rng.randrange(vocab) for _ in range(45)]
    worst = 0.0
    for spec in args.layouts.split(","):
        name, _, ps = spec.partition(":")
        want = run_trace(model, attn_cfg, "reference", name, int(ps), prompts, forced, late, None)
        for backend, dec in (("triton", None), ("reference", "triton")):
            got = run_trace(model, attn_cfg, backend, name, int(ps), prompts, forced, late, dec)
            errs = [float((g - w).norm() / w.norm()) for g, w in zip(got, want, strict=True)]
            worst = max(worst, *errs)
            label = backend if dec is None else f"prefill={backend},decode={dec}"
            print(f"{spec:8} {label:32} max step rel err {max(errs):.2e} "
                  f"({'ok' if max(errs) < 2e-2 else 'FAIL'})", flush=True)
    return 0 if worst < 2e-2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
