"""Triton kernels, each with a plain-torch reference beside it: paged attention (exact and sparse,
with block-mean page scores), page gather and token writes through UVA."""
