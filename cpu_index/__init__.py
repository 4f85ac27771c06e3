"""Host-side selection index (numba): scoring host keys with the block-mean query, per-page
aggregation, top-k and set differences against the GPU cache. Built with the selection issue."""
