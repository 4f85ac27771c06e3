"""KV offloading core: the pinned host store, the GPU page cache and the prefetcher."""

from .host_store import HostKVStore
from .page_cache import CachePlan, GpuPageCache
from .prefetcher import Prefetcher

__all__ = ["HostKVStore", "GpuPageCache", "CachePlan", "Prefetcher"]
