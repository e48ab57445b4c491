"""KV-cache layouts, the page pool, the page allocator and the radix prefix cache.

This package's __init__ stays free of torch so that `scheduler/` (pure Python) can import
the allocator and the prefix cache. Import `kvcache.pool` explicitly for the tensors.
"""

from kvcache.layout import LAYOUT_NAMES, KVLayout, page_size_for

__all__ = ["KVLayout", "LAYOUT_NAMES", "page_size_for"]
