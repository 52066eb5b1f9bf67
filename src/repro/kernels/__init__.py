"""Fused attention kernels (Triton on CUDA) with PyTorch references beside them."""
