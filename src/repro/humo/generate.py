"""Stage humo_generate: test clips from a trained HuMo, for every task and CFG form.

The tasks (HuMo's three modes):
- TI  (text + image): the caption and the reference portrait, no audio;
- TA  (text + audio): the caption and the clip's audio, no reference;
- TIA (text + image + audio): all three.

Every step combines the velocities of the condition sets that the CFG form asks for
(repro.humo.guidance: the paper's time-adaptive Eq. 4, the 17B and 1.7B codes' forms,
fixed weights); "text absent" is the empty prompt, "image absent" no reference frame,
"audio absent" no audio tokens. The flow is integrated with Euler on Wan's shifted
sigmas (repro.foundation.t2v). Clip i's initial noise comes from
sample_generator(seed, i): every variant, task and form starts from the same noise
for the same clip, so their differences are the conditioning's alone.

    python -m repro.humo.generate sample --model models/humo/full_s0 \
        --faces data/faces/test.safetensors --audio data/humo/audio_test.safetensors \
        --out-dir results/humo/generated/full_s0 --params '{...}'
    python -m repro.humo.generate strips --generated results/humo/generated/full_s0 \
        --faces data/faces/test.safetensors --out results/humo/strips.safetensors

`sample` writes <task>_<form>.safetensors (kind humo_generated: `video` uint8
[N, 3, F, H, W], `index` int64 [N], the rows of the test split) per (task, form) of
params["sets"]; `strips` gathers a few clips of each task of one model with the real
clip, its reference and its audio envelope for the figure.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors

log = logging.getLogger(__name__)

KIND = "humo_generated"
TASKS = ("TI", "TA", "TIA")


def to_uint8(video: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 pixels (rounded, clamped)."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def set_file(out_dir, task: str, form: str) -> Path:
    return Path(out_dir) / f"{task}_{form}.safetensors"


@torch.no_grad()
def generate_set(
    humo,
    t2v,
    *,
    task: str,
    form: str,
    weights: dict,
    captions: list[str],
    references: Tensor,
    windows: Tensor,
    indices: Tensor,
    steps: int,
    shift: float,
    seed: int,
    batch_size: int,
    num_frames: int,
) -> Tensor:
    """Videos [N, 3, F, H, W] in [-1, 1] for clips `indices` under one task and CFG form.

    `references` [N, 3, H, W] in [-1, 1] and audio `windows` [N, F_lat, W, G, D] are the
    clips'; each is used only when the task has that condition.
    """
    from repro.core.diffusion import sample_generator
    from repro.foundation.t2v import euler_sample, shifted_sigmas
    from repro.humo.guidance import guided_velocity

    if task not in TASKS:
        raise ReproInputError(f"humo.generate.tasks: unknown task {task!r} (allowed {TASKS})")
    device = t2v.device
    sigmas = shifted_sigmas(int(steps), float(shift))
    negative = t2v.encode_prompts([""])
    out = []
    for start in range(0, len(indices), int(batch_size)):
        rows = slice(start, start + int(batch_size))
        idx = indices[rows]
        text = t2v.encode_prompts([captions[int(i)] for i in idx])
        ref = t2v.image_to_model_space(references[rows].to(device)) if "I" in task else None
        audio = windows[rows].to(device) if "A" in task else None
        shape = humo.latent_shape(t2v, num_frames, references.shape[-2:])
        noise = torch.stack(
            [torch.randn(shape, generator=sample_generator(seed, int(i))) for i in idx]
        ).to(device)

        # The step's predictions that share the reference frame's presence run as one call.
        velocity_fn = guided_velocity(
            humo,
            form,
            weights,
            task,
            text=text,
            negative_text=negative,
            reference=ref,
            audio=audio,
        )
        latents = euler_sample(velocity_fn, noise, sigmas, progress=False)
        out.append(t2v.to_video_space(latents).cpu())
    return torch.cat(out)


def sample_main(args, params: dict) -> dict:
    from repro.foundation.faces import load_faces
    from repro.foundation.t2v import load_t2v
    from repro.humo.audio import load_audio
    from repro.humo.model import audio_windows, load_humo

    for key in ("generate", "cfg", "sets", "seed", "foundation", "model"):
        if key not in params:
            raise ReproInputError(f"humo: --params lacks {key!r}")
    gen = params["generate"]
    # The inputs first: a bad file fails before any model is loaded.
    faces = load_faces(args.faces)
    frames = faces.video.shape[2]
    clips = min(int(gen["clips"]), len(faces.video))
    indices = torch.arange(clips)
    features = load_audio(args.audio, len(faces.video), frames)
    t2v = load_t2v(params["foundation"]["t2v"])
    humo = load_humo(args.model, t2v.transformer)
    humo.eval()
    shift = int(params["model"]["window_shift"])
    windows = torch.stack(
        [audio_windows(features[int(i)], frames, t2v.temporal_ratio, shift) for i in indices]
    )
    references = faces.reference_float(indices)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, form in params["sets"]:
        video = generate_set(
            humo,
            t2v,
            task=task,
            form=form,
            weights=params["cfg"][form],
            captions=faces.captions,
            references=references,
            windows=windows,
            indices=indices,
            steps=int(gen["steps"]),
            shift=float(gen["shift"]),
            seed=int(params["seed"]),
            batch_size=int(gen["batch_size"]),
            num_frames=frames,
        )
        path = set_file(out_dir, task, form)
        save_tensors(
            path,
            {"video": to_uint8(video), "index": indices.clone()},
            KIND,
            {
                "task": task,
                "variant": params.get("variant", "?"),
                "cfg": form,
                "seed": int(params["seed"]),
                "audio": "matched",
                "faces": str(args.faces),
            },
        )
        written[f"{task}_{form}"] = str(path)
        log.info("%s: %d clips (%s, %s)", path, clips, task, form)
    return {"sets": len(written), "clips": clips}


def load_generated(path) -> tuple[dict, dict]:
    """A humo_generated file's tensors (video, index) and metadata; errors name the file."""
    tensors, meta = load_tensors(path, kind=KIND, required=("video", "index"))
    if tensors["video"].ndim != 5 or tensors["video"].shape[1] != 3:
        raise ReproInputError(
            f"{path}: video {tuple(tensors['video'].shape)}, expected [N, 3, F, H, W]"
        )
    if len(tensors["index"]) != len(tensors["video"]):
        raise ReproInputError(
            f"{path}: {len(tensors['index'])} indices for {len(tensors['video'])} clips"
        )
    return tensors, meta


