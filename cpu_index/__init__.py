"""Host-side selection index (numba): scoring host keys with the block-mean query, per-page
aggregation, top-k and set differences against the GPU cache. Built with the selection issue."""

from .scan import (
    AGGREGATES,
    AsyncScanner,
    host_page_scores,
    host_page_scores_reference,
    host_token_scores,
    host_token_scores_reference,
    topk_pages,
    topk_pages_reference,
    warmup,
)

__all__ = [
    "AGGREGATES",
    "AsyncScanner",
    "host_page_scores",
    "host_page_scores_reference",
    "host_token_scores",
    "host_token_scores_reference",
    "topk_pages",
    "topk_pages_reference",
    "warmup",
]
