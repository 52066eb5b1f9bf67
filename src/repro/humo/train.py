"""Stages humo_stage1 / humo_stage2: HuMo's progressive training, from the text-to-video foundation.

- stage "1" (text + reference image): the reference latent joins the video latent
  (repro.humo.model.inject_reference) and only the self-attention weights train
  (variant "minimal"), or every transformer weight (variant "full_finetune", the
  ablation). A fraction `task_mix.start` of the samples carry the reference (the
  subject-preservation task); the rest are text-only, so the model keeps v(t, 0, 0).
- stage "2" (from a stage-1 model): the audio modules join: the projector of audio
  windows to tokens, a frame-local audio cross-attention in every block, and the mask
  predictor of focus-by-predicting (its loss off for variant "no_focus"). The task mix
  moves linearly from `start` (80 % subject preservation) to `end` (50 %); the other
  samples are the sync task (text + audio, no reference); `audio_dropout` of the
  audio-carrying samples lose their audio (v(t, i, 0) for CFG).
- stage "joint" (variant "no_progressive", the ablation): stage 2's recipe for
  stage1.steps + stage2.steps steps straight from the foundation.

Every step: flow matching (x_s = (1 - s) x0 + s noise, target noise - x0, s from
`timesteps`, logit-normal as the paper) on the video frames, text dropped to the
empty prompt with probability `text_dropout`, plus `mask_weight` times
focus-by-predicting's size-aware BCE on the samples that hear audio. Batches, noise
and conditions are drawn from step_generator(seed, step): a resumed run sees the same
batches as an uninterrupted one.

    python -m repro.humo.train --faces data/faces/train.safetensors \
        --audio data/humo/audio_train.safetensors [--init models/humo/stage1_minimal_s0] \
        --out models/humo/full_s0 --metrics results/humo/train/full_s0.json \
        --checkpoint-dir checkpoints/humo --params '{"stage": "2", "variant": "full", ...}'
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.core.errors import ReproInputError

log = logging.getLogger(__name__)

STAGES = ("1", "2", "joint")
STAGE1_KINDS = ("minimal", "full_finetune")
VARIANTS = ("full", "no_focus", "no_progressive", "full_finetune")


def check_params(params: dict) -> None:
    """The --params of a training job: the keys it reads, the stage and variant allowed."""
    for key in ("stage", "variant", "seed", "train", "model", "injection", "foundation"):
        if key not in params:
            raise ReproInputError(f"humo: --params lacks {key!r}")
    stage, variant = str(params["stage"]), params["variant"]
    if stage not in STAGES:
        raise ReproInputError(f"humo stage: {stage!r} is not one of {STAGES}")
    allowed = STAGE1_KINDS if stage == "1" else VARIANTS
    if variant not in allowed:
        raise ReproInputError(f"humo.variants: {variant!r} in stage {stage} (allowed {allowed})")
    if stage == "joint" and variant != "no_progressive":
        raise ReproInputError(f"humo: the joint stage trains no_progressive, not {variant!r}")


def subject_fraction(task_mix: dict, stage: str, step: int, steps: int) -> float:
    """The fraction of subject-preservation samples at `step`: `start` throughout stage
    1; in stage 2 (and the joint stage) linear from `start` at step 0 to `end` at the
    last step."""
    start, end = float(task_mix["start"]), float(task_mix["end"])
    if stage == "1" or steps <= 1:
        return start
    return start + (end - start) * step / (steps - 1)


def total_steps(train: dict, stage: str) -> int:
    if stage == "1":
        return int(train["stage1"]["steps"])
    if stage == "2":
        return int(train["stage2"]["steps"])
    return int(train["stage1"]["steps"]) + int(train["stage2"]["steps"])


def optimiser(train: dict, stage: str) -> dict:
    """fit's optimiser keywords: stage 1's or stage 2's section (the joint stage: stage
    2's learning rate over both stages' steps)."""
    section = dict(train["stage1"] if stage == "1" else train["stage2"])
    section["steps"] = total_steps(train, stage)
    return section


def mask_to_latent(mask: Tensor, temporal_ratio: int, size: tuple[int, int]) -> Tensor:
    """Face masks [B, F, H, W] (0/1) -> soft targets [B, F_lat, h, w] on the latent grid:
    latent frame 0 is video frame 0, frame k >= 1 the mean of video frames
    1 + r(k-1) .. r k (Wan's causal VAE groups), then area-pooled to `size`."""
    mask = mask.float()
    if temporal_ratio > 1:
        first, rest = mask[:, :1], mask[:, 1:]
        groups = rest.shape[1] // temporal_ratio
        rest = rest[:, : groups * temporal_ratio].unflatten(1, (groups, temporal_ratio)).mean(2)
        mask = torch.cat([first, rest], dim=1)
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.adaptive_avg_pool2d(mask, size)
    return mask


def build_humo(t2v, params: dict, feature_shape: tuple[int, int, int]):
    """HuMo around the foundation's transformer: audio windows of (window, G, D)
    features -> tokens, frame-local audio attention in every block, mask predictor."""
    from repro.humo.model import HuMo

    model = params["model"]
    window, groups, dim = feature_shape
    # The new modules' initial weights are a function of the run's seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params["seed"]))
        return HuMo(
            t2v.transformer,
            audio_window=window,
            audio_groups=groups,
            audio_feature_dim=dim,
            audio_hidden=int(model["audio_hidden"]),
            audio_tokens=int(model["audio_tokens"]),
            mask_blocks=int(model["mask_blocks"]),
            injection=params["injection"],
        )


class LossParts(torch.nn.Module):
    """The flow-matching and mask losses of every step, as a buffer: saved with each
    checkpoint and restored on resume, so a resumed run reports what an uninterrupted
    one does. NaN: not (yet) computed, or no sample heard audio that step."""

    PARTS = ("flow", "mask")

    def __init__(self, steps: int):
        super().__init__()
        self.register_buffer("values", torch.full((steps, len(self.PARTS)), float("nan")))

    def record(self, step: int, parts: dict) -> None:
        for j, key in enumerate(self.PARTS):
            if key in parts:
                self.values[step, j] = float(parts[key])

    def final(self, last: int = 50) -> dict:
        """The mean of each part over the last `last` steps that have it."""
        out = {}
        for j, key in enumerate(self.PARTS):
            column = self.values[:, j]
            seen = column[~column.isnan()]
            if len(seen):
                out[f"final_{key}_loss"] = float(seen[-last:].mean())
        return out


class PromptCache:
    """The frozen text encoder's embeddings, each distinct prompt encoded once (a clip's
    caption names one of a few motions and backgrounds, so a run sees a few dozen): the
    same tensors encode_prompts gives, without a text-encoder pass per step."""

    def __init__(self, t2v):
        self.t2v = t2v
        self.cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        new = sorted({p for p in prompts if p not in self.cache})
        if new:
            for prompt, embeds in zip(new, self.t2v.encode_prompts(new), strict=True):
                self.cache[prompt] = embeds
        return torch.stack([self.cache[p] for p in prompts])


def training_loss(
    humo,
    t2v,
    batch: dict,
    gen: torch.Generator,
    *,
    stage: str,
    subject: float,
    train: dict,
    focus: bool,
    encode=None,
) -> tuple[Tensor, dict]:
    """One step's loss on `batch` (video, reference, mask, windows, captions) and its
    parts. Conditions are drawn from `gen`: which samples carry the reference
    (`subject`), hear audio (stage 2 / joint, less `audio_dropout`), keep their caption
    (1 - `text_dropout`). `encode` embeds prompts (default: the text encoder)."""
    from repro.foundation.t2v import sample_sigmas

    device = t2v.device
    video = batch["video"].to(device)
    b = video.shape[0]
    x0 = t2v.to_model_space(video)
    ref = t2v.image_to_model_space(batch["reference"].to(device))
    captions = list(batch["captions"])
    keep_text = torch.rand(b, generator=gen) >= float(train["text_dropout"])
    prompts = [c if keep else "" for c, keep in zip(captions, keep_text.tolist(), strict=True)]
    with_ref = torch.rand(b, generator=gen) < subject
    if stage == "1":
        hears = torch.zeros(b, dtype=torch.bool)
    else:
        hears = torch.rand(b, generator=gen) >= float(train["audio_dropout"])
    timesteps = train["timesteps"]
    sigma = sample_sigmas(
        b,
        gen,
        kind=timesteps["kind"],
        mean=float(timesteps.get("mean", 0.0)),
        std=float(timesteps.get("std", 1.0)),
    ).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    target = noise - x0
    text = (encode or t2v.encode_prompts)(prompts)

    flow, mask_terms, heard = x0.new_zeros(()), [], 0
    # Samples with and without the reference frame differ in length: one pass each.
    for group in (with_ref, ~with_ref):
        rows = group.nonzero().flatten()
        if len(rows) == 0:
            continue
        audio = None
        if hears[rows].any():
            audio = batch["windows"][rows].to(device) * hears[rows].view(-1, 1, 1, 1, 1).to(device)
        v, mask_logits = humo.forward_train(
            x_t[rows],
            sigma[rows],
            text[rows],
            reference=ref[rows] if group is with_ref else None,
            audio=audio,
            audio_on=hears[rows].to(device) if audio is not None else None,
        )
        flow = flow + F.mse_loss(v, target[rows], reduction="sum")
        if focus and audio is not None and mask_logits is not None:
            on = hears[rows].nonzero().flatten()
            if len(on):
                from repro.humo.model import mask_loss

                target_mask = mask_to_latent(
                    batch["mask"][rows[on]].to(device),
                    t2v.temporal_ratio,
                    tuple(mask_logits.shape[-2:]),
                )
                mask_terms.append(mask_loss(mask_logits[on], target_mask) * len(on))
                heard += len(on)
    flow = flow / target.numel()
    loss = flow
    parts = {"flow": float(flow.detach())}
    if mask_terms:
        focus_loss = torch.stack(mask_terms).sum() / heard
        loss = loss + float(train["mask_weight"]) * focus_loss
        parts["mask"] = float(focus_loss.detach())
    return loss, parts


def train(humo, t2v, faces, windows: Tensor, params: dict, checkpoint_dir) -> dict:
    """Train `humo` for its stage (repro.core.training.fit: AdamW, warm-up + cosine,
    checkpoints and resume) on the faces' clips; returns fit's summary."""
    from repro.core.distributed import local_batch_size, step_generator
    from repro.core.training import fit
    from repro.humo.model import trainable_parameters

    stage, variant = str(params["stage"]), params["variant"]
    train_cfg = params["train"]
    kind = "full_finetune" if variant == "full_finetune" else "minimal"
    parameters = trainable_parameters(humo, stage="1" if stage == "1" else "2", variant=kind)
    trainable = {id(p) for p in parameters}
    for p in humo.parameters():
        p.requires_grad_(id(p) in trainable)
    focus = stage != "1" and variant != "no_focus"
    steps = total_steps(train_cfg, stage)
    seed, batch_size = int(params["seed"]), local_batch_size(int(train_cfg["batch_size"]))
    parts_log = LossParts(steps)
    encode = PromptCache(t2v)
    humo.train()

    def loss_fn(step: int) -> Tensor:
        gen = step_generator(seed, step)
        idx = torch.randint(len(faces.video), (batch_size,), generator=gen)
        batch = {
            "video": faces.video_float(idx),
            "reference": faces.reference_float(idx),
            "mask": faces.mask[idx],
            "windows": windows[idx],
            "captions": [faces.captions[int(i)] for i in idx],
        }
        subject = subject_fraction(train_cfg["task_mix"], stage, step, steps)
        loss, parts = training_loss(
            humo,
            t2v,
            batch,
            gen,
            stage=stage,
            subject=subject,
            train=train_cfg,
            focus=focus,
            encode=encode,
        )
        parts_log.record(step, parts)
        return loss

    summary = fit(
        modules={"humo": humo, "loss_parts": parts_log},
        parameters=parameters,
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        grad_clip=train_cfg.get("grad_clip"),
        desc=f"humo_{variant}_stage{stage}",
        **optimiser(train_cfg, stage),
    )
    humo.eval()
    summary.update(parts_log.final())
    summary["trainable_parameters"] = sum(p.numel() for p in parameters)
    summary["total_parameters"] = sum(p.numel() for p in humo.parameters())
    return summary


def main(argv=None) -> None:
    from repro.core.stage import Stage
    from repro.foundation.faces import load_faces
    from repro.foundation.t2v import load_t2v
    from repro.humo.audio import load_audio
    from repro.humo.model import audio_windows, load_humo, save_humo

    stage = Stage(
        __doc__, paper="humo", out="the HuMo directory", metrics=True, checkpoint_dir=True
    )
    stage.parser.add_argument("--faces", required=True, help="the talking-faces train split")
    stage.parser.add_argument("--audio", required=True, help="its audio features (humo_audio)")
    stage.parser.add_argument("--init", help="stage 2: the stage-1 HuMo directory to start from")
    args = stage.start(argv)
    params = stage.params
    check_params(params)
    if str(params["stage"]) == "2" and not args.init:
        raise ReproInputError("humo stage 2: --init (the stage-1 model) is required")
    if str(params["stage"]) != "2" and args.init:
        raise ReproInputError(f"humo stage {params['stage']}: --init is for stage 2 only")

    # The inputs first: a bad file fails before any model is loaded.
    faces = load_faces(args.faces)
    frames = faces.video.shape[2]
    features = load_audio(args.audio, len(faces.video), frames)
    t2v = load_t2v(params["foundation"]["t2v"])
    shift = int(params["model"]["window_shift"])
    windows = torch.stack([audio_windows(f, frames, t2v.temporal_ratio, shift) for f in features])
    if args.init:
        humo = load_humo(args.init, t2v.transformer)
    else:
        humo = build_humo(t2v, params, tuple(windows.shape[2:]))
    humo.to(stage.device)
    t2v.to(stage.device)
    for p in t2v.text_encoder.parameters():
        p.requires_grad_(False)
    inputs = [args.faces, args.audio] + ([args.init] if args.init else [])
    summary = train(humo, t2v, faces, windows, params, stage.checkpoints(*inputs))
    if stage.is_main:
        save_humo(humo.cpu(), args.out, {"variant": params["variant"], "stage": params["stage"]})
    own = {k: v for k, v in summary.items() if k.startswith("final_") or k.endswith("_parameters")}
    own.pop("final_loss", None)
    stage.finish(stage.summary(summary, clips=len(faces.video), **own))


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
