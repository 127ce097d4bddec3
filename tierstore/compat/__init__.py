"""The original request's names (``HierarchicalCacheManager``, the Qwen3-VL adapter, ...), built on the store."""
