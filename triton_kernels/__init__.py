"""Triton kernels for the row-space ops (installed as `egn_fast.triton_kernels`)."""
