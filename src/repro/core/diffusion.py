"""One DDPM/DDIM sampler with pluggable guidance, shared by the diffusion papers.

A *denoiser* is any callable `denoiser(x, t, labels, w) -> out` with
x: [B,C,H,W] float, t: [B] long, labels: [B] long and w: [B] float or None
(the guidance scale, only for guidance-distilled models). `out` is eps [B,C,H,W],
or eps followed by C variance channels [B,2C,H,W] for a model that learns its
variance (DiT-XL/2); `eps_of(out, x)` takes the eps part. A *guidance* strategy
turns a denoiser into the output that the scheduler steps with (guidance acts on
eps; the variance channels come from the conditional prediction, as in DiT), and
says how many network evaluations (NFEs) that costs per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from repro.core.distributed import STEP_STRIDE
from repro.core.errors import ReproInputError

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Keys of a config section that scheduler_from_params reads (all optional).
SCHEDULER_PARAM_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "clip_sample",
    "timestep_spacing",
    "variance_type",
)
# DDPM variance: fixed (from the betas) or learned by the model (DiT-XL/2's 2C outputs).
LEARNED_VARIANCE = ("learned", "learned_range")


def eps_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The eps channels of a denoiser's output (drops learned-variance channels, if any)."""
    return out[:, : x.shape[1]]


def make_scheduler(
    kind: str = "ddim",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    **kw,
) -> DDPMScheduler | DDIMScheduler:
    """A diffusers DDPM or DDIM scheduler predicting epsilon, without clipping by default.

    Extra keywords (beta_start, beta_end, clip_sample, timestep_spacing, ...) go to
    the scheduler. DDIM uses set_alpha_to_one=False: the last step lands on
    alphas_cumprod[0], as in DiT's sampler.
    """
    if kind not in SCHEDULERS:
        raise ReproInputError(f"sampler: unknown sampler {kind!r}; allowed: {sorted(SCHEDULERS)}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ReproInputError(
            f"beta_schedule: unknown schedule {beta_schedule!r}; allowed: {list(BETA_SCHEDULES)}"
        )
    config = {
        "num_train_timesteps": int(num_train_timesteps),
        "beta_schedule": beta_schedule,
        "prediction_type": "epsilon",
        "clip_sample": False,
    }
    if kind == "ddim":
        config["set_alpha_to_one"] = False
        if kw.get("variance_type", "fixed_small") != "fixed_small":
            raise ReproInputError(
                f"sampler.variance_type={kw['variance_type']!r} needs kind 'ddpm' "
                "(DDIM has no variance to learn)"
            )
        kw.pop("variance_type", None)
    config.update(kw)
    return SCHEDULERS[kind](**config)


def scheduler_from_params(params: Mapping) -> DDPMScheduler | DDIMScheduler:
    """make_scheduler from the config's sampler section: `kind` plus any of SCHEDULER_PARAM_KEYS.

    `kind` is required: a silent default would hide a typo in the config. Other keys of
    the section (such as the number of sampling `steps`) are ignored here.
    """
    if "kind" not in params:
        raise ReproInputError(
            f"sampler.kind: missing (one of {sorted(SCHEDULERS)}); got keys {sorted(params)}"
        )
    kw = {k: params[k] for k in SCHEDULER_PARAM_KEYS if k in params}
    steps = kw.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ReproInputError(f"num_train_timesteps: expected a positive integer, got {steps!r}")
    return make_scheduler(params["kind"], **kw)


