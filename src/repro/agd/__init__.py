"""AGD (arXiv 2503.07274): adapter guidance distillation of classifier-free guidance."""
