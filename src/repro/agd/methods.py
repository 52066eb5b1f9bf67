"""The sampling methods AGD compares, built the same way for evaluation,
figures and the throughput benchmark.

    none          the base, conditional, no guidance          1 NFE per step
    cfg           the base with classifier-free guidance      2 NFEs per step
    agd           base + adapters trained on CFG trajectories 1 NFE per step
    agd_standard  base + adapters trained on standard ones    1 NFE per step
    agd_native    adapters trained on THIS checkpoint's CFG trajectories (the
                  transfer claim's reference on a derived checkpoint)  1 NFE per step
    gd            the whole model distilled (Meng et al.)     1 NFE per step
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from repro.agd.model import AdaptedDiT, load_adapters
from repro.core.diffusion import (
    ClassifierFreeGuidance,
    DistilledGuidance,
    DiTDenoiser,
    NoGuidance,
)
from repro.core.errors import ReproInputError
from repro.core.modelio import load_dit, null_label

GUIDED = ("cfg", "agd", "agd_standard", "agd_native", "gd")
ADAPTER_METHODS = ("agd", "agd_standard", "agd_native")
# The adapter_type of a method that has no adapters (none, cfg, real).
NO_ADAPTER = "-"


@dataclass
class Method:
    name: str
    denoiser: torch.nn.Module
    null: int
    trainable_params: int
    base_params: int
    config: object  # the DiT's config: image shape and number of classes
    adapter_type: str = NO_ADAPTER  # the kind of its w-conditioned adapters

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.sample_size, self.config.sample_size)

    @property
    def num_classes(self) -> int:
        return self.config.num_embeds_ada_norm

    def guidance(self, scale: float):
        """The guidance strategy of this method at scale w."""
        if self.name == "none":
            return NoGuidance()
        if self.name == "cfg":
            return ClassifierFreeGuidance(scale, self.null)
        return DistilledGuidance(scale)


def load_method(
    name: str,
    checkpoint: str | Path,
    adapters: str | Path | None = None,
    gd: str | Path | None = None,
    device: torch.device | None = None,
) -> Method:
    """Load `name` on the given checkpoint (a diffusers DiT directory), on `device`
    (default: where it was loaded)."""
    method = _load_method(name, checkpoint, adapters, gd)
    if device is not None:
        method.denoiser.to(device)
    return method


def _load_method(name, checkpoint, adapters, gd) -> Method:
    if name in ADAPTER_METHODS:
        if adapters is None:
            raise ReproInputError(f"method {name} needs --adapters")
        return _adapted(name, load_dit(checkpoint), load_adapters(adapters))
    if name == "gd":
        if gd is None:
            raise ReproInputError("method gd needs --gd (the distilled model directory)")
        from repro.agd.gd import GD_ADAPTERS

        gd = Path(gd)
        return _adapted(
            name, load_dit(gd / "transformer"), load_adapters(gd / GD_ADAPTERS), train_base=True
        )
    if name in ("none", "cfg"):
        base = load_dit(checkpoint).eval()
        n = sum(p.numel() for p in base.parameters())
        return Method(name, DiTDenoiser(base).eval(), null_label(base), 0, n, base.config)
    raise ReproInputError(f"agd.eval.methods: unknown method {name!r}")


def _adapted(name: str, base, adapters, train_base: bool = False) -> Method:
    """A method that samples with base + adapters (train_base: the whole model counts)."""
    model = AdaptedDiT(base.eval(), adapters, train_base=train_base).eval()
    counts = model.parameter_counts()
    return Method(
        name,
        model,
        null_label(base),
        counts["trainable"],
        counts["base"],
        base.config,
        adapters.config["kind"],
    )


def load_decoder(
    vae: str | None,
    local_files_only: bool = True,
    cache_dir: str | None = None,
    device: torch.device | None = None,
):
    """Latents -> images in [-1, 1] through a diffusers AutoencoderKL, or None.

    Paper scale: DiT-XL/2 samples 4x32x32 latents of the SD VAE (`agd.base.vae`),
    read from the hub cache `cache_dir` (filled by the hub_fetch rule); tiny
    scale samples pixels and needs no decoder. The VAE runs on `device` (default:
    where it was loaded); the images come back on the latents' device.
    """
    if not vae:
        return None
    from diffusers import AutoencoderKL

    try:
        model = AutoencoderKL.from_pretrained(
            vae, local_files_only=local_files_only, cache_dir=cache_dir
        ).eval()
    except (OSError, ValueError) as err:
        raise ReproInputError(f"agd.base.vae: cannot load the VAE {vae!r} ({err})") from err
    if device is not None:
        model.to(device)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        scaled = latents.to(model.device) / model.config.scaling_factor
        return model.decode(scaled).sample.clamp(-1, 1).to(latents.device)

    return decode
