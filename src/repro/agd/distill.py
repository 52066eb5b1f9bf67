"""Stage agd_distill: train AGD's adapters on the frozen base.

Loss: MSE(student(x_t, t, class, w), eps_cfg) over stored trajectory steps;
AdamW, linear warm-up then cosine decay; checkpointed and resumable. Only the
adapters are saved: they load onto any checkpoint derived from the same base.

    python -m repro.agd.distill --base models/agd/base \
        --trajectories data/agd/trajectories/base/cfg_s0 \
        --out models/agd/adapters/base/cfg_offset_s0.safetensors \
        --metrics results/agd/distill/base/cfg_offset_s0.json --checkpoint-dir checkpoints/... --params '{...}'
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from repro.agd.model import AdaptedDiT, AGDAdapters, save_adapters
from repro.agd.trajectories import TrajectoryStore
from repro.core.diffusion import eps_of
from repro.core.distributed import local_batch_size, step_generator
from repro.core.modelio import load_dit
from repro.core.stage import Stage, run
from repro.core.training import fit, optimiser_settings

log = logging.getLogger(__name__)


def adapters_for(base, params: dict) -> AGDAdapters:
    """Adapters sized for `base` (hidden width, depth and classes read from its config).

    `w_scale` multiplies w before the random Fourier features (f ~ N(0, 1)): 1000 in
    the paper and the official training script (--cfg-mult), 1 at tiny scale (this
    project's choice: smooth features over w in [1, 6]; see GuidanceEmbedding).
    `adapter_type` is one of repro.agd.model.ADAPTER_TYPES; `timestep_features`
    (optional, default 64) sizes each block's sinusoidal timestep features.
    """
    cfg = base.config
    return AGDAdapters(
        hidden_dim=cfg.num_attention_heads * cfg.attention_head_dim,
        num_blocks=len(base.transformer_blocks),
        adapter_dim=params["adapter_dim"],
        num_classes=cfg.num_embeds_ada_norm,
        w_scale=params["w_scale"],
        seed=params["seed"],
        timestep_features=params.get("timestep_features", 64),
        kind=params["adapter_type"],
    )


def adapter_counts(student: AdaptedDiT) -> dict:
    counts = student.parameter_counts()
    return {
        "trainable_params": counts["trainable"],
        "base_params": counts["base"],
        "trainable_fraction": counts["fraction"],
    }


def distill(
    student: AdaptedDiT, data: TrajectoryStore, params: dict, checkpoint_dir, desc: str
) -> dict:
    """Fit the student's trainable parameters to the stored guided eps.

    Minibatches are gathered from the memory-mapped store (memory holds a batch, not
    the set) and moved to the student's device.
    """
    seed, batch_size, n = params["seed"], local_batch_size(params["batch_size"]), len(data)
    device = student.base.device
    torch.manual_seed(seed)
    # The base runs in eval mode: its label dropout must not corrupt the class.
    student.eval()

    def loss_fn(step: int) -> torch.Tensor:
        gen = step_generator(seed, step)
        rows = torch.randint(n, (batch_size,), generator=gen)
        batch = {key: value.to(device) for key, value in data[rows].items()}
        pred = student(batch["x_t"], batch["t"], batch["labels"], batch["w"])
        return F.mse_loss(eps_of(pred, batch["x_t"]), batch["eps"])

    modules = {"adapters": student.adapters}
    if student.train_base:
        modules["base"] = student.base
    return fit(
        modules=modules,
        parameters=student.trainable_parameters(),
        loss_fn=loss_fn,
        checkpoint_dir=checkpoint_dir,
        **optimiser_settings(params),
        desc=desc,
    )


def main(argv=None) -> None:
    stage = Stage(
        __doc__,
        paper="agd",
        out="output adapters (safetensors)",
        metrics=True,
        checkpoint_dir=True,
    )
    stage.parser.add_argument("--base", required=True, help="base model directory")
    stage.parser.add_argument("--trajectories", required=True, help="trajectory shard directory")
    args = stage.start(argv)
    base = load_dit(args.base)
    data = TrajectoryStore(args.trajectories)
    student = AdaptedDiT(base, adapters_for(base, stage.params)).to(stage.device)
    checkpoints = stage.checkpoints(args.base, args.trajectories)
    summary = distill(student, data, stage.params, checkpoints, desc="agd_distill")
    metrics = stage.summary(summary, **adapter_counts(student), train_samples=len(data))
    if stage.is_main:
        save_adapters(args.out, student.adapters, extra_meta={"metrics": metrics})
    stage.finish(metrics)


if __name__ == "__main__":
    run(main)
