"""Issue 4 f: schemathesis fuzzes the API from its own /openapi.json.

Valid (positive) and invalid (negative) bodies, a bounded number of examples per operation:
no 5xx, every status documented, every JSON body conforming to the documented schema. The
server's context is 40 tokens, which bounds the work any generated request can ask for.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.api.endpoint import ServerSettings
from server.engine import EngineConfig
from tests.server.conftest import InProcessServer, inprocess_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
OPERATIONS = [
    ("/v1/completions", "POST", 12),
    ("/v1/chat/completions", "POST", 12),
    ("/generate", "POST", 12),
    ("/v1/models", "GET", 3),
    ("/health", "GET", 3),
]


@pytest.fixture(scope="module")
def server() -> Iterator[InProcessServer]:
    config = EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=2048, max_model_len=40,
                          max_num_seqs=4)
    with inprocess_server(config, ServerSettings(max_request_bytes=64 * 1024)) as s:
        yield s


@pytest.fixture(scope="module")
def schema(server: InProcessServer):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path,method,examples", OPERATIONS)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    server: InProcessServer, schema, path: str, method: str, examples: int,
    mode: GenerationMode,
):
    operation = schema[path][method]
    if mode is GenerationMode.NEGATIVE and method == "GET":
        pytest.skip("no parameters to make invalid")

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        case.call_and_validate(base_url=server.base_url, checks=CHECKS, timeout=120)

    check()
    server.wait_idle()
