"""The HTTP layer: a Starlette app on uvicorn serving the OpenAI-compatible and native APIs,
/health and /metrics. A client of the engine's public interface (server/engine/__init__.py)
and of nothing else in the engine; `app.build_app` wires the two together."""
