# FedRE's helpers (rules/fedre.smk includes this file): its config and the files each
# job needs. Functions only: `snakemake --lint` wants helpers and rules apart.
#
# One simulation job per task x partition x seed (results/fedre/runs/), each running
# every algorithm of fedre.algorithms on the same ten heterogeneous clients.
FEDRE = config["fedre"]
FEDRE_LABEL = PAPERS["fedre"].label  # the report's category


def fedre_task_data(task):
    """The data files of a task: the three splits of the digits or of an ImageFolder data
    set (data.imagefolders.<dataset>), pooled (the clients cut their own splits), or the
    task's rendered glyph set."""
    spec = FEDRE["tasks"][task]
    if spec["source"] == "glyphs":
        return [f"data/fedre/{task}.safetensors"]
    dataset = "digits" if spec["source"] == "digits" else spec["dataset"]
    return [classification_split(dataset, split) for split in ("train", "val", "test")]


def fedre_glyph_params(task):
    spec = FEDRE["tasks"][task]
    if spec["source"] != "glyphs":
        raise ValueError(f"fedre.tasks.{task}: not a glyph task")
    return json.dumps(
        {k: spec[k] for k in ("chars", "n", "seed", "size")}, sort_keys=True
    )


def fedre_aux_params(task):
    """The attacker's public images: glyphs of the task's characters (font digits for the
    digits), fedre.privacy.aux's count and seed, the task's image size."""
    spec = FEDRE["tasks"][task]
    if spec["source"] == "imagefolder":
        raise ValueError(
            f"fedre.tasks.{task}: no glyph stand-in for an imagefolder task"
        )
    chars = spec.get("chars", "0123456789")
    size = spec.get("size", 8)
    aux = FEDRE["privacy"]["aux"]
    return json.dumps(
        {"chars": chars, "n": aux["n"], "seed": aux["seed"], "size": size}
    )


def fedre_aux(task):
    """--aux's file for a task's jobs (none when the attack is off)."""
    return (
        [f"data/fedre/{task}_aux.safetensors"] if FEDRE["privacy"]["algorithms"] else []
    )


def fedre_simulate_params(task, partition, seed):
    """The simulation's --params: the fedre section without its task / partition tables,
    with this job's task, partition (name and spec) and seed."""
    node = {
        k: v
        for k, v in FEDRE.items()
        if k not in ("tasks", "partitions", "claims", "ablation", "flower")
    }
    node.update(
        task=task,
        partition=partition,
        partition_spec=FEDRE["partitions"][partition],
        seed=int(seed),
    )
    return json.dumps(node, sort_keys=True)


def fedre_runs(suffix="", ext="csv"):
    """Every simulation job's run table (suffix "_comm": its communication table)."""
    return [
        f"results/fedre/runs/{task}_{partition}_s{seed}{suffix}.{ext}"
        for task in FEDRE["tasks"]
        for partition in FEDRE["partitions"]
        for seed in SEEDS
    ]


def fedre_ablation_params(seed):
    """The ablation's --params: the simulation's on fedre.ablation's task and partition,
    with the variants."""
    ablation = FEDRE["ablation"]
    node = json.loads(
        fedre_simulate_params(ablation["task"], ablation["partition"], seed)
    )
    node["variants"] = ablation["variants"]
    return json.dumps(node, sort_keys=True)


def fedre_flower_params(task, partition, seed, algorithm):
    """The Flower run's --params: the simulation's, with one `algorithm`."""
    node = json.loads(fedre_simulate_params(task, partition, seed))
    node.pop("algorithms")
    node.pop("privacy")
    node["algorithm"] = algorithm
    return json.dumps(node, sort_keys=True)
