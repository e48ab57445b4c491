"""Peers of the Triton extend kernel for the prefill/extend benchmark, on contiguous K/V.

Each peer computes the same attention as the paged kernel: q [B, Hq, Lq, D] against
k/v [B, Hkv, Lk, D], query i at absolute position Lk - Lq + i (bottom-right causal; for a
prefill Lq == Lk). A peer that cannot run a case (missing backend, unsupported mask or GQA)
raises `PeerUnavailable` and the benchmark records why instead of a time.

Also here: an fp32 reference on a subset of heads, to check every kernel's output at the
benchmark's real sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Runner = Callable[[], torch.Tensor]


class PeerUnavailable(RuntimeError):
    pass


def _expand_kv(k: torch.Tensor, v: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _sdpa_runner(
    backend_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[Runner, dict[str, str]]:
    """SDPA pinned to one backend; GQA natively if the backend takes it, else expanded K/V
    (expanded outside the timed region). Non-square cases use a lower-right causal mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
    Lq, Lk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    masks: list[tuple[str, dict]] = []
    if Lq == Lk:
        masks.append(("is_causal", {"is_causal": True}))
    else:
        masks.append(("causal_lower_right", {"attn_mask": causal_lower_right(Lq, Lk)}))
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        masks.append(("bool_mask", {"attn_mask": keep}))
        bias = torch.zeros(Lq, Lk, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        masks.append(("additive_bias", {"attn_mask": bias}))
    errors = []
    for gqa in (True, False):
        kk, vv = (k, v) if gqa else _expand_kv(k, v, group)
        for mask_name, kwargs in masks:
            extra = {"gqa": "native" if gqa else "expanded", "mask": mask_name}
            gqa_kw = {"enable_gqa": True} if gqa and group > 1 else {}

            def run(kk=kk, vv=vv, kwargs=kwargs, gqa_kw=gqa_kw) -> torch.Tensor:
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(
                        q, kk, vv, scale=scale, **kwargs, **gqa_kw
                    )

            try:
                run()
                torch.cuda.synchronize()
            except (RuntimeError, TypeError, ValueError) as exc:
                errors.append(f"{extra}: {str(exc).splitlines()[0][:160]}")
                continue
            return run, extra
    raise PeerUnavailable("; ".join(errors))


def sdpa_flash(q, k, v, scale):
    return _sdpa_runner("sdpa_flash", q, k, v, scale)


def cudnn(q, k, v, scale):
    return _sdpa_runner("cudnn", q, k, v, scale)


_flex_compiled = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """FlexAttention (torch.compile'd) with a bottom-right causal block mask."""
    global _flex_compiled
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise PeerUnavailable(str(exc)) from exc
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    offset = Lk - Lq

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=Lq, KV_LEN=Lk, device=q.device)
    gqa = Hq != k.shape[1]

    def run() -> torch.Tensor:
        return _flex_compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

    try:
        run()
        torch.cuda.synchronize()
    except Exception as exc:  # compile failures come in many exception types
        raise PeerUnavailable(f"flex: {str(exc).splitlines()[0][:200]}") from exc
    return run, {"gqa": "native" if gqa else "none", "mask": "block_mask"}


PEERS = {"sdpa_flash": sdpa_flash, "cudnn": cudnn, "flex": flex}


def check_heads(num_q_heads: int, num_kv_heads: int) -> list[int]:
    """The query heads `reference_rel_error` checks: the first head of the first KV group, a
    middle head of a middle group and the last head of the last one, for any group size
    (Qwen2.5-7B's 28 query / 4 KV heads make groups of 7: heads 0, 17, 27)."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV groups")
    group = num_q_heads // num_kv_heads
    middle = (num_kv_heads // 2) * group + (group - 1) // 2
    return sorted({0, middle, num_q_heads - 1})


def reference_rel_error(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
    heads: list[int], chunk: int = 2048,
) -> float:
    """‖out - ref‖ / ‖ref‖ over `heads`, ref in fp32 with a bottom-right causal mask.

    q, out: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; query head h reads KV head h // (Hq / Hkv)."""
    B, Hq, Lq, D = q.shape
    Lk, Hkv = k.shape[2], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads do not split into {Hkv} KV groups")
    if out.shape != q.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, q {tuple(q.shape)}")
    if not heads or not all(0 <= h < Hq for h in heads):
        raise ValueError(f"check heads {heads} are not all among the {Hq} query heads")
    group = Hq // Hkv
    num = den = 0.0
    k_pos = torch.arange(Lk, device=q.device)
    for b in range(B):
        for h in heads:
            kh, vh = k[b, h // group].float(), v[b, h // group].float()
            for s in range(0, Lq, chunk):
                qh = q[b, h, s : s + chunk].float()
                q_pos = Lk - Lq + s + torch.arange(qh.shape[0], device=q.device)
                scores = (qh @ kh.T) * scale
                scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
                ref = torch.softmax(scores, dim=-1) @ vh
                diff = out[b, h, s : s + chunk].float() - ref
                num += float((diff * diff).sum())
                den += float((ref * ref).sum())
    return (num / max(den, 1e-30)) ** 0.5
