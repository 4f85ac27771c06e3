"""KV offloading core, the one transfer path the runtime runs: the pinned host store, the GPU page
cache and its fetch (a selection diffed against the cache, the misses gathered on a side stream),
the compact key copy selection scans, the streams and the index uploads."""

from .compact_keys import CompactKeyIndex
from .host_store import HostKVStore, TransferFault
from .page_directory import Assignment, PageDirectory
from .page_fetcher import DEFAULT_FETCH_PROGRAMS, PageFetcher
from .streams import Streams, make_streams
from .uploads import upload, upload_into

__all__ = ["Assignment", "CompactKeyIndex", "DEFAULT_FETCH_PROGRAMS", "HostKVStore", "PageDirectory", "PageFetcher",
           "Streams", "TransferFault", "make_streams", "upload", "upload_into"]