def strips_main(args, params: dict) -> dict:
    """A few clips of each task of one model (its main CFG form), with the real clip."""
    from repro.foundation.faces import load_faces
    from repro.humo.plots import save_strips

    faces = load_faces(args.faces)
    form = params.get("cfg", "paper")
    count = int(args.clips)
    videos, tasks, index = {}, [], None
    for task in params.get("tasks", TASKS):
        path = set_file(args.generated, task, form)
        generated, _ = load_generated(path)
        if index is None:
            index = generated["index"][:count]
        elif not torch.equal(generated["index"][:count], index):
            raise ReproInputError(f"{path}: other test clips than the first task's")
        videos[task] = generated["video"][: len(index)]
        tasks.append(task)
    if index is None:
        raise ReproInputError("humo.generate.tasks: no task to draw")
    save_strips(
        args.out,
        videos,
        reference=faces.reference[index],
        envelope=faces.envelope[index].float(),
        real=faces.video[index],
        captions=[faces.captions[int(i)] for i in index],
    )
    return {"clips": len(index), "tasks": len(tasks)}


COMMAND_ARGS = {
    "sample": ("model", "faces", "audio", "out_dir"),
    "strips": ("generated", "faces", "out"),
}


def main(argv=None) -> None:
    from repro.core.stage import Stage

    stage = Stage(__doc__, paper="humo")
    parser = stage.parser
    parser.prog = "repro.humo.generate"
    parser.add_argument("command", choices=tuple(COMMAND_ARGS))
    parser.add_argument("--model", help="sample: a trained HuMo directory")
    parser.add_argument("--faces", help="the talking-faces test split")
    parser.add_argument("--audio", help="sample: the test split's audio features")
    parser.add_argument("--out-dir", help="sample: where the sets are written")
    parser.add_argument("--generated", help="strips: a humo_generate directory")
    parser.add_argument("--out", help="strips: the strips file (safetensors)")
    parser.add_argument("--clips", type=int, default=4, help="strips: clips per task")
    args = stage.start(argv)
    missing = [
        f"--{a.replace('_', '-')}" for a in COMMAND_ARGS[args.command] if not getattr(args, a)
    ]
    if missing:
        parser.error(f"{args.command} needs {' '.join(missing)}")
    if args.command == "sample":
        stage.finish(sample_main(args, stage.params))  # one MLflow run per generation job
    else:
        strips_main(args, stage.params)  # gathers files for a figure: nothing to log


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
