"""HTTP-server flags of `attnserve serve` (the engine's flags are in server/engine/args.py).

Defaults come from ServerSettings (server/api/endpoint.py)."""

from __future__ import annotations

import argparse

from server.api.endpoint import ServerSettings

D = ServerSettings  # every flag's default is its field's default


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=int, default=8000, help="port to bind (0 = any free port)")
    g.add_argument("--api-key", default=D.api_key,
                   help="require 'Authorization: Bearer KEY' on the API (/health, /metrics, "
                        "/openapi.json, /server_info and /model_info stay open); must not be "
                        "empty (default: no key)")
    g.add_argument("--allowed-origins", default=None,
                   help="comma-separated browser origins allowed to call the API cross-site "
                        "(CORS), or '*'; default: none (no CORS headers, browsers block "
                        "cross-site calls)")
    g.add_argument("--max-queued-requests", type=int, default=D.max_queued_requests,
                   help="requests still waiting for their first token beyond which new ones get "
                        "503 with Retry-After (default %(default)s)")
    g.add_argument("--max-request-bytes", type=int, default=D.max_request_bytes,
                   help="largest accepted request body in bytes (default %(default)s; 413 beyond)")
    g.add_argument("--max-connections", type=int, default=D.max_connections,
                   help="open HTTP connections at most (default %(default)s); at the cap the "
                        "oldest idle one is closed to make room, and if none is idle a new "
                        "connection gets 503; lowered at start to fit the file-descriptor limit")
    g.add_argument("--header-timeout", type=float, default=D.header_timeout,
                   help="seconds a client has to send the request line and headers "
                        "(default %(default)s); 408 and close beyond")
    g.add_argument("--body-timeout", type=float, default=D.body_timeout,
                   help="seconds a client has to send the request body once the headers are in "
                        "(default %(default)s); 408 and close beyond")
    g.add_argument("--keep-alive-timeout", type=float, default=D.keep_alive_timeout,
                   help="seconds an idle keep-alive connection stays open between requests "
                        "(default %(default)s)")
    g.add_argument("--shutdown-timeout", type=float, default=D.shutdown_timeout,
                   help="seconds running requests may take to finish after SIGTERM or SIGINT "
                        "(default %(default)s); a second signal ends them at once and exits "
                        "with 128 + the signal number")
    # Also accepted after `serve` (vLLM's spelling); SUPPRESS keeps the top-level value
    # when it is not given here.
    g.add_argument("--log-level", default=argparse.SUPPRESS,
                   choices=["debug", "info", "warning", "error"], help="logging level")
    g.add_argument("--replica-name", default=D.replica_name,
                   help="this server's name behind a router: a constant `replica` label on "
                        "every metric and in GET /server_info (default: no label)")
    g.add_argument("--leave-pool-delay", type=float, default=D.leave_pool_delay,
                   help="seconds after SIGTERM during which /health answers 503 (draining) "
                        "while requests are still served, before the drain starts: time for "
                        "a router's health check to take this worker out of its pool "
                        "(default %(default)s)")
    g.add_argument("--latency-buckets", default=None,
                   help="comma-separated latency histogram buckets in seconds (default starts at "
                        "0.5 ms)")
