"""The `herald` mode (HERALD's offloading, extended): `mode` drives a block's passes, `sources`
scores pages, `lookahead` keeps the next block's selection, `timeline` counts what moved; the page
cache and its fetch are `offload.PageFetcher`'s."""

from .mode import HeraldAttention

__all__ = ["HeraldAttention"]
