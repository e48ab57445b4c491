"""`attnserve router`: attnserve replicas behind SGLang's cache-aware router (docs/replicas.md)."""