def q_sample(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward noising x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return scheduler.add_noise(x0, noise, t)


def epsilon_loss(
    denoiser,
    scheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    p_uncond: float = 0.0,
    null_label: int | None = None,
) -> torch.Tensor:
    """The DDPM training loss E_t,eps ||eps - eps_theta(x_t, t, y)||^2, t ~ U{0..T-1}.

    If p_uncond > 0, labels are replaced by `null_label` with that probability
    (classifier-free guidance training), drawn from `generator` so it is seeded.
    """
    b = x0.shape[0]
    device = generator.device
    t = torch.randint(
        0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=device
    )
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    t, noise = t.to(x0.device), noise.to(x0.device)
    if p_uncond > 0:
        if null_label is None:
            raise ValueError("epsilon_loss: p_uncond > 0 needs a null_label")
        drop = torch.rand(b, generator=generator, device=device).to(x0.device) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    x_t = q_sample(scheduler, x0, noise, t)
    return F.mse_loss(eps_of(denoiser(x_t, t, labels, None), x0), noise)


# ----------------------------------------------------------------------------- guidance


class NoGuidance:
    """The plain conditional (or, with null labels, unconditional) model: 1 NFE."""

    nfe_per_step = 1

    def __call__(self, denoiser, x, t, labels):
        return denoiser(x, t, labels, None)


class ClassifierFreeGuidance:
    """eps_u + w (eps_c - eps_u), both halves from ONE batched forward: 2 NFEs.

    `scale` is a float or a per-sample tensor [B]; `null_label` is the model's
    unconditional class index.
    """

    nfe_per_step = 2

    def __init__(self, scale: float | torch.Tensor, null_label: int):
        self.scale = scale
        self.null_label = int(null_label)

    def __call__(self, denoiser, x, t, labels):
        null = torch.full_like(labels, self.null_label)
        out = denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), None)
        out_c, out_u = out.chunk(2)
        eps_c, eps_u = eps_of(out_c, x), eps_of(out_u, x)
        guided = eps_u + _per_sample(self.scale, x) * (eps_c - eps_u)
        # A learned variance is taken from the conditional prediction (DiT's sampler).
        return torch.cat([guided, out_c[:, x.shape[1] :]], dim=1)


class DistilledGuidance:
    """A guidance-distilled model that takes w as an input: 1 NFE."""

    nfe_per_step = 1

    def __init__(self, scale: float | torch.Tensor):
        self.scale = scale

    def __call__(self, denoiser, x, t, labels):
        w = torch.as_tensor(self.scale, dtype=torch.float32, device=x.device)
        return denoiser(x, t, labels, w.expand(x.shape[0]) if w.ndim == 0 else w)


def _per_sample(scale, x: torch.Tensor):
    """A float stays a float; a [B] tensor becomes [B,1,1,1] to broadcast over x."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return float(scale)


# ----------------------------------------------------------------------------- sampling


# Sampling draws from its own streams, offset within a seed's block of STEP_STRIDE
# seeds: training steps use offsets [0, SAMPLING_STREAM_STRIDE) (steps below 100k),
# so no sampled noise repeats a training step's, and evaluation noise is never the
# noise the training trajectories started from.
SAMPLING_STREAM_STRIDE = 100_000
SAMPLING_STREAMS = {"trajectories": 1, "eval": 2, "figures": 3}


def sample_generator(seed: int, index: int, stream: str = "eval") -> torch.Generator:
    """The CPU generator of sampling batch `index` of a run seeded `seed`, in `stream`
    (one of SAMPLING_STREAMS: trajectories, eval, figures).

    Unlike a training step's (repro.core.distributed.step_generator) it is the same
    in every process: batch `index` gets the same noise however the batches are shared out.
    """
    if stream not in SAMPLING_STREAMS:
        raise ValueError(f"stream {stream!r} is not one of {sorted(SAMPLING_STREAMS)}")
    if not 0 <= int(index) < SAMPLING_STREAM_STRIDE:
        raise ValueError(f"sampling batch index {index} outside [0, {SAMPLING_STREAM_STRIDE})")
    offset = SAMPLING_STREAMS[stream] * SAMPLING_STREAM_STRIDE + int(index)
    return torch.Generator().manual_seed(int(seed) * STEP_STRIDE + offset)


def module_device(module, default: torch.device) -> torch.device:
    """Where `module`'s parameters live; `default` for a callable that has none."""
    parameters = module.parameters() if isinstance(module, nn.Module) else iter(())
    first = next(parameters, None)
    return default if first is None else first.device


@dataclass
class SampleResult:
    images: torch.Tensor  # [B,C,H,W]
    nfe_per_image: int  # steps * guidance.nfe_per_step
    trajectory: dict | None = None  # {"x_t": [S,B,C,H,W], "t": [S], "eps": [S,B,C,H,W]}


