"""The shared sampler: schedulers, noising, loss, guidance strategies, trajectories."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from repro.core.diffusion import (
    ClassifierFreeGuidance,
    DistilledGuidance,
    DiTDenoiser,
    NoGuidance,
    eps_of,
    epsilon_loss,
    make_scheduler,
    module_device,
    q_sample,
    sample,
    scheduler_from_params,
)
from repro.core.errors import ReproInputError

NUM_CLASSES = 3
NULL = NUM_CLASSES
SHAPE = (1, 4, 4)


class ToyDenoiser(nn.Module):
    """A deterministic eps model that depends on x, t, the label and (optionally) w."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = torch.randn(NUM_CLASSES + 1, *SHAPE, generator=gen)
        self.calls = []  # (batch size, labels, w) per call

    def forward(self, x, t, labels, w=None):
        self.calls.append((x.shape[0], labels.clone(), None if w is None else w.clone()))
        eps = 0.3 * x + self.table[labels] * (1 + t.float()[:, None, None, None] / 100)
        if w is not None:
            eps = eps + 0.01 * w[:, None, None, None]
        return eps


def run(guidance, kind="ddim", seed=0, labels=(0, 1, 2, 1), steps=5, **kw):
    scheduler = make_scheduler(kind, num_train_timesteps=100)
    return sample(
        ToyDenoiser(),
        scheduler,
        labels=torch.tensor(labels),
        shape=SHAPE,
        steps=steps,
        guidance=guidance,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )


def test_scheduler_kinds():
    ddim = make_scheduler("ddim")
    assert isinstance(ddim, DDIMScheduler)
    assert ddim.config.set_alpha_to_one is False and ddim.config.clip_sample is False
    assert ddim.config.prediction_type == "epsilon"
    ddpm = make_scheduler("ddpm", num_train_timesteps=50, clip_sample=True)
    assert isinstance(ddpm, DDPMScheduler)
    assert ddpm.config.num_train_timesteps == 50 and ddpm.config.clip_sample is True
    assert make_scheduler("ddpm").config.clip_sample is False

    with pytest.raises(ReproInputError, match="sampler.*ddim"):
        make_scheduler("euler")
    with pytest.raises(ReproInputError, match="beta_schedule"):
        make_scheduler("ddim", beta_schedule="cosine-ish")

    from_params = scheduler_from_params(
        {"kind": "ddpm", "num_train_timesteps": 200, "beta_end": 0.03, "steps": 25}
    )
    assert isinstance(from_params, DDPMScheduler)
    assert from_params.config.num_train_timesteps == 200 and from_params.config.beta_end == 0.03
    assert isinstance(scheduler_from_params({"kind": "ddim"}), DDIMScheduler)
    with pytest.raises(ReproInputError, match="sampler.kind"):
        scheduler_from_params({"steps": 25})
    with pytest.raises(ReproInputError, match="sampler"):
        scheduler_from_params({"kind": "heun"})
    with pytest.raises(ReproInputError, match="num_train_timesteps"):
        scheduler_from_params({"kind": "ddim", "num_train_timesteps": "many"})


def test_q_sample_matches_closed_form():
    scheduler = make_scheduler("ddpm", num_train_timesteps=100)
    x0, noise = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    t = torch.tensor([0, 50, 99])
    x_t = q_sample(scheduler, x0, noise, t)
    assert x_t.shape == x0.shape
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_epsilon_loss_seeded_and_label_dropout():
    scheduler = make_scheduler("ddpm", num_train_timesteps=100)
    x0, labels = torch.randn(64, *SHAPE), torch.randint(0, NUM_CLASSES, (64,))
    model = ToyDenoiser()
    a = epsilon_loss(model, scheduler, x0, labels, torch.Generator().manual_seed(1))
    b = epsilon_loss(model, scheduler, x0, labels, torch.Generator().manual_seed(1))
    c = epsilon_loss(model, scheduler, x0, labels, torch.Generator().manual_seed(2))
    assert a.ndim == 0 and torch.isfinite(a) and a == b and a != c
    # A zero predictor scores E[noise^2] = 1.
    zero = epsilon_loss(
        lambda x, t, y, w: torch.zeros_like(x), scheduler, x0, labels, torch.Generator()
    )
    assert 0.8 < zero.item() < 1.2

    model.calls.clear()
    epsilon_loss(model, scheduler, x0, labels, torch.Generator(), p_uncond=1.0, null_label=NULL)
    assert (model.calls[0][1] == NULL).all()
    model.calls.clear()
    epsilon_loss(model, scheduler, x0, labels, torch.Generator(), p_uncond=0.5, null_label=NULL)
    dropped = (model.calls[0][1] == NULL).float().mean()
    assert 0.2 < dropped < 0.8


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sample_deterministic_for_a_generator(kind):
    cfg = ClassifierFreeGuidance(2.0, NULL)
    a, b, c = run(cfg, kind, seed=0), run(cfg, kind, seed=0), run(cfg, kind, seed=1)
    assert a.images.shape == (4, *SHAPE)
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)
    assert a.trajectory is None


