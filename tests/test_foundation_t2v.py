"""The text-to-video foundation model: built tiny, trained, sampled, saved and loaded in
Wan2.1's layout; flow matching and the Euler sampler against hand computations; the
paper-scale path (a video VAE, UMT5's T5 tokenizer, the hub's UniPC scheduler config, the
hub cache) on tiny checkpoints saved here, with every socket refused; the stage through
its command line, interrupted and resumed.

The talking-faces file is faked here (random-ish uint8 clips, captions in metadata) so
that these tests do not depend on repro.foundation.faces.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.core.modelio import KIND_FILE, save_model
from repro.core.training import fit
from repro.foundation import t2v
from repro.foundation.t2v import (
    add_noise,
    build_t2v,
    euler_sample,
    flow_matching_loss,
    generate,
    load_clips,
    load_t2v,
    sample_sigmas,
    save_t2v,
    shifted_sigmas,
    velocity_target,
)

HUB_ID, COMMIT = "org/tiny-wan", "0123456789abcdef0123456789abcdef01234567"
MOTIONS = ("nodding", "shaking their head")
BACKGROUNDS = ("green", "blue")
COLOURS = {"green": (40, 200, 60), "blue": (30, 60, 210)}
FRAMES, SIZE = 3, 8

# Smaller than config.yaml's (same classes and layout): a test builds it in ~0.1 s.
PARAMS = {
    "pretrained": None,
    "subfolder": None,
    "vocab_size": 600,
    "transformer": {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 3,
        "out_channels": 3,
        "text_dim": 16,
        "freq_dim": 16,
        "ffn_dim": 32,
        "num_layers": 1,
        "rope_max_seq_len": 16,
    },
    "text_encoder": {
        "d_model": 16,
        "d_ff": 32,
        "d_kv": 8,
        "num_layers": 1,
        "num_heads": 2,
        "max_length": 12,
    },
    "shift": 3.0,
    "timesteps": {"kind": "logit_normal", "mean": 0.0, "std": 1.0},
    "caption_dropout": 0.1,
    "heldout": 8,
    "steps": 6,
    "batch_size": 4,
    "lr": 0.002,
    "weight_decay": 0.0,
    "warmup_fraction": 0.1,
    "grad_clip": 1.0,
    "checkpoint_every": 3,
    "seed": 0,
    "eval": {"steps": 2, "guidance": [1.0, 3.0], "clips": 4},
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError("network access in a test that must read local files only")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def fake_clips(n: int, seed: int = 0):
    """Clips with something to learn: a background colour and a bright 2x2 square that
    moves down (nodding) or right (shaking) one pixel a frame; the caption names both."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 30, (n, 3, FRAMES, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    captions = []
    for i in range(n):
        motion, background = MOTIONS[i % 2], BACKGROUNDS[(i // 2) % 2]
        video[i] += torch.tensor(COLOURS[background], dtype=torch.uint8).view(3, 1, 1, 1)
        y, x = (int(v) for v in torch.randint(1, 4, (2,), generator=gen))
        for f in range(FRAMES):
            dy, dx = (f, 0) if motion == "nodding" else (0, f)
            video[i, :, f, y + dy : y + dy + 2, x + dx : x + dx + 2] = 250
        captions.append(f"a person {motion} in front of a {background} wall")
    return video, captions


def write_faces(path, n: int = 32, seed: int = 0, kind: str = "talking_faces", **meta):
    video, captions = fake_clips(n, seed)
    save_tensors(path, {"video": video}, kind=kind, metadata={"captions": captions, **meta})
    return path


@pytest.fixture(scope="module")
def faces_file(tmp_path_factory):
    return write_faces(tmp_path_factory.mktemp("faces") / "train.safetensors")


@pytest.fixture(scope="module")
def captions():
    return [f"a person {m} in front of a {b} wall" for m in MOTIONS for b in BACKGROUNDS]


@pytest.fixture
def model(captions):
    return build_t2v(PARAMS, captions)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def params_of(path):
    return {"name": "t2v", "pretrained": str(path), "subfolder": None, "local_files_only": True}


def video_of(n, frames=FRAMES, size=SIZE, seed=0):
    return (
        torch.rand(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    )


# ----------------------------------------------------------------------------- build


def test_the_tiny_model_has_wans_components(model, captions):
    assert type(model.transformer).__name__ == "WanTransformer3DModel"
    assert type(model.text_encoder).__name__ == "UMT5EncoderModel"
    assert type(model.tokenizer).__name__ == "CLIPTokenizer"
    assert type(model.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert model.vae is None and model.temporal_ratio == 1 and model.spatial_ratio == 1
    assert model.latent_channels == 3 and model.shift == 3.0 and model.text_length == 12
    assert model.latent_frames(9) == 9
    # The transformer reads the text encoder's states; ids and specials agree.
    assert model.transformer.config.text_dim == model.text_encoder.config.d_model == 16
    assert model.text_encoder.config.vocab_size == len(model.tokenizer)
    assert model.text_encoder.config.pad_token_id == model.tokenizer.pad_token_id
    assert not model.transformer.training and not model.text_encoder.training
    # Seeded: the same params give the same weights, another seed others.
    again = build_t2v(PARAMS, captions)
    assert same_weights(again.transformer, model.transformer)
    assert same_weights(again.text_encoder, model.text_encoder)
    other = build_t2v({**PARAMS, "seed": 1}, captions)
    assert not same_weights(other.transformer, model.transformer)
    # Pixels in, the same shape of velocity out.
    x = video_of(2)
    with torch.no_grad():
        v = model.velocity(x, 0.5, model.encode_prompts(captions[:2]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert torch.equal(model.to_model_space(x), x) and torch.equal(model.to_video_space(x), x)
    image = x[:, :, 0]
    assert torch.equal(model.image_to_model_space(image), x[:, :, :1])


def test_prompts_are_encoded_with_their_mask_and_zeroed_past_their_length(model, captions):
    prompts = [captions[0], "a person", ""]
    hidden = model.encode_prompts(prompts)
    assert hidden.shape == (3, 12, 16) and hidden.requires_grad
    for i, prompt in enumerate(prompts):
        ids = model.tokenizer(prompt).input_ids  # <|startoftext|> ... <|endoftext|>, unpadded
        n = len(ids)
        assert (hidden[i, n:] == 0).all() and (hidden[i, :n].abs().sum(-1) > 0).all()
        # The reference: the encoder on the unpadded ids alone. The mask must make the
        # padding invisible, so the states of the prompt's tokens are the same.
        with torch.no_grad():
            alone = model.text_encoder(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(hidden[i, :n].detach(), alone, atol=1e-5, rtol=1e-5)
    assert len(model.tokenizer("").input_ids) == 2  # the dropped caption: two specials
    # Without the mask the padding would leak in: a check that the mask matters here.
    with torch.no_grad():
        tokens = model.tokenizer(["a person"], padding="max_length", max_length=12)
        unmasked = model.text_encoder(torch.tensor(tokens.input_ids)).last_hidden_state[0, :4]
    assert not torch.allclose(unmasked, hidden[1, :4].detach(), atol=1e-4)


def test_bad_build_params_are_named(captions):
    bad = [
        ({"transformer": {**PARAMS["transformer"], "depth": 3}}, r"transformer: unknown keys"),
        ({"transformer": {**PARAMS["transformer"], "in_channels": 16}}, r"in_channels: 16"),
        ({"transformer": {**PARAMS["transformer"], "text_dim": 32}}, r"text_dim: 32 differs"),
        ({"text_encoder": {**PARAMS["text_encoder"], "layers": 1}}, r"text_encoder: unknown"),
        ({"shift": 0.0}, r"foundation.t2v.shift: 0.0 must be > 0"),
        ({"vocab_size": 300}, r"vocab_size: 300 tokens are too few"),
    ]
    for change, message in bad:
        with pytest.raises(ReproInputError, match=message):
            build_t2v({**PARAMS, **change}, captions)


# ----------------------------------------------------------------------------- flow matching


def test_noising_and_the_velocity_target_by_hand():
    x0, noise = video_of(3, seed=1), video_of(3, seed=2)
    x = add_noise(x0, noise, torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(x[0], x0[0])
    torch.testing.assert_close(x[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x[2], noise[2])
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)


def test_training_sigmas_are_drawn_as_documented():
    got = sample_sigmas(5, torch.Generator().manual_seed(3), "logit_normal", mean=0.5, std=0.8)
    z = torch.randn(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, 1 / (1 + torch.exp(-(0.5 + 0.8 * z))))
    got = sample_sigmas(5, torch.Generator().manual_seed(3), "uniform")
    torch.testing.assert_close(got, torch.rand(5, generator=torch.Generator().manual_seed(3)))
    # Logit-normal: the median is sigmoid(mean); the mass sits away from 0 and 1.
    many = sample_sigmas(20000, torch.Generator().manual_seed(0), "logit_normal", mean=-1.0)
    assert abs(many.median().item() - 1 / (1 + torch.e)) < 0.01
    assert 0 < many.min() and many.max() < 1
    assert ((many < 0.05) | (many > 0.95)).float().mean() < 0.05
    with pytest.raises(ReproInputError, match=r"foundation.t2v.timesteps.kind: 'cosine'"):
        sample_sigmas(2, torch.Generator(), "cosine")


class Recorder(torch.nn.Module):
    """A stand-in transformer: answers `answer(x, timestep)`, records its inputs."""

    def __init__(self, transformer, answer):
        super().__init__()
        self.config = transformer.config
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.answer, self.calls = answer, []

    @property
    def device(self):
        return self.anchor.device

    def forward(self, x, timestep, encoder_hidden_states):
        self.calls.append((x.clone(), timestep.clone(), encoder_hidden_states.clone()))
        return type("Out", (), {"sample": self.answer(x, timestep, encoder_hidden_states)})()


def test_the_flow_matching_loss_by_hand(model):
    x0 = video_of(4, seed=5)
    prompts = ["a person nodding in front of a green wall"] * 4
    model.transformer = Recorder(model.transformer, lambda x, t, h: torch.zeros_like(x))
    loss = flow_matching_loss(model, x0, prompts, torch.Generator().manual_seed(7), mean=0.3)
    # The same draws by hand, in the documented order: the levels, then the noise.
    gen = torch.Generator().manual_seed(7)
    s = torch.sigmoid(0.3 + torch.randn(4, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    x, timestep, text = model.transformer.calls[0]
    torch.testing.assert_close(timestep, 1000 * s)
    torch.testing.assert_close(
        x, (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
    )
    torch.testing.assert_close(text, model.encode_prompts(prompts).detach())
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())
    # An oracle that knows x0 answers (x_s - x0) / s = noise - x0: loss 0.
    model.transformer = Recorder(
        model.transformer, lambda x, t, h: (x - x0) / (t / 1000).view(-1, 1, 1, 1, 1)
    )
    oracle = flow_matching_loss(model, x0, prompts, torch.Generator().manual_seed(7), mean=0.3)
    assert oracle.item() < 1e-10
    # The oracle of the other convention (x0 - noise) is far off.
    model.transformer.answer = lambda x, t, h: (x0 - x) / (t / 1000).view(-1, 1, 1, 1, 1)
    assert flow_matching_loss(model, x0, prompts, torch.Generator().manual_seed(7)).item() > 1


def test_shifted_sigmas_by_hand():
    torch.testing.assert_close(
        shifted_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64)
    )
    # shift 5, two steps: 5 * 0.5 / (1 + 4 * 0.5) = 5/6.
    torch.testing.assert_close(
        shifted_sigmas(2, 5.0), torch.tensor([1.0, 5 / 6, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(shifted_sigmas(5, 1.0), torch.linspace(1, 0, 6, dtype=torch.float64))
    # shift < 1 spends the steps at low noise: 0.5 * 0.5 / (1 - 0.5 * 0.5) = 1/3.
    assert shifted_sigmas(2, 0.5)[1].item() == pytest.approx(1 / 3)
    with pytest.raises(ReproInputError, match=r"steps: 0 must be >= 1"):
        shifted_sigmas(0, 3.0)
    with pytest.raises(ReproInputError, match=r"shift: -1.0 must be > 0"):
        shifted_sigmas(4, -1.0)


def test_euler_follows_fields_with_known_solutions():
    x0, noise = video_of(2, seed=1), video_of(2, seed=2)
    # The straight path's own velocity (x - x0) / s: Euler is exact on it, on any grid.
    levels = []

    def straight(x, s):
        levels.append(s)
        return (x - x0) / s

    out = euler_sample(straight, noise, shifted_sigmas(3, 3.0))
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    assert levels == pytest.approx([1.0, 6 / 7, 0.6])  # never called at s = 0
    # dx/ds = x from s = 1 to 0: exact x(0) = x(1) / e; Euler multiplies by (1 - ds) a
    # step: two steps 0.25, and first-order convergence to 1/e.
    grow = torch.ones(1, dtype=torch.float64)
    assert euler_sample(lambda x, s: x, grow, shifted_sigmas(2, 1.0)).item() == 0.25
    fine = euler_sample(lambda x, s: x, grow, shifted_sigmas(1000, 1.0)).item()
    coarse = euler_sample(lambda x, s: x, grow, shifted_sigmas(100, 1.0)).item()
    exact = torch.exp(torch.tensor(-1.0, dtype=torch.float64)).item()
    assert abs(fine - exact) < 2e-4 and abs(fine - exact) < abs(coarse - exact) / 5


# ----------------------------------------------------------------------------- generate


def text_shift(hidden):
    """One number per prompt from the text states: the first feature summed over tokens."""
    return hidden[:, :, 0].sum(dim=1).view(-1, 1, 1, 1, 1)


def test_cfg_is_v_u_plus_w_times_v_c_minus_v_u(model, captions):
    model.transformer = Recorder(model.transformer, lambda x, t, h: 0.1 * x + 0.05 * text_shift(h))
    prompts = captions[:3]
    with torch.no_grad():
        cond = 0.05 * text_shift(model.encode_prompts(prompts))
        uncond = 0.05 * text_shift(model.encode_prompts([""]))
        negative = 0.05 * text_shift(model.encode_prompts(["a person"]))
    # The check means something only if the prompts move the stub's output apart.
    assert (cond - uncond).abs().min() > 0.01 and (cond - negative).abs().min() > 0.01
    noise = torch.randn(3, 3, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    kwargs = {"steps": 3, "shift": 2.0, "frames": 5, "size": 4, "progress": False}
    for w, neg, base in ((3.0, "", uncond), (0.0, "", uncond), (2.5, "a person", negative)):
        got = generate(
            model,
            prompts,
            guidance=w,
            generator=torch.Generator().manual_seed(3),
            negative_prompt=neg,
            **kwargs,
        )
        # By hand: s = 1, 2/3 * 2 / (1 + 2/3), 1/3 * 2 / (1 + 1/3), 0 = 1, 0.8, 0.5, 0.
        x = noise.double()
        for s, s_next in ((1.0, 0.8), (0.8, 0.5), (0.5, 0.0)):
            v_u, v_c = 0.1 * x + base, 0.1 * x + cond
            x = x + (s_next - s) * (v_u + w * (v_c - v_u))
        torch.testing.assert_close(got, x.float().clamp(-1, 1), atol=1e-5, rtol=0)
    timesteps = [t[0].item() for _, t, _ in model.transformer.calls[-3:]]
    assert timesteps == pytest.approx([1000.0, 800.0, 500.0])
    # guidance 1 is the conditional model alone: one evaluation of the batch per step.
    model.transformer.calls.clear()
    got = generate(
        model, prompts, guidance=1.0, generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert [len(x) for x, _, _ in model.transformer.calls] == [3, 3, 3]
    # The noise is drawn up front: the batch size does not change the videos.
    one = generate(
        model,
        prompts,
        guidance=1.0,
        generator=torch.Generator().manual_seed(3),
        batch_size=1,
        **kwargs,
    )
    torch.testing.assert_close(one, got, atol=1e-6, rtol=0)
    assert generate(model, [], guidance=2.0, generator=torch.Generator(), **kwargs).shape == (
        0,
        3,
        5,
        4,
        4,
    )


def test_generate_draws_videos_of_the_asked_shape(model, captions):
    out = generate(
        model,
        captions[:2],
        steps=2,
        shift=3.0,
        guidance=2.0,
        generator=torch.Generator().manual_seed(0),
        frames=5,
        size=(4, 6),
        progress=False,
    )
    assert out.shape == (2, 3, 5, 4, 6) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


# ----------------------------------------------------------------------------- train


def test_the_loss_falls_in_a_short_training(model):
    video, prompts = fake_clips(16)
    video = video.float() / 127.5 - 1

    def held_loss():
        with torch.no_grad():
            return flow_matching_loss(
                model, video, prompts, torch.Generator().manual_seed(99)
            ).item()

    before = held_loss()
    model.transformer.train()
    model.text_encoder.train()
    summary = fit(
        modules={"transformer": model.transformer, "text_encoder": model.text_encoder},
        parameters=list(model.parameters()),
        loss_fn=lambda step: flow_matching_loss(
            model, video, prompts, torch.Generator().manual_seed(step)
        ),
        steps=40,
        lr=3e-3,
        warmup_fraction=0.1,
    )
    model.transformer.eval()
    model.text_encoder.eval()
    after = held_loss()
    assert after < 0.6 * before, (before, after)
    assert summary["loss_history"][-1] < summary["loss_history"][0]


def test_clips_are_read_cut_and_checked(faces_file, tmp_path):
    clips = load_clips(faces_file, heldout=8)
    video, captions = fake_clips(32)
    assert clips.video.shape == (24, 3, FRAMES, SIZE, SIZE) and len(clips.captions) == 24
    assert clips.heldout_video.shape[0] == 8 and clips.heldout_captions == captions[24:]
    torch.testing.assert_close(clips.video[0], video[0].float() / 127.5 - 1)
    assert clips.video.min() >= -1 and clips.video.max() <= 1
    assert clips.heldout_video[-1, 0, 0, 0, 0].item() == pytest.approx(
        video[-1, 0, 0, 0, 0].item() / 127.5 - 1
    )
    for heldout in (0, 32):
        with pytest.raises(ReproInputError, match=rf"foundation.t2v.heldout: {heldout} must"):
            load_clips(faces_file, heldout)
    short = tmp_path / "short.safetensors"
    save_tensors(short, {"video": video}, kind="talking_faces", metadata={"captions": ["a"]})
    with pytest.raises(ReproInputError, match=rf"{short}: 1 captions for 32 clips"):
        load_clips(short, 8)
    floats = tmp_path / "floats.safetensors"
    save_tensors(
        floats, {"video": video.float()}, kind="talking_faces", metadata={"captions": captions}
    )
    with pytest.raises(ReproInputError, match=rf"{floats}: video must be uint8"):
        load_clips(floats, 8)
    foreign = write_faces(tmp_path / "glyphs.safetensors", kind="glyphs")
    with pytest.raises(ReproInputError, match=r"expected a 'talking_faces' file, found 'glyphs'"):
        load_clips(foreign, 8)


def test_captions_are_dropped_in_the_configured_share():
    captions = ["a person nodding"] * 5000
    dropped = t2v.drop_captions(captions, torch.Generator().manual_seed(0), 0.1)
    share = sum(c == "" for c in dropped) / 5000
    assert abs(share - 0.1) < 0.015 and set(dropped) == {"", "a person nodding"}
    assert t2v.drop_captions(captions[:50], torch.Generator(), 0.0) == captions[:50]


def test_evaluation_reads_samples_against_the_real_ceiling(model, faces_file, monkeypatch):
    """With a generator that hands back the held-out clips themselves, the samples'
    caption accuracy is the real clips' (the ceiling), and so is their frame change."""
    clips = t2v.load_clips(faces_file, heldout=8)
    asked = []

    def replay(t2v_model, prompts, **kwargs):
        asked.append((list(prompts), kwargs))
        return clips.heldout_video[: len(prompts)]

    monkeypatch.setattr(t2v, "generate", replay)
    params = {**PARAMS, "eval": {"steps": 5, "guidance": 4.0, "clips": 6}}
    metrics = t2v.evaluate(model, clips, params)
    assert asked[0][0] == clips.heldout_captions[:6]
    assert asked[0][1]["guidance"] == 4.0 and asked[0][1]["steps"] == 5
    assert asked[0][1]["frames"] == FRAMES and asked[0][1]["size"] == (SIZE, SIZE)
    assert asked[0][1]["shift"] == model.shift
    assert metrics["sample_caption_accuracy_w4"] == metrics["knn_heldout_caption_accuracy"]
    assert metrics["frame_change_w4"] == metrics["frame_change_real"]
    # The frame change by hand: frames 0, 0.5, -0.5 of one clip: (0.5 + 1) / 2.
    clip = torch.tensor([0.0, 0.5, -0.5]).view(1, 1, 3, 1, 1).expand(1, 3, 3, 2, 2)
    assert t2v.frame_change(clip) == pytest.approx(0.75)
    # The held-out loss: the mean over the held-out clips of the loss with fixed draws.
    gen = torch.Generator().manual_seed(PARAMS["seed"] + 1)
    with torch.no_grad():
        want = flow_matching_loss(model, clips.heldout_video, clips.heldout_captions, gen)
    assert metrics["heldout_loss"] == pytest.approx(want.item(), rel=1e-5)


# ----------------------------------------------------------------------------- save, load


def test_save_load_round_trip_gives_the_same_videos(model, tmp_path, no_network):
    out = tmp_path / "models/foundation/t2v"
    save_t2v(model, out)
    assert json.loads((out / KIND_FILE).read_text())["kind"] == "foundation.t2v"
    for sub in ("transformer", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert (out / "tokenizer" / "merges.txt").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == [None, None]
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    loaded = load_t2v(params_of(out))
    assert loaded.vae is None and not loaded.transformer.training
    assert type(loaded.tokenizer).__name__ == "CLIPTokenizer" and loaded.text_length == 12
    assert same_weights(loaded.transformer, model.transformer)
    assert same_weights(loaded.text_encoder, model.text_encoder)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.shift == 3.0
    prompts = ["a person nodding in front of a blue wall", ""]
    kwargs = {"steps": 3, "shift": 3.0, "guidance": 2.0, "frames": 3, "size": 8, "progress": False}
    torch.testing.assert_close(
        generate(loaded, prompts, generator=torch.Generator().manual_seed(0), **kwargs),
        generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs),
        atol=0,
        rtol=0,
    )


def wan_like():
    """Wan2.1-T2V's shape in miniature: a causal video VAE (2x in time and space, 4 latent
    channels), a transformer on its latents, UMT5 with a T5 (Unigram) tokenizer, and the
    hub's UniPC scheduler config holding flow_shift."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    words = "a person nodding shaking their head in front of green blue wall".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=10)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
        scale_factor_temporal=2,
        scale_factor_spatial=2,
    ).eval()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=16,
            d_ff=32,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=16,
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return t2v.TextToVideo(transformer, text_encoder, tokenizer, scheduler, vae)


def hub_layout(model, root):
    """What the hub holds for Wan2.1-T2V-1.3B-Diffusers: model_index.json (a WanPipeline)
    and the component folders; no kind tag."""
    model.save_pretrained(root)
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline"
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    (root / "model_index.json").write_text(json.dumps(index))


def test_a_wan_layout_loads_from_the_hub_cache_alone(tmp_path, no_network):
    model = wan_like()
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    hub_layout(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    params = {
        "name": "t2v",
        "pretrained": HUB_ID,
        "subfolder": None,
        "local_files_only": True,
        "cache_dir": str(cache),
    }
    loaded = load_t2v(params)
    assert same_weights(loaded.vae, model.vae) and same_weights(
        loaded.transformer, model.transformer
    )
    assert same_weights(loaded.text_encoder, model.text_encoder)
    assert type(loaded.tokenizer).__name__ == "T5Tokenizer" and loaded.text_length == 10
    # The hub's UniPC config names the shift flow_shift: read as the scheduler's shift.
    assert loaded.shift == 3.0 and type(loaded.scheduler).__name__.startswith("FlowMatch")
    assert loaded.temporal_ratio == 2 and loaded.spatial_ratio == 2 and loaded.latent_channels == 4
    assert loaded.latent_frames(5) == 3
    with pytest.raises(ReproInputError, match=r"frames: 4 is not 1 \+ a multiple of 2"):
        loaded.latent_frames(4)
    # Videos: the VAE's latent mean, normalised per channel by latents_mean / latents_std.
    video = video_of(2, frames=5, size=8, seed=4)
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        latents = loaded.to_model_space(video)
        want = (model.vae.encode(video).latent_dist.mode() - mean) / std
        decoded = loaded.to_video_space(latents)
        want_video = model.vae.decode(latents * std + mean).sample.clamp(-1, 1)
        image = loaded.image_to_model_space(video[:, :, 0])
    assert latents.shape == (2, 4, 3, 4, 4)
    torch.testing.assert_close(latents, want)
    torch.testing.assert_close(decoded, want_video)
    assert image.shape == (2, 4, 1, 4, 4)
    # The first frame is encoded alone by Wan's causal VAE: the video's first latent frame.
    torch.testing.assert_close(image, latents[:, :, :1], atol=1e-5, rtol=1e-4)
    # UMT5's tokens: the prompt and </s>, then padding, zeroed.
    hidden = loaded.encode_prompts(["a person nodding", ""])
    assert hidden.shape == (2, 10, 16)
    assert (hidden[0, 4:] == 0).all() and (hidden[0, :4].abs().sum(-1) > 0).all()
    assert (hidden[1, 1:] == 0).all() and (hidden[1, 0].abs().sum() > 0)
    loss = flow_matching_loss(loaded, video, ["a person"] * 2, torch.Generator())
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = generate(
        loaded,
        ["a person nodding"] * 2,
        steps=2,
        shift=loaded.shift,
        guidance=2.0,
        generator=torch.Generator(),
        frames=5,
        size=8,
        progress=False,
    )
    assert out.shape == (2, 3, 5, 8, 8) and out.abs().max() <= 1
    with pytest.raises(ReproInputError, match=r"size: 7x7 is not a multiple of the VAE's 2"):
        generate(
            loaded,
            ["a"],
            steps=1,
            shift=1.0,
            guidance=1.0,
            generator=torch.Generator(),
            frames=5,
            size=7,
        )


def test_bad_directories_are_named(model, tmp_path, tiny_dit):
    # A directory built for another model.
    save_model(tiny_dit(seed=0), tmp_path / "dit", kind="dit")
    with pytest.raises(ReproInputError, match=r"foundation.t2v: .*dit: holds a 'dit' model"):
        load_t2v(params_of(tmp_path / "dit"))
    # A model directory without a component: the error names it and the path.
    save_t2v(model, tmp_path / "t2v")
    shutil.rmtree(tmp_path / "t2v" / "transformer")
    with pytest.raises(
        ReproInputError, match=rf"foundation.t2v: {tmp_path}/t2v \(subfolder transformer\)"
    ):
        load_t2v(params_of(tmp_path / "t2v"))
    # No model_index.json: not a text-to-video directory at all.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReproInputError, match=r"foundation.t2v: .*empty: no model_index.json"):
        load_t2v(params_of(tmp_path / "empty"))
    # A VAE listed but missing.
    wan_like().save_pretrained(tmp_path / "wan")
    shutil.rmtree(tmp_path / "wan" / "vae")
    with pytest.raises(ReproInputError, match=r"foundation.t2v: .*wan \(subfolder vae\)"):
        load_t2v(params_of(tmp_path / "wan"))


# ----------------------------------------------------------------------------- the stage


def stage_args(faces, out, params):
    return [
        "--faces",
        str(faces),
        "--out",
        str(out / "t2v"),
        "--metrics",
        str(out / "t2v.json"),
        "--checkpoint-dir",
        str(out / "ckpt"),
        "--params",
        json.dumps(params),
    ]


def test_the_stage_resumes_an_interrupted_run_to_the_same_model(faces_file, tmp_path, monkeypatch):
    t2v.main(stage_args(faces_file, tmp_path / "ref", PARAMS))
    reference = json.loads((tmp_path / "ref" / "t2v.json").read_text())
    assert reference["steps"] == 6 and reference["train_clips"] == 24
    assert reference["heldout_clips"] == 8 and reference["resumed_from"] == 0
    for key in ("heldout_loss", "final_loss", "frame_change_real", "frame_change_w3"):
        assert 0 <= reference[key] < 10, key
    for key in ("sample_caption_accuracy_w1", "sample_caption_accuracy_w3"):
        assert 0 <= reference[key] <= 1, key
    assert 0 <= reference["knn_heldout_caption_accuracy"] <= 1

    # Interrupted after the checkpoint of step 3 (the 5th loss call raises), then rerun.
    real, calls = t2v.flow_matching_loss, []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(t2v, "flow_matching_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        t2v.main(stage_args(faces_file, tmp_path / "run", PARAMS))
    assert not (tmp_path / "run" / "t2v").exists()
    monkeypatch.setattr(t2v, "flow_matching_loss", real)
    t2v.main(stage_args(faces_file, tmp_path / "run", PARAMS))
    resumed = json.loads((tmp_path / "run" / "t2v.json").read_text())
    assert resumed["resumed_from"] == 3
    assert resumed["final_loss"] == reference["final_loss"]
    assert resumed["heldout_loss"] == reference["heldout_loss"]
    a = load_t2v(params_of(tmp_path / "ref" / "t2v"))
    b = load_t2v(params_of(tmp_path / "run" / "t2v"))
    assert same_weights(a.transformer, b.transformer)
    assert same_weights(a.text_encoder, b.text_encoder)


def test_the_stage_refuses_bad_input(faces_file, tmp_path):
    """A file of another kind through the command: ONE line naming it, status 2, no model;
    bad params in-process, each naming its key."""
    foreign = write_faces(tmp_path / "glyphs.safetensors", kind="glyphs")
    proc = subprocess.run(
        [sys.executable, "-m", "repro.foundation.t2v", *stage_args(foreign, tmp_path, PARAMS)],
        env={**os.environ, "REPRO_MLFLOW": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and str(foreign) in lines[0], proc.stderr
    assert not (tmp_path / "t2v").exists()
    bad = [
        ({"heldout": 32}, r"foundation.t2v.heldout: 32 must be in \(0, 32\)"),
        ({"eval": {**PARAMS["eval"], "clips": 9}}, r"eval.clips: 9 must be in \(0, heldout = 8\]"),
        ({"eval": {"steps": 2, "clips": 2}}, r"foundation.t2v.eval.guidance: missing"),
        ({"caption_dropout": 1.0}, r"foundation.t2v.caption_dropout: 1.0 must be in \[0, 1\)"),
        ({"timesteps": {"kind": "cosine"}}, r"foundation.t2v.timesteps.kind: 'cosine'"),
        ({"timesteps": {"kind": "uniform", "sd": 1}}, r"foundation.t2v.timesteps: unknown"),
        ({"pretrained": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}, r"foundation.t2v.pretrained: .*"),
        ({"shift": None}, r"foundation.t2v.shift"),
    ]
    for change, message in bad:
        params = {k: v for k, v in {**PARAMS, **change}.items() if v is not None}
        with pytest.raises(ReproInputError, match=message):
            t2v.main(stage_args(faces_file, tmp_path, params))
    assert not (tmp_path / "t2v").exists()


@pytest.mark.slow
def test_a_killed_stage_resumes_to_the_same_model(faces_file, tmp_path):
    """SIGKILL a real `python -m repro.foundation.t2v` after a checkpoint, rerun, compare."""
    params = {**PARAMS, "steps": 60, "checkpoint_every": 5}
    env = {**os.environ, "REPRO_MLFLOW": "0"}
    cmd = [sys.executable, "-m", "repro.foundation.t2v"]
    subprocess.run(
        [*cmd, *stage_args(faces_file, tmp_path / "ref", params)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    reference = json.loads((tmp_path / "ref" / "t2v.json").read_text())

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, *stage_args(faces_file, out, params)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "ckpt").glob("*/latest")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((out / "ckpt").glob("*/latest")), "no checkpoint was written before the deadline"
    assert not (out / "t2v.json").exists(), "the run finished before it could be killed"
    subprocess.run(
        [*cmd, *stage_args(faces_file, out, params)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    resumed = json.loads((out / "t2v.json").read_text())
    assert resumed["resumed_from"] > 0
    assert resumed["final_loss"] == reference["final_loss"]
    a, b = load_t2v(params_of(tmp_path / "ref" / "t2v")), load_t2v(params_of(out / "t2v"))
    assert same_weights(a.transformer, b.transformer)
