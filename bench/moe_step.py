"""What the MoE feed-forward of a DeepSeek preset costs per step (GPU):

    python -m bench.moe_step --model deepseek-v2-lite --json-out FILE

One MoE layer of the preset (bf16, seeded weights, random hidden states) is timed for
several token counts with torch's grouped GEMM and with one matmul per expert block
(model/moe.py); each row gives the layer's time, the model's MoE time per step (times its
MoE layers), and the weight bytes the step must read (the distinct experts the tokens chose
+ the shared ones + the router) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from bench.attention.common import measure_copy_gbps, time_cuda_us
from model.deepseek_config import DeepseekConfig
from model.moe import MoE, expert_blocks
from model.presets import synthetic_config

logger = logging.getLogger(__name__)


def expert_weight_bytes(moe: MoE, ids: torch.Tensor, cfg: DeepseekConfig) -> int:
    """Bytes of the weights one forward must read: chosen experts, shared ones, router."""
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2  # bf16
    distinct = int(torch.unique(ids).numel())
    shared = sum(p.numel() * p.element_size() for p in moe.shared_experts.parameters()) \
        if moe.shared_experts is not None else 0
    return distinct * per_expert + shared + moe.gate.weight.numel() * 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--tokens", default="1,8,64,256,2048")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO")
    cfg = synthetic_config(args.model)
    if not isinstance(cfg, DeepseekConfig):
        raise SystemExit(f"{args.model} has no MoE layers")
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        moe = MoE(cfg, torch.bfloat16).requires_grad_(False)
    for p in moe.parameters():
        p.normal_(0.0, p.shape[-1] ** -0.5)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    copy_gbps = measure_copy_gbps(device)
    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, cfg.hidden_size, device=device, dtype=torch.bfloat16)
        _, ids = moe.gate(x)
        nbytes = expert_weight_bytes(moe, ids, cfg)
        row = {"tokens": n, "distinct_experts": int(torch.unique(ids).numel()),
               "weight_bytes": nbytes, "floor_us": round(nbytes / (copy_gbps * 1e3), 2)}
        for mode, grouped in (("grouped_mm", True), ("per_expert", False)):
            moe.experts.use_grouped_mm = grouped
            with torch.inference_mode():
                us = time_cuda_us(lambda: moe(x))  # noqa: B023
            row[f"{mode}_us"] = round(us, 2)
            row[f"{mode}_step_ms"] = round(us * moe_layers / 1e3, 3)
            row[f"{mode}_weight_gbps"] = round(nbytes / us / 1e3, 1)
        _, ends = expert_blocks(ids, cfg.n_routed_experts)
        row["largest_block"] = int(torch.diff(ends, prepend=ends.new_zeros(1)).max())
        rows.append(row)
        logger.info("%s", row)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "model": args.model, "moe_layers": moe_layers, "copy_gbps": round(copy_gbps, 1),
              "rows": rows}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