def test_ddim_eta_uses_the_generator():
    cfg = NoGuidance()
    a, b = run(cfg, seed=0, eta=1.0), run(cfg, seed=0, eta=1.0)
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, run(cfg, seed=0, eta=0.0).images)


def test_nfe_counts():
    steps, batch = 6, 4
    for guidance, nfe in [
        (NoGuidance(), 1),
        (ClassifierFreeGuidance(3.0, NULL), 2),
        (DistilledGuidance(3.0), 1),
    ]:
        model = ToyDenoiser()
        result = sample(
            model,
            make_scheduler("ddim", num_train_timesteps=100),
            labels=torch.zeros(batch, dtype=torch.long),
            shape=SHAPE,
            steps=steps,
            guidance=guidance,
            generator=torch.Generator().manual_seed(0),
        )
        assert result.nfe_per_image == steps * nfe
        # CFG is one batched forward per step, not two calls.
        assert len(model.calls) == steps
        assert sum(n for n, _, _ in model.calls) == batch * steps * nfe


def test_cfg_limits_equal_conditional_and_unconditional():
    labels = (0, 1, 2, 1)
    for kind in ("ddim", "ddpm"):
        cond = run(NoGuidance(), kind, labels=labels).images
        uncond = run(NoGuidance(), kind, labels=(NULL,) * 4).images
        torch.testing.assert_close(run(ClassifierFreeGuidance(1.0, NULL), kind).images, cond)
        torch.testing.assert_close(run(ClassifierFreeGuidance(0.0, NULL), kind).images, uncond)
        assert not torch.allclose(run(ClassifierFreeGuidance(4.0, NULL), kind).images, cond)
        # A per-sample scale: w=1 for the first two images, w=0 for the last two.
        mixed = run(ClassifierFreeGuidance(torch.tensor([1.0, 1.0, 0.0, 0.0]), NULL), kind).images
        torch.testing.assert_close(mixed[:2], cond[:2])
        torch.testing.assert_close(mixed[2:], uncond[2:])


def test_recorded_trajectory_holds_the_guided_eps():
    steps = 5
    guidance = ClassifierFreeGuidance(torch.tensor([1.5, 2.0, 3.0, 4.0]), NULL)
    result = run(guidance, steps=steps, record=True)
    traj = result.trajectory
    assert traj["x_t"].shape == (steps, 4, *SHAPE) and traj["eps"].shape == (steps, 4, *SHAPE)
    assert traj["t"].dtype == torch.long and traj["t"].shape == (steps,)
    assert (traj["t"][:-1] > traj["t"][1:]).all()  # descending timesteps
    # The first x_t is the seeded initial noise.
    torch.testing.assert_close(
        traj["x_t"][0], torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    )

    model, labels = ToyDenoiser(), torch.tensor([0, 1, 2, 1])
    scheduler = make_scheduler("ddim", num_train_timesteps=100)
    scheduler.set_timesteps(steps)
    for s in range(steps):
        t = traj["t"][s].expand(4)
        eps = guidance(model, traj["x_t"][s], t, labels)
        torch.testing.assert_close(traj["eps"][s], eps)
        nxt = scheduler.step(eps, traj["t"][s], traj["x_t"][s]).prev_sample
        expected = traj["x_t"][s + 1] if s + 1 < steps else result.images
        torch.testing.assert_close(nxt, expected)
    # The recorded run and a plain run produce the same images.
    torch.testing.assert_close(run(guidance, steps=steps).images, result.images)


def test_distilled_guidance_passes_w():
    model = ToyDenoiser()
    x, t, labels = torch.randn(2, *SHAPE), torch.tensor([5, 5]), torch.tensor([0, 1])
    DistilledGuidance(2.5)(model, x, t, labels)
    DistilledGuidance(torch.tensor([1.0, 3.0]))(model, x, t, labels)
    assert model.calls[0][2].tolist() == [2.5, 2.5]
    assert model.calls[1][2].tolist() == [1.0, 3.0]
    NoGuidance()(model, x, t, labels)
    assert model.calls[2][2] is None


def test_clip_only_when_asked():
    big = ClassifierFreeGuidance(20.0, NULL)
    assert run(big).images.abs().max() > 1
    assert run(big, clip=True).images.abs().max() <= 1


