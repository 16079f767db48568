"""fuselm.kernels: Triton kernels, one op family per file (norm, attention, decode, sampling).

Reach them through `fuselm.ops` with backend="triton"; importing this package
does not import triton.
"""
