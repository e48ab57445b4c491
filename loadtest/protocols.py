"""Request bodies and stream-chunk parsing for the three endpoints.

``completions`` and ``chat`` are the OpenAI protocol (any compatible server); ``generate``
is the native protocol of attnserve (SGLang-style ``text``/``input_ids`` plus
``sampling_params``; chunks carry ``text``/``token_ids`` deltas and a running
``completion_tokens``; SGLang's ``meta_info`` counts are read too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loadtest.workloads import Turn

ENDPOINT_PATHS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "generate": "/generate",
}


@dataclass
class SamplingOptions:
    temperature: float = 0.0
    ignore_eos: bool = True  # exact output lengths, as vLLM's benchmark asks
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChunkInfo:
    """What one streamed event says."""

    text: str = ""
    num_tokens: int | None = None  # token ids in this chunk, when the protocol carries them
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def has_content(self) -> bool:
        return bool(self.text) or bool(self.num_tokens)


def _history_text(history: list[tuple[Turn, str]], turn: Turn) -> str:
    parts: list[str] = []
    for user, answer in history:
        parts += [user.text or "", answer]
    parts.append(turn.text or "")
    return "\n".join(parts)


def build_body(
    endpoint: str,
    model: str | None,
    turn: Turn,
    history: list[tuple[Turn, str]],
    sampling: SamplingOptions,
) -> dict[str, Any]:
    """The JSON body for one streamed request: ``turn`` after the ``history`` of (turn, answer)."""
    if endpoint == "chat":
        messages: list[dict[str, str]] = []
        for user, answer in history:
            messages += [{"role": "user", "content": user.text or ""},
                         {"role": "assistant", "content": answer}]
        if turn.text is None:
            raise ValueError("chat needs text prompts; this trace was built from token ids")
        messages.append({"role": "user", "content": turn.text})
        body: dict[str, Any] = {
            "messages": messages, "max_tokens": turn.output_len,
            "temperature": sampling.temperature, "stream": True,
            "stream_options": {"include_usage": True},
        }
    elif endpoint == "completions":
        prompt: Any = turn.token_ids if (turn.token_ids is not None and not history) \
            else _history_text(history, turn)
        body = {
            "prompt": prompt, "max_tokens": turn.output_len,
            "temperature": sampling.temperature, "stream": True,
            "stream_options": {"include_usage": True},
        }
    elif endpoint == "generate":
        params = {"max_tokens": turn.output_len, "temperature": sampling.temperature}
        if sampling.ignore_eos:
            params["ignore_eos"] = True
        body = {"sampling_params": params, "stream": True}
        if turn.token_ids is not None and not history:
            body["input_ids"] = turn.token_ids
        else:
            body["text"] = _history_text(history, turn)
        body.update(sampling.extra_body)
        return body
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; choose from {', '.join(ENDPOINT_PATHS)}")
    if model is not None:
        body["model"] = model
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    body.update(sampling.extra_body)
    return body


def _error_text(data: dict[str, Any]) -> str | None:
    err = data.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def parse_chunk(endpoint: str, data: dict[str, Any]) -> ChunkInfo:
    """Read one decoded ``data:`` object of the endpoint's stream."""
    info = ChunkInfo(error=_error_text(data))
    if endpoint == "generate":
        info.text = data.get("text") or ""
        ids = data.get("token_ids")
        info.num_tokens = len(ids) if isinstance(ids, list) else None
        info.finish_reason = data.get("finish_reason")
        meta = data.get("meta_info") or {}  # SGLang puts the counts here
        info.prompt_tokens = data.get("prompt_tokens", meta.get("prompt_tokens"))
        # attnserve: cumulative completion_tokens in every chunk; the last one is the total.
        info.completion_tokens = data.get("completion_tokens", meta.get("completion_tokens"))
        return info
    choices = data.get("choices") or []
    if choices:
        choice = choices[0]
        if endpoint == "chat":
            info.text = (choice.get("delta") or {}).get("content") or ""
        else:
            info.text = choice.get("text") or ""
        info.finish_reason = choice.get("finish_reason")
    usage = data.get("usage") or {}
    info.prompt_tokens = usage.get("prompt_tokens")
    info.completion_tokens = usage.get("completion_tokens")
    return info
