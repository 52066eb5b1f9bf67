"""DataDream: few-shot guided dataset generation (ECCV 2024), at every scale."""
