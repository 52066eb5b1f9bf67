# AGD's helpers (rules/agd.smk includes this file): its config, which files an
# evaluation job needs, chosen from the wildcards. Functions only: `snakemake
# --lint` wants helpers and rules in separate files.
#
# Every model-side path has a root, the wildcard agd_root: "agd" for the main run
# (the `agd` config section as it is) and "agd_ladder/<rung>" for a rung of the
# scale ladder (the `agd` section with agd.ladder.rungs.<rung> merged over it).
from repro.agd.workflow import ladder_rungs, rung_config

AGD = config["agd"]
AGD_LABEL = PAPERS["agd"].label  # the report's category
# FID with Inception-v3 features (paper scale) reads converted weights: the local
# rule inception_weights (rules/hub.smk) fetches them unless
# agd.eval.inception_weights names a file.
AGD_INCEPTION = AGD["eval"].get("inception_weights") or INCEPTION_WEIGHTS
AGD_USES_INCEPTION = AGD["eval"]["feature_net"] == "inception"
# The rungs of the scale ladder besides the main run (a rung set to null is off).
AGD_RUNGS = ladder_rungs(config)

# The headline adapter type: the ablations, throughput and figures use it.
AGD_HEADLINE = AGD["distill"]["adapter_type"]
AGD_HEADLINE_ADAPTERS = (
    f"models/agd/adapters/base/cfg_{AGD_HEADLINE}_s{SEEDS[0]}.safetensors"
)


def agd_config(root):
    """The agd config of a root: the section itself, or a ladder rung's merge."""
    if root == "agd":
        return AGD
    return rung_config(config, root.split("/", 1)[1])


def agd_section(wildcards, key, sampler=False, w_range=False, **extra):
    """Section `key` of the root's agd config as JSON for --params; sampler=True adds
    the root's sampler, w_range=True its trajectories' [w_min, w_max]."""
    cfg = agd_config(wildcards.agd_root)
    node = dict(cfg[key])
    if sampler:
        node["sampler"] = cfg["sampler"]
    if w_range:
        node["w_range"] = [cfg["trajectories"]["w_min"], cfg["trajectories"]["w_max"]]
    node.update(extra)
    return json.dumps(node, sort_keys=True)


def agd_checkpoints(root):
    """The checkpoints a root evaluates: the base, and the derived one if any
    transfer method is configured."""
    return (
        ["base", "derived"]
        if agd_config(root)["eval"]["transfer_methods"]
        else ["base"]
    )


def agd_grid_adapters():
    """Seed-0 adapters of every type on the base, the headline type first."""
    types = [AGD_HEADLINE] + [
        t for t in AGD["distill"]["adapter_types"] if t != AGD_HEADLINE
    ]
    return [
        f"models/agd/adapters/base/cfg_{kind}_s{SEEDS[0]}.safetensors" for kind in types
    ]


def agd_adapter_files(root, ckpt, traj, types):
    """Adapter files, type-major (repro.agd.evaluate reads file i as seed i mod n)."""
    return [
        f"models/{root}/adapters/{ckpt}/{traj}_{kind}_s{s}.safetensors"
        for kind in types
        for s in SEEDS
    ]


def agd_eval_inputs(wildcards):
    """The models one evaluation job needs, by root, checkpoint and method (all seeds)."""
    root, ckpt = wildcards.agd_root, wildcards.agd_checkpoint
    cfg = agd_config(root)
    headline = cfg["distill"]["adapter_type"]
    heldout = "glyphs" if ckpt == "derived" else "digits"
    inputs = {
        "classifier": "models/core/digit_classifier.safetensors",
        # The derived checkpoint is fine-tuned on glyphs: its samples are scored
        # against held-out glyphs, the base's against held-out real digits; the
        # val split picks the guidance scale, the test split is reported.
        "reference": f"data/{heldout}/test.safetensors",
        "validation": f"data/{heldout}/val.safetensors",
        "checkpoint": f"models/{root}/{ckpt}",
    }
    if AGD_USES_INCEPTION:
        inputs["inception_weights"] = AGD_INCEPTION
    method = wildcards.agd_method
    if method == "agd":
        # On the base every adapter type side by side; on the derived checkpoint the
        # headline type, trained on the BASE (the transfer claim).
        types = cfg["distill"]["adapter_types"] if ckpt == "base" else [headline]
        inputs["adapters"] = agd_adapter_files(root, "base", "cfg", types)
    elif method == "agd_standard":
        inputs["adapters"] = agd_adapter_files(root, "base", "standard", [headline])
    elif method == "agd_native":
        # Adapters trained on this checkpoint's own CFG trajectories.
        inputs["adapters"] = agd_adapter_files(root, ckpt, "cfg", [headline])
    elif method == "gd":
        inputs["gd"] = [f"models/{root}/gd_s{s}" for s in SEEDS]
    elif method == "real":
        inputs["train"] = "data/digits/train.safetensors"
    return inputs


def agd_methods(root, ckpt):
    """The methods evaluated on one checkpoint of a root; the real-data floor only
    in the main run (a rung has the same data)."""
    cfg = agd_config(root)
    if ckpt == "base":
        return (["real"] if root == "agd" else []) + list(cfg["eval"]["methods"])
    return list(cfg["eval"]["transfer_methods"])


def agd_eval_tables(wildcards):
    root = wildcards.agd_root
    return [
        f"results/{root}/eval/{ckpt}/{m}.csv"
        for ckpt in agd_checkpoints(root)
        for m in agd_methods(root, ckpt)
    ]


def agd_fidelity_tables(wildcards):
    root = wildcards.agd_root
    return [f"results/{root}/fidelity/{ckpt}.csv" for ckpt in agd_checkpoints(root)]


def agd_eval_samples(wildcards):
    """The samples of every method evaluated on one checkpoint (fidelity to CFG)."""
    root, ckpt = wildcards.agd_root, wildcards.agd_checkpoint
    return [
        f"data/{root}/samples/{ckpt}/{m}.safetensors" for m in agd_methods(root, ckpt)
    ]


def agd_ladder_tables():
    """The headline table of every rung, the main run first."""
    return ["results/agd_fid.csv"] + [
        f"results/agd_ladder/{rung}_fid.csv" for rung in AGD_RUNGS
    ]


def agd_eval_option(flag, key):
    """Turn an optional input (one path or one per seed) into quoted arguments."""

    def option(wildcards, input):
        if key not in input.keys():
            return ""
        paths = input[key] if isinstance(input[key], list) else [input[key]]
        return " ".join([flag] + [shlex.quote(str(p)) for p in paths])

    return option


# Scheduling on a few cores: the base gates every other job, and the evaluation of the
# base's CFG-trajectory adapters (every type and seed) is the longest evaluation. Ran in
# whatever order, that evaluation started last and ran alone (tiny, 2 cores: 40 s of one
# idle core at the end, 8 s at the start while the digit classifier held a core the base
# needed). Snakemake starts ready jobs of higher priority first.
AGD_PRIORITY_BASE = 3
# The base's CFG trajectories -> their adapters -> their evaluation:
AGD_PRIORITY_CHAIN = 2
AGD_PRIORITY_LONG = 1  # GD: the longest single jobs after the base


def agd_chain_priority(wildcards):
    """The base's CFG trajectories, adapters and AGD evaluation first; the rest after."""
    on_base = wildcards.get("agd_checkpoint") == "base"
    traj = wildcards.get("traj", "cfg")
    method = wildcards.get("agd_method", "agd")
    return AGD_PRIORITY_CHAIN if on_base and traj == "cfg" and method == "agd" else 0
