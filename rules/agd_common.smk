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
        inputs["adapters"] = [
            f"models/agd/adapters/cfg_s{s}.safetensors" for s in SEEDS
        ]
    elif method == "agd_standard":
        inputs["adapters"] = [
            f"models/agd/adapters/standard_s{s}.safetensors" for s in SEEDS
        ]
    elif method == "gd":
        inputs["gd"] = [f"models/agd/gd_s{s}" for s in SEEDS]
    elif method == "real":
        inputs["train"] = "data/digits/train.safetensors"
    return inputs


def agd_eval_tables(wildcards=None):
    tables = ["results/agd/eval/base/real.csv"]
    tables += [f"results/agd/eval/base/{m}.csv" for m in AGD["eval"]["methods"]]
    tables += [
        f"results/agd/eval/derived/{m}.csv" for m in AGD["eval"]["transfer_methods"]
    ]
    return tables


def agd_eval_option(flag, key):
    """Turn an optional input (one path or one per seed) into quoted arguments."""

    def option(wildcards, input):
        if key not in input.keys():
            return ""
        paths = input[key] if isinstance(input[key], list) else [input[key]]
        return " ".join([flag] + [shlex.quote(str(p)) for p in paths])

    return option
