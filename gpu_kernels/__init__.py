"""Triton kernels, each with a plain-torch reference beside it: paged attention (exact and sparse,
with block-mean page scores), the merge of attention states, page gather and token writes through
UVA, compact (int4/int8) key quantization and scan, and the fused elementwise work of a decoder
layer (RMSNorm with the residual add, q/k-norm + RoPE, SiLU x up)."""
