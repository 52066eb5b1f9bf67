"""Stage sla_finetune: the text-to-video foundation with one attention variant installed,
fine-tuned as a whole with the foundation's own objective.

One call installs the variant's attention in every self-attention of the Wan
transformer (repro.sla.processor.install_sla; cross-attention keeps its stock
processor); then EVERY weight trains (the transformer, SLA's Proj and the text
encoder: the maintainers found Proj alone not enough) for `finetune.steps` steps of
flow matching with the foundation's timestep distribution and caption dropout
(repro.foundation.t2v.pretrain, the loop that pre-trained it). Every variant gets the
same steps, batches and noise (a function of the seed and the step), full attention
included, so the comparison isolates the attention.

    python -m repro.sla.finetune --faces data/sla/faces/train.safetensors \
        --out models/sla/sla_s0 --metrics results/sla/finetune/sla_s0.json \
        --checkpoint-dir checkpoints/sla --params '{"variant": "sla", "seed": 0, ...}'

--params: variant (its name), seed, settings (repro.sla.workflow.install_kwargs:
variant = the attention kind, k_h, k_l, phi, block_q, block_kv), finetune (steps,
batch_size, lr, ...), objective (the foundation's timesteps and caption_dropout) and
foundation ({"t2v": store.model_params}). The model directory is the foundation's Wan
layout plus `sla.json` (the variant and its settings): load_finetuned rebuilds it.
The metrics JSON carries the loss history (the loss-curve figure reads it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from repro.core.errors import ReproInputError
from repro.kernels.sla_blocks import block_counts, num_blocks

log = logging.getLogger(__name__)

SLA_FILE = "sla.json"
PARAM_KEYS = ("variant", "seed", "settings", "finetune", "objective", "foundation")
SETTING_KEYS = ("variant", "k_h", "k_l", "phi", "block_q", "block_kv")
SPARSE_KINDS = ("paper", "main", "sparse_only")


def check_params(params: dict) -> None:
    missing = [key for key in PARAM_KEYS if key not in params]
    if missing:
        raise ReproInputError(f"sla_finetune: --params lacks {missing}")
    missing = [key for key in SETTING_KEYS if key not in params["settings"]]
    if missing:
        raise ReproInputError(
            f"sla.quality.variants ({params['variant']}): settings lack {missing}"
        )


def sequence_length(transformer, frames: int, height: int, width: int) -> int:
    """Tokens the transformer makes of a [3, frames, height, width] clip (its patch)."""
    pt, ph, pw = transformer.config.patch_size
    return -(-frames // pt) * (height // ph) * (width // pw)


def check_blocks(settings: dict, seq_len: int, name: str) -> dict:
    """The variant's block counts on this sequence; a clear error naming the key when its
    blocks are longer than the sequence or its k_h leaves no critical block."""
    where = f"sla.quality.variants ({name})"
    for key in ("block_q", "block_kv"):
        if int(settings[key]) > seq_len:
            raise ReproInputError(
                f"sla.quality.{key}: blocks of {settings[key]} tokens are longer than the "
                f"sequence of {seq_len} tokens"
            )
    n_kv = num_blocks(seq_len, int(settings["block_kv"]))
    critical, negligible = block_counts(n_kv, float(settings["k_h"]), float(settings["k_l"]))
    if settings["variant"] in SPARSE_KINDS and critical < 1:
        raise ReproInputError(
            f"{where}: k_h = {settings['k_h']} leaves no critical block of the {n_kv} key "
            f"blocks a row ({seq_len} tokens in blocks of {settings['block_kv']})"
        )
    return {
        "seq_len": seq_len,
        "key_blocks": n_kv,
        "critical_blocks": critical if settings["variant"] != "linear_only" else 0,
        "negligible_blocks": negligible,
    }


class WithSLA:
    """A model with SLA installed, as one thing to save: the model's own directory
    (SLA's Proj weights ride in its safetensors) plus sla.json. The Wan pipeline here,
    the DiT in repro.sla.image."""

    def __init__(self, model, sla: dict) -> None:
        self.model, self.sla = model, sla

    def save_pretrained(self, out_dir: str | os.PathLike, safe_serialization: bool = True) -> None:
        self.model.save_pretrained(out_dir, safe_serialization=safe_serialization)
        (Path(out_dir) / SLA_FILE).write_text(json.dumps(self.sla, indent=2, sort_keys=True))


def read_sla_file(model_dir: str | os.PathLike, stage: str) -> dict:
    """sla.json of a model `stage` saved: {"name", "seed", "settings" (SETTING_KEYS), ...}."""
    sla_file = Path(model_dir) / SLA_FILE
    if not sla_file.is_file():
        raise ReproInputError(f"{sla_file}: missing; {model_dir} is not an {stage} model")
    try:
        sla = json.loads(sla_file.read_text())
        sla["settings"] = {key: sla["settings"][key] for key in SETTING_KEYS}
    except (ValueError, KeyError, TypeError) as err:
        raise ReproInputError(f"{sla_file}: not an SLA settings file ({err})") from err
    return sla


def install_saved_sla(model, sla: dict, weights_dir: str | os.PathLike) -> None:
    """Install sla.json's settings in `model` and load Proj from `weights_dir` (a variant
    without a linear branch has no Proj to load)."""
    from repro.sla.processor import install_sla, load_sla_weights, sla_state_keys

    install_sla(model, **sla["settings"])
    if sla_state_keys(model):
        load_sla_weights(model, weights_dir)


def save_finetuned(t2v, out_dir: str | os.PathLike, sla: dict) -> None:
    """Write the fine-tuned model atomically (repro.core.modelio.save_model), tagged as
    the foundation it is, with sla.json = `sla` ({"name", "settings", ...})."""
    from repro.core.modelio import save_model
    from repro.foundation.t2v import KIND

    save_model(WithSLA(t2v, sla), out_dir, KIND)


def load_finetuned(model_dir: str | os.PathLike):
    """(t2v with SLA installed and its Proj weights loaded, sla.json's dict)."""
    from repro.foundation.t2v import load_t2v

    model_dir = Path(model_dir)
    sla = read_sla_file(model_dir, "sla_finetune")
    t2v = load_t2v(
        {"name": "t2v", "pretrained": str(model_dir), "subfolder": None, "local_files_only": True}
    )
    install_saved_sla(t2v.transformer, sla, model_dir / "transformer")
    return t2v, sla


def clips_of(faces):
    """The foundation's training view of a talking-faces split: every clip, in [-1, 1],
    with its caption (nothing held out: the val and test splits are separate files)."""
    from repro.foundation.t2v import Clips

    video = faces.video.float() / 127.5 - 1.0
    return Clips(video, list(faces.captions), video[:0], [])


def finetune(t2v, clips, params: dict, checkpoint_dir) -> dict:
    """Fine-tune every weight of `t2v` (SLA installed) with the foundation's objective;
    returns fit's summary."""
    from repro.foundation.t2v import pretrain

    settings = {
        **params["finetune"],
        **params["objective"],
        "seed": int(params["seed"]),
    }
    return pretrain(t2v, clips, settings, checkpoint_dir, desc=f"sla_finetune {params['variant']}")


def main(argv=None) -> None:
    from repro.core.stage import Stage
    from repro.foundation.faces import load_faces
    from repro.foundation.t2v import load_t2v
    from repro.sla.processor import install_sla

    stage = Stage(
        __doc__,
        paper="sla",
        out="the fine-tuned model directory",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--faces", required=True, help="the talking-faces train split")
    args = stage.start(argv)
    params = stage.params
    check_params(params)
    name, settings = params["variant"], dict(params["settings"])

    faces = load_faces(args.faces)  # the input first: a bad file fails before the model
    t2v = load_t2v(params["foundation"]["t2v"])
    frames, height, width = faces.video.shape[2:]
    blocks = check_blocks(settings, sequence_length(t2v.transformer, frames, height, width), name)
    install_sla(t2v.transformer, **settings)
    t2v.to(stage.device)
    log.info(
        "%s: %s attention, %d tokens, %d key blocks a row (%d critical, %d negligible)",
        name,
        settings["variant"],
        blocks["seq_len"],
        blocks["key_blocks"],
        blocks["critical_blocks"],
        blocks["negligible_blocks"],
    )
    torch.manual_seed(int(params["seed"]))
    summary = finetune(t2v, clips_of(faces), params, stage.checkpoints(args.faces))
    sla = {"name": name, "seed": int(params["seed"]), "settings": settings, **blocks}
    if stage.is_main:
        save_finetuned(t2v.to("cpu"), args.out, sla)
    stage.finish(
        stage.summary(
            summary,
            variant=name,
            seed=int(params["seed"]),
            loss_history=summary["loss_history"],
            clips=len(faces.video),
            **blocks,
        )
    )


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
