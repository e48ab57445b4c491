"""attnserve's server in two halves: `server.engine` (requests to tokens, no HTTP) and
`server.api` (the HTTP layer, a client of the engine's public interface). `cli.py` is the
composition root that wires them together for `attnserve` and `python -m server`."""
