"""The text-to-image foundation model: built tiny, trained, sampled, saved and loaded in
Stable Diffusion's layout; the paper-scale path (a VAE, 3 channels, the hub cache) on
tiny checkpoints saved here, with every socket refused.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from repro.core.config import load_yaml, merge
from repro.core.data import render_glyphs, write_image_dataset
from repro.core.errors import ReproInputError
from repro.core.modelio import KIND_FILE, save_model
from repro.core.training import fit
from repro.foundation import corpus as glyph_corpus
from repro.foundation import store, t2i
from repro.foundation.t2i import (
    build_t2i,
    denoising_loss,
    generate,
    load_t2i,
    sampling_scheduler,
    save_t2i,
)

ROOT = Path(__file__).resolve().parents[1]
HUB_ID, COMMIT = "org/tiny-sd", "89abcdef0123456789abcdef0123456789abcdef"
CHARS = "0123456789"

# Smaller than config.yaml's (same classes and layout): a test builds it in ~0.1 s.
PARAMS = {
    "pretrained": None,
    "subfolder": None,
    "vocab_size": 600,
    "unet": {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    },
    "text_encoder": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    },
    "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "linear"},
    "caption_dropout": 0.1,
    "generic_fraction": 0.3,
    "steps": 6,
    "batch_size": 16,
    "lr": 0.002,
    "weight_decay": 0.0,
    "warmup_fraction": 0.1,
    "grad_clip": 1.0,
    "checkpoint_every": 3,
    "seed": 0,
    "heldout": 20,
    "eval": {"per_class": 1, "guidance": [2.0], "steps": 2},
}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy machine
    two spinning threads can slow a test down tenfold (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError("network access in a test that must read local files only")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def glyphs():
    return render_glyphs(80, seed=0, chars=CHARS)


@pytest.fixture(scope="module")
def captions(glyphs):
    return glyphs.captions + [glyph_corpus.generic_caption(ch) for ch in CHARS]


@pytest.fixture
def model(captions):
    return build_t2i(PARAMS, captions)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, glyphs):
    path = tmp_path_factory.mktemp("corpus") / "corpus.safetensors"
    meta = {"chars": CHARS, "num_classes": len(CHARS)}
    write_image_dataset(path, glyphs.images, glyphs.labels, "glyphs", meta, glyphs.captions)
    return path


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def params_of(path):
    return {"name": "t2i", "pretrained": str(path), "subfolder": None, "local_files_only": True}


# ----------------------------------------------------------------------------- build, sample


def test_the_tiny_model_has_sds_components(model, captions):
    assert type(model.unet).__name__ == "UNet2DConditionModel"
    assert type(model.text_encoder).__name__ == "CLIPTextModel"
    assert type(model.tokenizer).__name__ == "CLIPTokenizer"
    assert type(model.scheduler).__name__ == "DDPMScheduler"
    assert model.vae is None and model.image_size == 8 and model.image_channels == 1
    # The UNet attends to the text encoder's hidden states; ids and specials agree.
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert model.text_encoder.config.eos_token_id == model.tokenizer.eos_token_id
    assert model.text_encoder.config.vocab_size == len(model.tokenizer)
    hidden = model.encode_prompts(["a glyph of the digit seven", ""])
    assert hidden.shape == (2, 16, 16) and hidden.requires_grad
    # Seeded: the same params give the same weights.
    again = build_t2i(PARAMS, captions)
    assert same_weights(again.unet, model.unet)
    assert same_weights(again.text_encoder, model.text_encoder)


def test_generate_is_deterministic_for_a_generator(model):
    prompts = ["a glyph of the digit seven"] * 3 + ["a glyph of the digit one"] * 2
    kwargs = {"guidance": 2.0, "steps": 4, "progress": False}
    a = generate(model, prompts, generator=torch.Generator().manual_seed(1), **kwargs)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(1), batch_size=2, **kwargs)
    c = generate(model, prompts, generator=torch.Generator().manual_seed(2), **kwargs)
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    # The noise is drawn up front: the batch size does not change the images.
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # float sums differ per batch
    assert not torch.allclose(a, c)
    assert generate(model, [], generator=torch.Generator(), **kwargs).shape == (0, 1, 8, 8)


def text_shift(hidden):
    """One number per prompt from the text states: the first feature averaged over the
    tokens (the features of a token average to ~0 after CLIP's final layer norm)."""
    return hidden[:, :, 0].mean(dim=1).view(-1, 1, 1, 1)


class StubUNet(torch.nn.Module):
    """eps = 0.1 x + text_shift(text states): distinct for distinct prompts, so the
    guidance formula can be checked by hand; records every call."""

    def __init__(self, unet):
        super().__init__()
        self.config = unet.config
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    @property
    def device(self):
        return self.anchor.device

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append(len(x))
        return type("Out", (), {"sample": 0.1 * x + text_shift(encoder_hidden_states)})()


def ddim_by_hand(model, noise, eps_of, steps):
    """DDIM (eta 0) written out: x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t),
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps; 'leading' timesteps,
    the last step landing on alphas_cumprod[0] (set_alpha_to_one False)."""
    abar = model.scheduler.alphas_cumprod.double()
    ratio = 1000 // steps
    timesteps = [i * ratio for i in reversed(range(steps))]
    x = noise.double()
    for t in timesteps:
        eps = eps_of(x.float(), t).double()
        a_t = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else abar[0]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.float().clamp(-1, 1)


def test_cfg_is_eps_u_plus_w_times_eps_c_minus_eps_u(model):
    model.unet = StubUNet(model.unet)
    prompts = ["a glyph of the digit seven", "a glyph of the digit two"]
    with torch.no_grad():
        cond = text_shift(model.encode_prompts(prompts))
        uncond = text_shift(model.encode_prompts([""]))
        negative = text_shift(model.encode_prompts(["a glyph"]))
    # The check means something only if the prompts move the stub's output apart.
    assert (cond - uncond).abs().min() > 0.05 and (cond - negative).abs().min() > 0.05
    assert (cond[0] - cond[1]).abs() > 0.05
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for w, neg, base in ((3.0, "", uncond), (0.0, "", uncond), (2.5, "a glyph", negative)):
        got = generate(
            model,
            prompts,
            guidance=w,
            steps=3,
            generator=torch.Generator().manual_seed(3),
            negative_prompt=neg,
            progress=False,
        )
        want = ddim_by_hand(
            model, noise, lambda x, t, b=base, w=w: 0.1 * x + b + w * (cond - b), steps=3
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # guidance 1 is the conditional model alone: one evaluation per step, not two batched.
    model.unet.calls.clear()
    got = generate(
        model,
        prompts,
        guidance=1.0,
        steps=3,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    assert model.unet.calls == [2, 2, 2]
    torch.testing.assert_close(
        got, ddim_by_hand(model, noise, lambda x, t: 0.1 * x + cond, steps=3), atol=1e-5, rtol=0
    )
    assert sampling_scheduler(model).config.set_alpha_to_one is False


# ----------------------------------------------------------------------------- train


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_targets_the_schedulers_prediction_type(model, glyphs, prediction_type):
    """A UNet that answers the true target (from the clean images it is told) has loss 0."""
    params = {**PARAMS, "scheduler": {**PARAMS["scheduler"], "prediction_type": prediction_type}}
    model.scheduler = t2i.make_noise_scheduler(params)
    x0 = glyphs.images[:6]
    abar = model.scheduler.alphas_cumprod

    class Oracle(StubUNet):
        def forward(self, x, t, encoder_hidden_states):
            a = abar[t].view(-1, 1, 1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            v = a.sqrt() * eps - (1 - a).sqrt() * x0
            target = v if prediction_type == "v_prediction" else eps
            return type("Out", (), {"sample": target})()

    model.unet = Oracle(model.unet)
    loss = denoising_loss(model, x0, ["x"] * 6, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    # The same oracle scored against the other target is far off.
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    model.scheduler = t2i.make_noise_scheduler(
        {**PARAMS, "scheduler": {**PARAMS["scheduler"], "prediction_type": other}}
    )
    assert denoising_loss(model, x0, ["x"] * 6, torch.Generator().manual_seed(0)).item() > 0.01


def test_the_denoising_loss_falls_in_a_short_training(model, glyphs):
    images, prompts = glyphs.images[:32], glyphs.captions[:32]

    def held_loss():
        with torch.no_grad():
            return denoising_loss(model, images, prompts, torch.Generator().manual_seed(9)).item()

    before = held_loss()
    model.unet.train()
    model.text_encoder.train()
    summary = fit(
        modules={"unet": model.unet, "text_encoder": model.text_encoder},
        parameters=list(model.parameters()),
        loss_fn=lambda step: denoising_loss(
            model, images, prompts, torch.Generator().manual_seed(step)
        ),
        steps=40,
        lr=3e-3,
        warmup_fraction=0.1,
    )
    model.unet.eval()
    model.text_encoder.eval()
    after = held_loss()
    assert after < 0.5 * before, (before, after)
    assert summary["loss_history"][-1] < summary["loss_history"][0]


def test_captions_are_dropped_or_made_generic_in_the_configured_shares(corpus_file):
    corpus = glyph_corpus.load_corpus(corpus_file, heldout=20)
    assert len(corpus.labels) == 60 and len(corpus.heldout_labels) == 20
    idx = torch.arange(60).repeat(100)
    mixed = glyph_corpus.mixed_captions(corpus, idx, torch.Generator().manual_seed(0), 0.1, 0.3)
    pairs = list(zip(mixed, idx.tolist(), strict=True))
    empty = sum(c == "" for c, _ in pairs)
    generic = sum(c == corpus.generic[corpus.labels[i]] for c, i in pairs)
    own = sum(c == corpus.captions[i] for c, i in pairs)
    assert empty + generic + own == len(mixed) == 6000
    assert abs(empty / 6000 - 0.1) < 0.02 and abs(generic / 6000 - 0.3) < 0.03
    assert corpus.generic[7] == "a glyph of the digit seven"


def test_the_knn_judge_votes_with_ties_to_the_nearest():
    reference = torch.tensor([[0.0], [0.1], [1.0], [1.1], [1.2], [5.0]]).view(6, 1, 1, 1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    queries = torch.tensor([[0.05], [1.05], [4.0]]).view(3, 1, 1, 1)
    assert t2i.knn_predict(reference, labels, queries, k=3).tolist() == [0, 1, 1]
    # k=2 at 4.0: labels 2 (distance 1) and 1 (distance 2.8) tie 1-1: the nearer wins.
    assert t2i.knn_predict(reference, labels, queries, k=2).tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- save, load


def test_save_load_round_trip_gives_the_same_images(model, tmp_path, no_network):
    out = tmp_path / "models/foundation/t2i"
    save_t2i(model, out)
    assert json.loads((out / KIND_FILE).read_text())["kind"] == "foundation.t2i"
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert (out / "tokenizer" / "merges.txt").is_file()
    assert json.loads((out / "model_index.json").read_text())["vae"] == [None, None]
    cfg = merge(load_yaml(ROOT / "config.yaml"), {"foundation": {"t2i": {"pretrained": None}}})
    params = {**store.model_params(cfg, "t2i"), "pretrained": str(out)}
    loaded = load_t2i(params)
    assert loaded.vae is None and not loaded.unet.training
    assert same_weights(loaded.unet, model.unet)
    assert same_weights(loaded.text_encoder, model.text_encoder)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.scheduler.config.num_train_timesteps == 1000
    prompts = ["a glyph of the digit three", "a bold serif glyph of the digit four"]
    kwargs = {"guidance": 2.0, "steps": 3, "progress": False}
    torch.testing.assert_close(
        generate(loaded, prompts, generator=torch.Generator().manual_seed(0), **kwargs),
        generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs),
        atol=0,
        rtol=0,
    )


def paper_like(captions):
    """SD's shape in miniature: 3-channel images, a VAE (factor 2, 4 latent channels),
    a 4x4x4 latent UNet: image_size 8."""
    params = {
        **PARAMS,
        "unet": {**PARAMS["unet"], "sample_size": 4, "in_channels": 4, "out_channels": 4},
        "scheduler": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    }
    model = build_t2i(params, captions)
    torch.manual_seed(0)
    model.vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    ).eval()
    return model


def sd_layout(model, root):
    """What the hub holds for SD 2.1 base: model_index.json, the component folders, the
    tokenizer as vocab.json + merges.txt only, a PNDMScheduler config; no kind tag."""
    model.save_pretrained(root)
    for extra in ("tokenizer.json",):
        (root / "tokenizer" / extra).unlink()
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    config.update({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 1})
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((root / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (root / "model_index.json").write_text(json.dumps(index))


def test_an_sd_layout_loads_from_the_hub_cache_alone(captions, tmp_path, no_network):
    model = paper_like(captions)
    cache = tmp_path / "hub-cache"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    sd_layout(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    cfg = merge(
        load_yaml(ROOT / "config.yaml"),
        {
            "foundation": {"t2i": {"pretrained": HUB_ID}},
            "hub": {"cache_dir": str(cache), "offline": True},
        },
    )
    loaded = load_t2i(store.model_params(cfg, "t2i"))
    assert same_weights(loaded.vae, model.vae) and same_weights(loaded.unet, model.unet)
    assert loaded.image_size == 8 and loaded.image_channels == 3 and loaded.vae_factor == 2
    # Grey 16x16 images: resized to 8, repeated to 3 channels, encoded to 4x4x4 latents.
    grey = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = loaded.to_model_space(grey)
        rgb = torch.nn.functional.interpolate(grey, size=(8, 8), mode="area").expand(-1, 3, -1, -1)
        want = model.vae.encode(rgb).latent_dist.mode() * model.vae.config.scaling_factor
        images = loaded.to_image_space(latents)
    assert latents.shape == (2, 4, 4, 4)
    torch.testing.assert_close(latents, want)
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1.0
    loss = denoising_loss(loaded, grey, ["a glyph of the digit one"] * 2, torch.Generator())
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = generate(
        loaded, ["a glyph"] * 2, guidance=2.0, steps=2, generator=torch.Generator(), progress=False
    )
    assert out.shape == (2, 3, 8, 8)
    # SD ships a PNDM config: its betas are read as the DDPM training schedule.
    assert type(loaded.scheduler).__name__ == "DDPMScheduler"
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"


def test_bad_directories_are_named(model, captions, tmp_path, tiny_dit):
    # A directory built for another model.
    save_model(tiny_dit(seed=0), tmp_path / "dit", kind="dit")
    with pytest.raises(ReproInputError, match=r"foundation.t2i: .*dit: holds a 'dit' model"):
        load_t2i(params_of(tmp_path / "dit"))
    # A pipeline directory without a component: the error names it and the path.
    save_t2i(model, tmp_path / "t2i")
    shutil.rmtree(tmp_path / "t2i" / "unet")
    with pytest.raises(
        ReproInputError, match=rf"foundation.t2i: {tmp_path}/t2i \(subfolder unet\)"
    ):
        load_t2i(params_of(tmp_path / "t2i"))
    # No model_index.json: not a text-to-image directory at all.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReproInputError, match=r"foundation.t2i: .*empty: no model_index.json"):
        load_t2i(params_of(tmp_path / "empty"))
    # A VAE listed but missing.
    paper = paper_like(captions)
    paper.save_pretrained(tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "vae")
    with pytest.raises(ReproInputError, match=r"foundation.t2i: .*sd \(subfolder vae\)"):
        load_t2i(params_of(tmp_path / "sd"))
    with pytest.raises(ReproInputError, match=r"foundation.t2i.unet: unknown keys \['depth'\]"):
        build_t2i({**PARAMS, "unet": {**PARAMS["unet"], "depth": 3}}, captions)


# ----------------------------------------------------------------------------- the stage


def stage_args(corpus, out, params):
    return [
        "--corpus",
        str(corpus),
        "--out",
        str(out / "t2i"),
        "--metrics",
        str(out / "t2i.json"),
        "--checkpoint-dir",
        str(out / "ckpt"),
        "--params",
        json.dumps(params),
    ]


def test_the_stage_resumes_an_interrupted_run_to_the_same_model(corpus_file, tmp_path, monkeypatch):
    t2i.main(stage_args(corpus_file, tmp_path / "ref", PARAMS))
    reference = json.loads((tmp_path / "ref" / "t2i.json").read_text())
    assert reference["steps"] == 6 and reference["train_images"] == 60
    for key in ("heldout_loss", "sample_accuracy_w2", "knn_heldout_accuracy", "final_loss"):
        assert 0 <= reference[key] < 10, key

    # Interrupted after the checkpoint of step 3 (the 5th loss call raises), then rerun.
    real, calls = t2i.denoising_loss, []

    def dies_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(t2i, "denoising_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        t2i.main(stage_args(corpus_file, tmp_path / "run", PARAMS))
    assert not (tmp_path / "run" / "t2i").exists()
    monkeypatch.setattr(t2i, "denoising_loss", real)
    t2i.main(stage_args(corpus_file, tmp_path / "run", PARAMS))
    resumed = json.loads((tmp_path / "run" / "t2i.json").read_text())
    assert resumed["resumed_from"] == 3
    assert resumed["final_loss"] == reference["final_loss"]
    a, b = (
        load_t2i(params_of(tmp_path / "ref" / "t2i")),
        load_t2i(params_of(tmp_path / "run" / "t2i")),
    )
    assert same_weights(a.unet, b.unet) and same_weights(a.text_encoder, b.text_encoder)


def test_the_stage_refuses_bad_input_with_one_line(corpus_file, tmp_path):
    """A corpus without captions: ONE line naming the file, status 2, no model."""
    glyphs = render_glyphs(40, seed=1, chars=CHARS)
    bare = tmp_path / "bare.safetensors"
    write_image_dataset(bare, glyphs.images, glyphs.labels, "glyphs", {"chars": CHARS})
    proc = subprocess.run(
        [sys.executable, "-m", "repro.foundation.t2i", *stage_args(bare, tmp_path, PARAMS)],
        env={**os.environ, "REPRO_MLFLOW": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and str(bare) in lines[0], proc.stderr
    assert not (tmp_path / "t2i").exists()
    with pytest.raises(ReproInputError, match=r"data.corpus.heldout: 80 must be in \(0, 80\)"):
        t2i.main(stage_args(corpus_file, tmp_path, {**PARAMS, "heldout": 80}))
    with pytest.raises(ReproInputError, match=r"caption_dropout \+ .*generic_fraction"):
        t2i.main(stage_args(corpus_file, tmp_path, {**PARAMS, "caption_dropout": 0.8}))
    with pytest.raises(ReproInputError, match=r"foundation.t2i.pretrained: .* is loaded"):
        t2i.main(stage_args(corpus_file, tmp_path, {**PARAMS, "pretrained": "org/sd"}))
