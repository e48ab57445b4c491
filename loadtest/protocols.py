"""Request bodies and stream parsing for the endpoints the load generator speaks.

``completions`` and ``chat`` are the OpenAI protocol as vLLM's and attnserve's servers
stream it: one ``data:`` event per generated token (its text may be empty: a special token,
or bytes the detokenizer holds back), then, with ``stream_options.include_usage``, a last
event with ``choices: []`` and ``usage``, then ``data: [DONE]``. A chat stream may begin
with a role announcement (``delta: {"role": "assistant", "content": ""}``; vLLM and SGLang
send one just before the first token, attnserve puts the role on the first token's event):
it carries no token.

``generate`` is attnserve's native /generate (``text``/``input_ids`` plus
``sampling_params.max_tokens``; each event carries the new ``text`` and ``token_ids`` and
the running ``completion_tokens``). ``sglang`` is SGLang's /generate
(``sampling_params.max_new_tokens``; each event carries the whole ``text`` so far and
``meta_info`` with the running ``completion_tokens`` and ``prompt_tokens``; a server
started with ``--stream-output`` sends pieces instead, which the ``output_ids`` count
tells apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loadtest.workloads import Turn

ENDPOINT_PATHS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "generate": "/generate",
    "sglang": "/generate",
}


@dataclass
class SamplingOptions:
    temperature: float = 0.0
    ignore_eos: bool = True  # exact output lengths, as vLLM's benchmark asks
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChunkInfo:
    """What one streamed event says."""

    carries_token: bool = False  # the event delivers generated output (TTFT/ITL are timed on it)
    text: str = ""  # the new text (possibly empty even when a token came)
    num_tokens: int | None = None  # tokens in this event, when the protocol tells
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # the running (or final) count, when reported
    error: str | None = None


def _history_text(history: list[tuple[Turn, str]], turn: Turn) -> str:
    parts: list[str] = []
    for user, answer in history:
        parts += [user.text or "", answer]
    parts.append(turn.text or "")
    return "\n".join(parts)


def _native_body(endpoint: str, turn: Turn, history: list[tuple[Turn, str]],
                 sampling: SamplingOptions) -> dict[str, Any]:
    length_key = "max_new_tokens" if endpoint == "sglang" else "max_tokens"
    params: dict[str, Any] = {length_key: turn.output_len, "temperature": sampling.temperature}
    if sampling.ignore_eos:
        params["ignore_eos"] = True
    body: dict[str, Any] = {"sampling_params": params, "stream": True}
    if turn.token_ids is not None and not history:
        body["input_ids"] = turn.token_ids
    else:
        body["text"] = _history_text(history, turn)
    body.update(sampling.extra_body)
    return body


def build_body(
    endpoint: str,
    model: str | None,
    turn: Turn,
    history: list[tuple[Turn, str]],
    sampling: SamplingOptions,
) -> dict[str, Any]:
    """The JSON body for one streamed request: ``turn`` after the ``history`` of (turn, answer)."""
    if endpoint in ("generate", "sglang"):
        return _native_body(endpoint, turn, history, sampling)
    if endpoint == "chat":
        messages: list[dict[str, str]] = []
        for user, answer in history:
            messages += [{"role": "user", "content": user.text or ""},
                         {"role": "assistant", "content": answer}]
        if turn.text is None:
            raise ValueError("chat needs text prompts; this trace was built from token ids")
        messages.append({"role": "user", "content": turn.text})
        body: dict[str, Any] = {"messages": messages}
    elif endpoint == "completions":
        prompt: Any = turn.token_ids if (turn.token_ids is not None and not history) \
            else _history_text(history, turn)
        body = {"prompt": prompt}
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}; choose from {', '.join(ENDPOINT_PATHS)}")
    body.update({"max_tokens": turn.output_len, "temperature": sampling.temperature,
                 "stream": True, "stream_options": {"include_usage": True}})
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


def _finish_reason(value: Any) -> str | None:
    """OpenAI and attnserve: a string; SGLang: {"type": "length", ...}."""
    if isinstance(value, dict):
        return None if value.get("type") is None else str(value["type"])
    return None if value is None else str(value)


class StreamParser:
    """Reads one response's decoded ``data:`` objects in order (SGLang's running text needs
    the text seen so far)."""

    def __init__(self, endpoint: str) -> None:
        if endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        self.endpoint = endpoint
        self.text_so_far = ""
        self.tokens_so_far = 0

    def parse(self, data: dict[str, Any]) -> ChunkInfo:
        info = ChunkInfo(error=_error_text(data))
        if info.error is not None:
            return info
        if "choices" in data or "usage" in data:
            self._openai(data, info)
        elif "meta_info" in data:
            self._sglang(data, info)
        else:
            self._attnserve_native(data, info)
        return info

    def _openai(self, data: dict[str, Any], info: ChunkInfo) -> None:
        choices = data.get("choices") or []
        if choices:
            choice = choices[0]
            info.finish_reason = _finish_reason(choice.get("finish_reason"))
            delta = choice.get("delta")
            if isinstance(delta, dict):  # chat
                info.text = delta.get("content") or ""
                # Anything beside the role (content, reasoning, tool calls), a finish or
                # logprobs means a token came; the role alone does not.
                carried = {key for key, value in delta.items() if value} - {"role"}
                info.carries_token = bool(carried) or info.finish_reason is not None \
                    or bool(choice.get("logprobs")) or "role" not in delta
            else:
                info.text = choice.get("text") or ""
                info.carries_token = True  # empty text too: a special token, held-back bytes
        usage = data.get("usage") or {}
        info.prompt_tokens = usage.get("prompt_tokens")
        info.completion_tokens = usage.get("completion_tokens")

    def _sglang(self, data: dict[str, Any], info: ChunkInfo) -> None:
        meta = data.get("meta_info") or {}
        text = data.get("text") or ""
        count = meta.get("completion_tokens")
        ids = data.get("output_ids")
        pieces = isinstance(ids, list) and isinstance(count, int) and len(ids) < count
        if not pieces and text.startswith(self.text_so_far):
            info.text = text[len(self.text_so_far):]
            self.text_so_far = text
        else:
            info.text = text
            self.text_so_far += text
        if isinstance(count, int):
            info.num_tokens = count - self.tokens_so_far
            self.tokens_so_far = count
            info.carries_token = info.num_tokens > 0
        else:
            info.carries_token = bool(info.text)
        info.completion_tokens = count
        info.prompt_tokens = meta.get("prompt_tokens")
        info.finish_reason = _finish_reason(meta.get("finish_reason"))

    def _attnserve_native(self, data: dict[str, Any], info: ChunkInfo) -> None:
        info.text = data.get("text") or ""
        ids = data.get("token_ids")
        count = data.get("completion_tokens")
        if isinstance(ids, list):
            info.num_tokens = len(ids)
        elif isinstance(count, int):
            info.num_tokens = count - self.tokens_so_far
        if isinstance(count, int):
            self.tokens_so_far = count
        info.carries_token = bool(info.num_tokens) or bool(info.text)
        info.completion_tokens = count
        info.prompt_tokens = data.get("prompt_tokens")
        info.finish_reason = _finish_reason(data.get("finish_reason"))
