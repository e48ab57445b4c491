"""The fields SGLang's router adds to the requests it forwards to a worker.

The router (`sglang-router`, docs/replicas.md) parses each request into its own typed
struct and serialises it again, so a worker receives the router's defaults for fields the
client never sent: `no_stop_trim: false`, `skip_special_tokens: true`,
`return_hidden_states: false` on every completion, a few more on chat and /generate. Each
is declared here with the value that asks for what attnserve does anyway, and with that
value only: anything else is a 400 naming the field, so no field is silently ignored.
`separate_reasoning` and `stream_reasoning` take either value: with no reasoning parser
there is no reasoning text to separate, and both values give the same answer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _RouterFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RouterCompletionFields(_RouterFields):
    """What sglang-router adds to /v1/completions."""

    no_stop_trim: Literal[False] = Field(
        False, description="SGLang's; only false: a matched stop string is cut from the text")
    skip_special_tokens: Literal[True] = Field(
        True, description="SGLang's; only true: special tokens are left out of the text")
    return_hidden_states: Literal[False] = Field(
        False, description="SGLang's; only false: hidden states are not returned")


class RouterChatFields(RouterCompletionFields):
    """What sglang-router adds to /v1/chat/completions."""

    continue_final_message: Literal[False] = Field(
        False, description="SGLang's; only false: the template opens a new assistant turn")
    separate_reasoning: bool = Field(
        True, description="SGLang's; no reasoning parser runs, so either value gives the "
                          "same answer")
    stream_reasoning: bool = Field(
        True, description="SGLang's; no reasoning parser runs, so either value gives the "
                          "same answer")


class RouterGenerateFields(_RouterFields):
    """What sglang-router adds to /generate."""

    model: str | None = Field(None, description="the served model name; omitted = the only one")
    return_text_in_logprobs: Literal[False] = Field(False, description="SGLang's; only false")
    log_metrics: Literal[True] = Field(
        True, description="SGLang's; only true: every request is counted in /metrics")
    return_hidden_states: Literal[False] = Field(False, description="SGLang's; only false")
    background: Literal[False] = Field(False, description="SGLang's; only false")
    no_logs: Literal[False] = Field(
        False, description="SGLang's; only false: every request gets its access-log line")
    return_bytes: Literal[False] = Field(False, description="SGLang's; only false")
    return_entropy: Literal[False] = Field(False, description="SGLang's; only false")
