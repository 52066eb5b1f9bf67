"""Shared machinery for every paper package: data, diffusion, metrics, tracking,
checkpoints and results. A paper package imports from here, never from another
paper package."""
