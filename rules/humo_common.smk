# HuMo's helpers (rules/humo.smk includes this file): its config and the files each
# job needs. Functions only: `snakemake --lint` wants helpers and rules apart.
#
# Models: models/humo/stage1_{minimal,full_finetune}_s{seed} (stage 1, shared by the
# variants that start from it) and models/humo/{variant}_s{seed} (the trained variants).
# Generated test clips: results/humo/generated/{variant}_s{seed}/{task}_{cfg}.safetensors;
# their metric rows: results/humo/metrics/{variant}_s{seed}.json.
from repro.humo.workflow import STAGE1_OF, generated_sets

HUMO = config["humo"]
HUMO_LABEL = PAPERS["humo"].label  # the report's category
FACES_SPLITS = ("train", "val", "test")


def humo_model_params(**extra):
    """Every HuMo stage's shared knobs: injection, audio, model, the faces' frames and
    the foundation model to load (foundation_params), plus `extra`."""
    node = {
        "injection": HUMO["injection"],
        # Whisper from the hub (paper scale): read from the hub cache, never the network.
        "audio": {**HUMO["audio"], **hub_options("humo.audio.pretrained")},
        "model": HUMO["model"],
        "frames": config["data"]["faces"]["frames"],
        "foundation": foundation_params("t2v"),
    }
    node.update(extra)
    return json.dumps(node, sort_keys=True)


def humo_train_params(stage, variant, seed):
    """--params of a training job: humo.train with this stage, variant and seed."""
    return humo_model_params(
        train=HUMO["train"], stage=stage, variant=variant, seed=int(seed)
    )


def humo_stage1_input(wildcards):
    """Stage 2's starting point: the stage-1 model its variant builds on."""
    return f"models/humo/stage1_{STAGE1_OF[wildcards.humo_variant]}_s{wildcards.seed}"


def humo_generate_params(variant, seed):
    """--params of a generation job: humo.generate, the CFG weights and the (task, cfg
    form) pairs of this variant (repro.humo.workflow.generated_sets)."""
    return humo_model_params(
        generate=HUMO["generate"],
        cfg=HUMO["cfg"],
        sets=[list(pair) for pair in generated_sets(config, variant)],
        variant=variant,
        seed=int(seed),
    )


def humo_metric_rows():
    """Every variant and seed's metric rows, and the real clips' row."""
    return [
        *expand(
            "results/humo/metrics/{variant}_s{seed}.json",
            variant=HUMO["variants"],
            seed=SEEDS,
        ),
        "results/humo/metrics/real.json",
    ]