@torch.no_grad()
def sample(
    denoiser,
    scheduler,
    *,
    labels: torch.Tensor,
    shape: tuple[int, int, int],
    steps: int,
    guidance,
    generator: torch.Generator,
    record: bool = False,
    progress: bool = False,
    eta: float = 0.0,
    clip: bool = False,
) -> SampleResult:
    """Run the reverse process from seeded noise for `steps` scheduler steps.

    With record=True the trajectory holds, for each step, the input x_t, the
    timestep and the guided eps the scheduler stepped with (the training data of
    trajectory-based guidance distillation). `eta` applies to DDIM only (DDPM is
    always stochastic); the DDPM/DDIM noise also comes from `generator`.

    The sampler runs where the denoiser's parameters are; the images (and the
    trajectory) come back on the device of `labels`, so a caller on the CPU never
    handles GPU tensors.
    """
    b, home = labels.shape[0], labels.device
    device = module_device(denoiser, home)
    labels = labels.to(device)
    learned = getattr(scheduler.config, "variance_type", None) in LEARNED_VARIANCE
    x = torch.randn((b, *shape), generator=generator, device=generator.device).to(device)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    step_kw = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    xs, ts, epss = [], [], []
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=None if progress else True):
        t_batch = t.to(device=device, dtype=torch.long).expand(b)
        out = guidance(denoiser, x, t_batch, labels)
        if learned and out.shape[1] != 2 * x.shape[1]:
            raise ReproInputError(
                f"sampler.variance_type={scheduler.config.variance_type!r}: the model predicts "
                f"{out.shape[1]} channels for {x.shape[1]}-channel images, no variance; "
                "use variance_type 'fixed_small'"
            )
        eps = eps_of(out, x)
        if record:
            xs.append(x.to(home))
            ts.append(int(t))
            epss.append(eps.to(home))
        x = scheduler.step(out if learned else eps, t, x, generator=generator, **step_kw)
        x = x.prev_sample
    trajectory = None
    if record:
        trajectory = {
            "x_t": torch.stack(xs),
            "t": torch.tensor(ts, dtype=torch.long),
            "eps": torch.stack(epss),
        }
    images = (x.clamp(-1, 1) if clip else x).to(home)
    return SampleResult(images, steps * guidance.nfe_per_step, trajectory)


class DiTDenoiser(nn.Module):
    """The denoiser protocol for a diffusers DiTTransformer2DModel.

    DiT-XL/2 learns the variance too: its 2C output channels are returned whole
    (eps, then variance); `eps_of` takes the eps part.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, labels, w=None):
        if w is not None:
            raise ValueError("DiTDenoiser: a plain DiT takes no guidance scale w (use AdaptedDiT)")
        return self.model(x, timestep=t, class_labels=labels).sample


# ----------------------------------------------------------------------------- training


def train_denoiser(
    model, params: dict, images: torch.Tensor, labels: torch.Tensor, checkpoint_dir, desc: str
):
    """Train a DiT on (images, labels) with the epsilon loss; returns (model, fit summary).

    params: label_dropout, sampler (scheduler_from_params), seed, batch_size and the
    optimiser settings (repro.core.training.optimiser_settings). AGD trains its base
    with it from scratch and derives a fine-tuned checkpoint; SLA's image experiment
    pre-trains and fine-tunes its DiT.
    The model trains where it is; each step's batch is drawn on the CPU (a pure
    function of seed, step and rank) and moved there.
    """
    from repro.core.distributed import local_batch_size, step_generator
    from repro.core.modelio import null_label, set_label_dropout
    from repro.core.training import fit, optimiser_settings

    # CFG needs the model to learn the unconditional (null-class) prediction too.
    # diffusers drops labels inside every block with the global RNG, independently
    # per block; one seeded mask per sample, drawn in the loss, is the textbook form.
    set_label_dropout(model, 0.0)
    model.train()
    denoiser = DiTDenoiser(model)
    null, p_uncond = null_label(model), params["label_dropout"]
    scheduler = scheduler_from_params(params["sampler"])
    seed, batch_size = params["seed"], local_batch_size(params["batch_size"])
    device = model.device
    torch.manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x0, y = images[idx].to(device), labels[idx].to(device)
        return epsilon_loss(denoiser, scheduler, x0, y, gen, p_uncond=p_uncond, null_label=null)

    summary = fit(
        modules={"model": model},
        parameters=list(model.parameters()),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        **optimiser_settings(params),
        desc=desc,
    )
    model.eval()
    return model, summary
