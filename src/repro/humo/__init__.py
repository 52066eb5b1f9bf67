"""HuMo: human-centric video generation with text, a reference image and audio (arXiv 2509.08519)."""
