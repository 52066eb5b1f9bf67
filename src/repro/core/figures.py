"""What every paper's figures share: how a figure is written, how an empty panel looks.

The papers' plots modules (repro.<paper>.plots) draw; this module writes. Importing it
imports matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repro.core.io import atomic_write  # noqa: E402

DPI = 150


def save_figure(fig, path) -> None:
    """Write `fig` as a PNG (150 dpi, tight) atomically: a reader never sees half a
    file. Then close it."""
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)


def no_data(ax, text: str = "no rows in the table") -> None:
    """An empty panel that says why, rather than a blank one."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def upscale(image, scale: int = 4):
    """uint8 [3, H, W] -> [H * scale, W * scale, 3]: each pixel a scale x scale block
    (nearest neighbour: tiny frames stay sharp in a figure)."""
    import numpy as np

    return np.asarray(image).transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)


def bare_axes(ax) -> None:
    """No ticks, no frame: an axes that only shows an image."""
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
