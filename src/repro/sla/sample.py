"""Stage sla_sample: what one fine-tuned variant costs and how well it models the clips.

For the model of one (variant, seed) this stage measures:

- val_loss / test_loss: the flow-matching loss on the whole val and test splits
  (identities never trained on), with noise levels and noise drawn from a generator
  seeded by `sample.seed` alone: every variant and seed is scored on the same noise;
- samples: videos of the first `sample.clips` test captions (Euler, the model's
  shift, classifier-free guidance `sample.guidance`), the initial noise again from
  `sample.seed` alone; frame FID is computed from them by sla_eval;
- attention FLOPs per generated clip (self-attention, both CFG passes, every step),
  counted by repro.kernels.attention_flops.AttentionFlopsCounter from the block masks
  the variant actually used; flops_reduction = dense / spent;
- attention_ms: the variant's attention alone on (timing.batch, heads, L, head_dim)
  queries, keys and values of this sequence, median of `timing.repeats` calls on this
  machine (CPU: SLA's blockwise torch path; full attention: torch SDPA, which is what
  the module calls for it).

    python -m repro.sla.sample --model models/sla/sla_s0 \
        --finetune-metrics results/sla/finetune/sla_s0.json \
        --faces-val data/sla/faces/val.safetensors --faces-test data/sla/faces/test.safetensors \
        --out results/sla/samples/sla_s0.safetensors --row results/sla/rows/sla_s0.json \
        --params '{"sample": {...}, "timing": {...}, "objective": {...}}'
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F

from repro.core.errors import ReproInputError

log = logging.getLogger(__name__)

SAMPLES_KIND = "sla_samples"


@torch.no_grad()
def split_loss(t2v, video, captions, objective: dict, seed: int, batch_size: int) -> float:
    """Mean flow-matching loss over a split, noise from Generator(seed) batch by batch."""
    from repro.foundation.t2v import flow_matching_loss

    timesteps = dict(objective.get("timesteps", {}))
    gen = torch.Generator().manual_seed(int(seed))
    total = 0.0
    for start in range(0, len(video), batch_size):
        stop = min(start + batch_size, len(video))
        batch = video[start:stop].to(t2v.device)
        loss = flow_matching_loss(t2v, batch, list(captions[start:stop]), gen, **timesteps)
        total += loss.item() * (stop - start)
    return total / len(video)


@torch.no_grad()
def time_attention(module, shape: tuple[int, int, int, int], timing: dict, seed: int = 0) -> float:
    """Median milliseconds of one attention call on random (B, H, L, D) inputs."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    device = next(iter(module.parameters()), q).device
    q, k, v = q.to(device), k.to(device), v.to(device)

    def call():
        # Full attention is SDPA, as the module runs it, without the block statistics it
        # also computes for the FLOPs counter.
        if module.variant == "full":
            return F.scaled_dot_product_attention(q, k, v)
        return module(q, k, v)

    for _ in range(int(timing["warmup"])):
        call()
    times = []
    for _ in range(int(timing["repeats"])):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    from repro.core.io import read_json, save_tensors, write_json
    from repro.core.stage import Stage
    from repro.foundation.faces import load_faces, to_uint8
    from repro.foundation.t2v import generate
    from repro.kernels.attention_flops import AttentionFlopsCounter
    from repro.sla.finetune import load_finetuned, sequence_length
    from repro.sla.processor import sla_modules
    from repro.sla.workflow import nominal_sparsity

    stage = Stage(__doc__, paper="sla", out="the samples (safetensors)")
    stage.parser.add_argument("--model", required=True, help="an sla_finetune model directory")
    stage.parser.add_argument("--finetune-metrics", required=True, help="its metrics JSON")
    stage.parser.add_argument("--faces-val", required=True)
    stage.parser.add_argument("--faces-test", required=True)
    stage.parser.add_argument("--row", required=True, help="the JSON row this writes")
    args = stage.start(argv)
    params = stage.params
    for key in ("sample", "timing", "objective"):
        if key not in params:
            raise ReproInputError(f"sla_sample: --params lacks {key!r}")
    sample, timing = params["sample"], params["timing"]

    trained = read_json(args.finetune_metrics)
    val, test = load_faces(args.faces_val), load_faces(args.faces_test)
    n_clips = int(sample["clips"])
    if not 0 < n_clips <= len(test.video):
        raise ReproInputError(
            f"sla.quality.sample.clips: {n_clips}, but {args.faces_test} has {len(test.video)} clips"
        )
    t2v, sla = load_finetuned(args.model)
    t2v.to(stage.device)
    if trained.get("variant") != sla["name"]:
        raise ReproInputError(
            f"{args.finetune_metrics}: metrics of variant {trained.get('variant')!r}, "
            f"but {args.model} holds {sla['name']!r}"
        )
    batch = int(sample["batch_size"])
    seed = int(sample["seed"])
    losses = {
        f"{split}_loss": split_loss(
            t2v, faces.video.float() / 127.5 - 1.0, faces.captions, params["objective"], seed, batch
        )
        for split, faces in (("val", val), ("test", test))
    }

    frames, height, width = test.video.shape[2:]
    prompts = list(test.captions[:n_clips])
    with AttentionFlopsCounter() as counter:
        video = generate(
            t2v,
            prompts,
            steps=int(sample["steps"]),
            shift=t2v.shift,
            guidance=float(sample["guidance"]),
            generator=torch.Generator().manual_seed(seed),
            frames=int(frames),
            size=(int(height), int(width)),
            batch_size=batch,
        )
    flops = counter.flops
    if not counter.calls:
        raise ReproInputError(f"{args.model}: no SLA attention call was counted (not installed?)")

    module = next(iter(sla_modules(t2v.transformer).values()))
    heads = t2v.transformer.config.num_attention_heads
    seq_len = sequence_length(t2v.transformer, int(frames), int(height), int(width))
    shape = (int(timing["batch"]), heads, seq_len, module.head_dim)
    attention_ms = time_attention(module, shape, timing)

    settings = sla["settings"]
    row = {
        "variant": sla["name"],
        "attention": settings["variant"],
        "k_h": float(settings["k_h"]),
        "k_l": float(settings["k_l"]),
        "phi": settings["phi"] if settings["variant"] != "full" else "none",
        "sparsity": nominal_sparsity(settings["variant"], settings["k_h"]),
        "seed": int(sla["seed"]),
        "steps": int(trained["steps"]),
        "final_train_loss": float(trained["final_loss"]),
        **losses,
        "block_sparsity": flops.block_sparsity,
        "attention_flops": flops.total / n_clips,
        "dense_attention_flops": flops.dense / n_clips,
        "flops_reduction": flops.dense / flops.total if flops.total else float("inf"),
        "attention_ms": attention_ms,
        "seq_len": seq_len,
        "key_blocks": sla.get("key_blocks"),
        "critical_blocks": sla.get("critical_blocks"),
        "samples": str(args.out),
    }
    save_tensors(
        args.out,
        {"video": to_uint8((video + 1) / 2)},  # generate returns [-1, 1]
        SAMPLES_KIND,
        {"variant": sla["name"], "seed": int(sla["seed"]), "captions": prompts},
    )
    write_json(args.row, row)
    log.info(
        "%s seed %d: test loss %.4f, attention %.3g FLOPs a clip (%.1fx less than dense), %.2f ms",
        sla["name"],
        sla["seed"],
        losses["test_loss"],
        row["attention_flops"],
        row["flops_reduction"],
        attention_ms,
    )
    stage.finish({k: v for k, v in row.items() if k not in ("variant", "attention", "phi")})


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
