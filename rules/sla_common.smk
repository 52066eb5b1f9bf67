# SLA's helpers (rules/sla.smk includes this file): its config and the files each job
# needs. Functions only: `snakemake --lint` wants helpers and rules apart.
#
# Quality experiment: talking faces at SLA's size in data/sla/faces/, the fine-tuned
# models in models/sla/{variant}_s{seed}, their metrics (loss history) in
# results/sla/finetune/, samples and rows in results/sla/samples/ and results/sla/rows/.
from repro.sla.workflow import (
    faces_params,
    glyph_params as sla_glyph_params_of,
    install_kwargs,
    quality_variants,
)

SLA = config["sla"]
SLA_QUALITY = SLA["quality"]
SLA_LABEL = PAPERS["sla"].label  # the report's category
SLA_VARIANTS = quality_variants(config)
SLA_RUNS = [(name, seed) for name, v in SLA_VARIANTS.items() for seed in v["seeds"]]
SLA_IMAGE = SLA["image"]
SLA_IMAGE_VARIANTS = quality_variants(config, "image")
SLA_IMAGE_RUNS = [
    (name, seed) for name, v in SLA_IMAGE_VARIANTS.items() for seed in v["seeds"]
]


def sla_runs(pattern):
    """`pattern` ({variant}, {seed}) for every variant and each of its seeds."""
    return [pattern.format(variant=name, seed=seed) for name, seed in SLA_RUNS]


def sla_faces_params():
    return json.dumps(faces_params(config), sort_keys=True)


def sla_objective():
    """The foundation's own objective: its timestep distribution and caption dropout."""
    t2v = config["foundation"]["t2v"]
    return {"timesteps": t2v["timesteps"], "caption_dropout": t2v["caption_dropout"]}


def sla_settings(variant):
    return install_kwargs(
        SLA_VARIANTS[variant], SLA_QUALITY["block_q"], SLA_QUALITY["block_kv"]
    )


def sla_finetune_params(variant, seed):
    return json.dumps(
        {
            "variant": variant,
            "seed": int(seed),
            "settings": sla_settings(variant),
            "finetune": SLA_QUALITY["finetune"],
            "objective": sla_objective(),
            "foundation": foundation_params("t2v"),
        },
        sort_keys=True,
    )


def sla_sample_params():
    return json.dumps(
        {
            "sample": SLA_QUALITY["sample"],
            "timing": SLA_QUALITY["timing"],
            "objective": sla_objective(),
        },
        sort_keys=True,
    )


# ----------------------------------------------------------------------------- image


def sla_image_runs(pattern):
    """`pattern` ({variant}, {seed}) for every image variant and each of its seeds."""
    return [pattern.format(variant=name, seed=seed) for name, seed in SLA_IMAGE_RUNS]


def sla_glyph_params(split):
    return json.dumps(sla_glyph_params_of(config, split), sort_keys=True)


def sla_image_params(**extra):
    """The image stages' shared knobs (model, sampler, base, finetune, eval) plus `extra`."""
    keys = ("model", "sampler", "base", "finetune", "eval")
    return json.dumps({**{k: SLA_IMAGE[k] for k in keys}, **extra}, sort_keys=True)


def sla_image_finetune_params(variant, seed):
    settings = install_kwargs(
        SLA_IMAGE_VARIANTS[variant], SLA_IMAGE["block_q"], SLA_IMAGE["block_kv"]
    )
    return sla_image_params(variant=variant, seed=int(seed), settings=settings)
