# AGD's helpers (rules/agd.smk includes this file): its config, which files an
# evaluation job needs, chosen from the wildcards. Functions only: `snakemake
# --lint` wants helpers and rules in separate files.

AGD = config["agd"]
AGD_LABEL = PAPERS["agd"].label  # the report's category
# FID with Inception-v3 features (paper scale) reads converted weights: the local
# rule inception_weights (rules/hub.smk) fetches them unless
# agd.eval.inception_weights names a file.
AGD_INCEPTION = AGD["eval"].get("inception_weights") or INCEPTION_WEIGHTS
AGD_USES_INCEPTION = AGD["eval"]["feature_net"] == "inception"


AGD_CHECKPOINTS = ("base", "derived")
# The headline adapter type: the ablations, throughput and figures use it.
AGD_HEADLINE = AGD["distill"]["adapter_type"]
AGD_HEADLINE_ADAPTERS = (
    f"models/agd/adapters/base/cfg_{AGD_HEADLINE}_s{SEEDS[0]}.safetensors"
)


def agd_grid_adapters():
    """Seed-0 adapters of every type on the base, the headline type first."""
    types = [AGD_HEADLINE] + [
        t for t in AGD["distill"]["adapter_types"] if t != AGD_HEADLINE
    ]
    return [
        f"models/agd/adapters/base/cfg_{kind}_s{SEEDS[0]}.safetensors" for kind in types
    ]


def agd_adapter_files(ckpt, traj, types):
    """Adapter files, type-major (repro.agd.evaluate reads file i as seed i mod n)."""
    return [
        f"models/agd/adapters/{ckpt}/{traj}_{kind}_s{s}.safetensors"
        for kind in types
        for s in SEEDS
    ]


def agd_eval_inputs(wildcards):
    """The models one evaluation job needs, by checkpoint and method (all seeds)."""
    heldout = "glyphs" if wildcards.agd_checkpoint == "derived" else "digits"
    inputs = {
        "classifier": "models/core/digit_classifier.safetensors",
        # The derived checkpoint is fine-tuned on glyphs: its samples are scored
        # against held-out glyphs, the base's against held-out real digits; the
        # val split picks the guidance scale, the test split is reported.
        "reference": f"data/{heldout}/test.safetensors",
        "validation": f"data/{heldout}/val.safetensors",
        "checkpoint": f"models/agd/{wildcards.agd_checkpoint}",
    }
    if AGD_USES_INCEPTION:
        inputs["inception_weights"] = AGD_INCEPTION
    method = wildcards.agd_method
    if method == "agd":
        # On the base every adapter type side by side; on the derived checkpoint the
        # headline type, trained on the BASE (the transfer claim).
        types = (
            AGD["distill"]["adapter_types"]
            if wildcards.agd_checkpoint == "base"
            else [AGD_HEADLINE]
        )
        inputs["adapters"] = agd_adapter_files("base", "cfg", types)
    elif method == "agd_standard":
        inputs["adapters"] = agd_adapter_files("base", "standard", [AGD_HEADLINE])
    elif method == "agd_native":
        # Adapters trained on this checkpoint's own CFG trajectories.
        inputs["adapters"] = agd_adapter_files(
            wildcards.agd_checkpoint, "cfg", [AGD_HEADLINE]
        )
    elif method == "gd":
        inputs["gd"] = [f"models/agd/gd_s{s}" for s in SEEDS]
    elif method == "real":
        inputs["train"] = "data/digits/train.safetensors"
    return inputs


def agd_methods(ckpt):
    if ckpt == "base":
        return ["real", *AGD["eval"]["methods"]]
    return list(AGD["eval"]["transfer_methods"])


def agd_eval_tables(wildcards=None):
    return [
        f"results/agd/eval/{ckpt}/{m}.csv"
        for ckpt in AGD_CHECKPOINTS
        for m in agd_methods(ckpt)
    ]


def agd_eval_samples(wildcards):
    """The samples of every method evaluated on one checkpoint (fidelity to CFG)."""
    ckpt = wildcards.agd_checkpoint
    return [f"data/agd/samples/{ckpt}/{m}.safetensors" for m in agd_methods(ckpt)]


def agd_eval_option(flag, key):
    """Turn an optional input (one path or one per seed) into quoted arguments."""

    def option(wildcards, input):
        if key not in input.keys():
            return ""
        paths = input[key] if isinstance(input[key], list) else [input[key]]
        return " ".join([flag] + [shlex.quote(str(p)) for p in paths])

    return option
