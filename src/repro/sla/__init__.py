"""SLA (arXiv 2509.24006): sparse-linear attention for diffusion transformers."""
