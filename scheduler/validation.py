"""Which requests can ever run: the one check a request passes before it is queued.

The engine calls `Scheduler.validate` when a request is submitted (on the caller's thread),
so a request that could never run is refused there, as a 400, rather than failing later;
`Scheduler.add_request` trusts what it is given. Pure Python: no torch.

Limits, as vLLM's: `max_model_len` bounds prompt + max_tokens, so a prompt of max_model_len
tokens leaves no room to generate and is refused. The KV pool must hold one token fewer:
the last generated token is never fed back, so its K/V is never stored.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.request import SamplingParams


class RequestRejected(ValueError):
    """A request that can never be served: the message is meant for the user (a 400), and
    `param` names the request field at fault when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_request(
    prompt_token_ids: Sequence[int], params: SamplingParams, *, max_model_len: int,
    kv_capacity_tokens: int, vocab_size: int | None = None,
) -> None:
    """Raise RequestRejected unless the request fits every limit."""
    try:
        params.validate()
    except ValueError as e:
        raise RequestRejected(str(e), getattr(e, "param", None)) from None
    n = len(prompt_token_ids)
    if n == 0:
        raise RequestRejected("the prompt is empty", "prompt")
    if vocab_size is not None:
        for name, ids in (("prompt", prompt_token_ids), ("logit_bias", params.logit_bias or ())):
            if any(not 0 <= t < vocab_size for t in ids):
                raise RequestRejected(f"{name} token ids must be in [0, {vocab_size})", name)
    total = n + params.max_tokens
    if total > max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {total} tokens ({n} in the prompt, {params.max_tokens} for the "
            "completion). Please reduce the length of the prompt or max_tokens.",
            "max_tokens",
        )
    if total - 1 > kv_capacity_tokens:
        raise RequestRejected(
            f"the request needs {total - 1} tokens of KV cache ({n} in the prompt and "
            f"{params.max_tokens - 1} generated: the last generated token is never stored) but "
            f"the whole pool holds {kv_capacity_tokens}", "max_tokens",
        )
