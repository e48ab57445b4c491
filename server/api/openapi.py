"""GET /openapi.json: the OpenAPI 3.1 document, built from the pydantic models in protocol.py.

The same classes validate the requests, so the document cannot drift from the server.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from server.api.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    EngineStatsResponse,
    ErrorResponse,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelList,
)

_REQUEST_MODELS: list[type[BaseModel]] = [CompletionRequest, ChatCompletionRequest, GenerateRequest]
_RESPONSE_MODELS: list[type[BaseModel]] = [
    CompletionResponse, ChatCompletionResponse, GenerateResponse, ModelList, HealthResponse,
    ErrorResponse, EngineStatsResponse, CompletionChunk, ChatCompletionChunk, GenerateChunk,
]
_CHUNK_OF = {CompletionResponse: CompletionChunk, ChatCompletionResponse: ChatCompletionChunk,
             GenerateResponse: GenerateChunk}
_ERROR_DESCRIPTIONS = {
    "400": "invalid JSON (or nested deeper than 32 levels), wrong types, out-of-range values, "
           "or a prompt that cannot fit",
    "401": "missing or wrong API key",
    "404": "unknown model",
    "408": "the request headers or body did not arrive in time",
    "413": "request body over the size limit",
    "415": "the body is not sent as application/json",
    "500": "internal error (this request only)",
    "503": "starting, draining, shutting down, broken, the queue is full or the connection "
           "limit reached (see Retry-After)",
}


def build_openapi(version: str, with_auth: bool) -> dict[str, Any]:
    pairs: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((m, "validation") for m in _REQUEST_MODELS),
        *((m, "serialization") for m in _RESPONSE_MODELS),
    ]
    refs, top = models_json_schema(pairs, ref_template="#/components/schemas/{model}")

    def ref(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return refs[(model, mode)]

    def json_content(model: type[BaseModel]) -> dict[str, Any]:
        return {"application/json": {"schema": ref(model, "serialization")}}

    def errors(*codes: str) -> dict[str, Any]:
        return {c: {"description": _ERROR_DESCRIPTIONS[c], "content": json_content(ErrorResponse)}
                for c in codes}

    def sse_content(chunk: type[BaseModel]) -> dict[str, Any]:
        # Before OpenAPI 3.2 `schema` describes each event; its data is a JSON chunk (or an
        # error body), or the final [DONE].
        json_data = {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"anyOf": [ref(chunk, "serialization"),
                                                 ref(ErrorResponse, "serialization")]}}
        event = {"type": "object", "required": ["data"],
                 "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]},
                                "event": {"type": "string"}}}
        return {"text/event-stream": {"schema": event}}

    security = [{"bearer": []}] if with_auth else []

    def generation_op(summary: str, request: type[BaseModel],
                      response: type[BaseModel]) -> dict[str, Any]:
        return {"post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": ref(request, "validation")}}},
            "responses": {
                "200": {"description": "the result, or an SSE stream when stream is true",
                        "content": {**json_content(response),
                                    **sse_content(_CHUNK_OF[response])}},
                **errors("400", "401", "404", "408", "413", "415", "500", "503"),
            },
            "security": security,
        }}

    paths: dict[str, Any] = {
        "/v1/completions": generation_op("Text completion (OpenAI)", CompletionRequest,
                                         CompletionResponse),
        "/v1/chat/completions": generation_op("Chat completion (OpenAI)", ChatCompletionRequest,
                                              ChatCompletionResponse),
        "/generate": generation_op("Native generation: token ids and timing", GenerateRequest,
                                   GenerateResponse),
        "/v1/models": {"get": {
            "summary": "The served model",
            "responses": {"200": {"description": "the model list",
                                  "content": json_content(ModelList)},
                          **errors("401", "503")},
            "security": security,
        }},
        "/v1/engine/stats": {"get": {
            "summary": "Engine statistics (scheduler and KV pages)",
            "responses": {"200": {"description": "statistics",
                                  "content": json_content(EngineStatsResponse)},
                          **errors("401")},
            "security": security,
        }},
        "/health": {"get": {
            "summary": "Liveness and readiness",
            "responses": {"200": {"description": "serving",
                                  "content": json_content(HealthResponse)},
                          **errors("503")},
        }},
        **{path: {"get": {
            "summary": summary,
            "responses": {"200": {"description": "a JSON object (docs/replicas.md)",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}},
                          **errors("503")},
        }} for path, summary in (
            ("/server_info", "The worker as a router registers it: model, limits, replica"),
            ("/model_info", "The served model as a router registers it"))},
        "/flush_cache": {"post": {
            "summary": "Empty the prefix cache (SGLang's name for /reset_prefix_cache)",
            "responses": {"200": {"description": "success and the evicted pages",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}},
                          **errors("401", "503")},
            "security": security,
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "attnserve", "version": version,
                 "description": "OpenAI-compatible and native LLM inference API"},
        "paths": paths,
        "components": {"schemas": top.get("$defs", {})},
    }
    if with_auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc
