"""ProbeX: learning on model weights using tree experts (CVPR 2025), at every scale."""
