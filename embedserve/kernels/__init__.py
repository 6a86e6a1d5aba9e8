"""Triton kernels for the CUDA path, each beside a plain-torch reference of the same signature.

Empty until the GPU-path issue: the CPU path needs none of them.
"""
