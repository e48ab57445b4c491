"""Built-in backends register themselves on import."""

from attention.backends import hybrid, reference  # noqa: F401

try:  # torch peers: present in every torch >= 2.5
    from attention.backends import flex, sdpa  # noqa: F401
except ImportError:  # pragma: no cover
    pass

try:  # needs the triton package
    from attention.backends import triton_backend  # noqa: F401
except ImportError:  # pragma: no cover - CPU installs without triton
    pass