def test_dit_denoiser_on_a_tiny_dit(tiny_dit):
    model = tiny_dit(num_embeds_ada_norm=NUM_CLASSES)
    denoiser = DiTDenoiser(model)
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 99]), torch.tensor([0, 2, NULL])
    with torch.no_grad():
        eps = denoiser(x, t, labels)
        expected = model(x, timestep=t, class_labels=labels).sample
    assert eps.shape == (3, 1, 8, 8)
    torch.testing.assert_close(eps, expected)
    with pytest.raises(ValueError, match="guidance scale"):
        denoiser(x, t, labels, torch.ones(3))

    # A learned-sigma DiT (2C outputs, like DiT-XL/2): eps then variance, eps_of takes eps.
    sigma_model = tiny_dit(num_embeds_ada_norm=NUM_CLASSES, out_channels=2)
    with torch.no_grad():
        out = DiTDenoiser(sigma_model)(x, t, labels)
        full = sigma_model(x, timestep=t, class_labels=labels).sample
    assert out.shape == (3, 2, 8, 8)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(eps_of(out, x), full[:, :1])

    result = sample(
        denoiser,
        make_scheduler("ddpm", num_train_timesteps=100),
        labels=torch.tensor([0, 1]),
        shape=(1, 8, 8),
        steps=4,
        guidance=ClassifierFreeGuidance(2.0, NULL),
        generator=torch.Generator().manual_seed(0),
        record=True,
    )
    assert result.images.shape == (2, 1, 8, 8) and torch.isfinite(result.images).all()
    assert result.nfe_per_image == 8 and result.trajectory["x_t"].shape[0] == 4


class VarianceDenoiser(ToyDenoiser):
    """ToyDenoiser's eps plus one variance channel that depends on the label (2C outputs)."""

    def __init__(self, variance: float = 0.0):
        super().__init__()
        self.variance = variance

    def forward(self, x, t, labels, w=None):
        eps = super().forward(x, t, labels, w)
        v = self.variance + 0.1 * labels.float()[:, None, None, None]
        return torch.cat([eps, v.expand_as(eps)], dim=1)


def run_learned(denoiser, variance_type, guidance=None, record=False):
    scheduler = make_scheduler("ddpm", num_train_timesteps=100, variance_type=variance_type)
    return sample(
        denoiser,
        scheduler,
        labels=torch.tensor([0, 1, 2]),
        shape=SHAPE,
        steps=5,
        guidance=guidance or NoGuidance(),
        generator=torch.Generator().manual_seed(0),
        record=record,
    )


def test_learned_variance_is_used_only_when_configured():
    fixed = [run_learned(VarianceDenoiser(v), "fixed_small").images for v in (-1.0, 1.0)]
    torch.testing.assert_close(fixed[0], fixed[1])  # variance channels ignored
    learned = [run_learned(VarianceDenoiser(v), "learned_range").images for v in (-1.0, 1.0)]
    assert not torch.allclose(learned[0], learned[1])  # ... and used
    assert learned[0].shape == (3, *SHAPE)
    # With the variance pinned to the fixed_small end of the range (v = -1), learned_range
    # steps exactly like fixed_small (diffusers interpolates log-variances in [-1, 1]).
    pinned = VarianceDenoiser(-1.0)
    pinned.forward = lambda x, t, labels, w=None, d=pinned: torch.cat(
        [ToyDenoiser.forward(d, x, t, labels, w), -torch.ones_like(x)], dim=1
    )
    torch.testing.assert_close(run_learned(pinned, "learned_range").images, fixed[0])


def test_cfg_guides_eps_and_keeps_the_conditional_variance():
    denoiser = VarianceDenoiser(0.5)
    x, t, labels = torch.randn(3, *SHAPE), torch.tensor([5, 50, 90]), torch.tensor([0, 1, 2])
    out = ClassifierFreeGuidance(3.0, NULL)(denoiser, x, t, labels)
    cond, uncond = denoiser(x, t, labels), denoiser(x, t, torch.full_like(labels, NULL))
    assert out.shape == (3, 2, *SHAPE[1:])
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])
    # Trajectories store the guided eps only (C channels).
    result = run_learned(denoiser, "learned_range", ClassifierFreeGuidance(3.0, NULL), True)
    assert result.trajectory["eps"].shape[2:] == SHAPE


def test_learned_variance_without_variance_channels_is_a_clear_error():
    with pytest.raises(ReproInputError, match="variance_type='learned_range'.*no variance"):
        run_learned(ToyDenoiser(), "learned_range")
    with pytest.raises(ReproInputError, match="variance_type.*needs kind 'ddpm'"):
        make_scheduler("ddim", variance_type="learned_range")


def test_sampler_runs_where_the_denoiser_is_and_returns_with_the_labels():
    assert module_device(nn.Linear(2, 2), torch.device("meta")) == torch.device("cpu")
    # A callable without parameters (ToyDenoiser keeps a plain tensor) runs where `labels` are.
    assert module_device(ToyDenoiser(), torch.device("meta")) == torch.device("meta")
    assert module_device(lambda *a: None, torch.device("cpu")) == torch.device("cpu")
    result = run(ClassifierFreeGuidance(2.0, NULL), record=True)
    assert result.images.device == result.trajectory["x_t"].device == torch.device("cpu")
