"""What a cache-aware router asks of a worker besides generation (docs/replicas.md).

SGLang's router registers a worker by reading `GET /server_info` and `GET /model_info`
(`/get_server_info` and `/get_model_info` in its older releases and in SGLang itself): the
model id it routes by comes from `served_model_name`. It empties every worker's prefix
cache with `POST /flush_cache`, which here is `/reset_prefix_cache` under SGLang's name.
Both info endpoints answer 503 until the engine has loaded (the router retries), and
publish only what this engine really is: there is no data parallelism inside a worker
(`dp_size` 1), and the worker generates text (`is_generation`).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.endpoint import AppContext, api_endpoint


def _model_fields(ctx: AppContext) -> dict[str, Any]:
    core = ctx.ready_core()
    mc = core.loaded.config
    return {
        "served_model_name": core.model_name,
        # Left out on purpose: the router loads a tokenizer from model_path/tokenizer_path
        # (a Hugging Face download for a Hub id) that its HTTP routing never uses.
        "model_path": None,
        "tokenizer_path": None,
        "is_generation": True,
        "max_context_length": core.max_model_len,
        "max_req_input_len": core.max_model_len - 1,
        "vocab_size": mc.vocab_size,
        "eos_token_ids": sorted(core.tokenizer.eos_token_ids),
        "bos_token_id": core.tokenizer.bos_token_id,
        "supports_vision": False,
        "preferred_sampling_params": None,
        "weight_version": "default",
    }


@api_endpoint
async def model_info(request: Request, ctx: AppContext) -> Response:
    return JSONResponse(_model_fields(ctx))


@api_endpoint
async def server_info(request: Request, ctx: AppContext) -> Response:
    """The model fields, the engine's effective configuration, the replica name and the
    load the engine has now."""
    fields = _model_fields(ctx)
    core = ctx.ready_core()
    config = {k: v for k, v in core.effective_config().items()
              if isinstance(v, int | float | str | bool) or v is None}
    return JSONResponse({
        **fields,
        "engine": "attnserve",
        "dp_size": 1,
        "tp_size": 1,
        "page_size": core.layout.page_size,
        "max_total_num_tokens": core.pool.num_tokens,
        "max_running_requests": core.config.max_num_seqs,
        "replica_name": ctx.settings.replica_name,
        "num_active_requests": ctx.engine.num_active,
        "num_queued_requests": ctx.engine.num_queued,
        "engine_config": config,
    })
