# ProbeX's helpers (rules/probex.smk includes this file): its config and the files
# each job needs. Functions only: `snakemake --lint` wants helpers and rules in
# separate files.
#
# One zoo per tree (data/probex/zoo/{tree}/: manifest.json and one safetensors file
# per fine-tuned model), grown from the tree's base model (models/foundation/
# backbones/{tree}.safetensors, pre-trained on the glyph corpus).
from repro.probex import workflow as probex_workflow

PROBEX = config["probex"]
PROBEX_LABEL = PAPERS["probex"].label  # the report's category
PROBEX_TREES = {tree["name"]: tree for tree in PROBEX["trees"]}


def probex_zoo_dir(tree):
    return f"data/probex/zoo/{tree}"


def probex_zoos():
    """Every tree's zoo directory, in config order."""
    return [probex_zoo_dir(tree) for tree in PROBEX_TREES]


def probex_zoo_args(input):
    """--zoo <manifest> for every zoo directory of the job's input."""
    return " ".join(
        f"--zoo {shlex.quote(os.path.join(path, 'manifest.json'))}"
        for path in input.zoos
    )


def probex_tree(tree):
    """A tree's config entry, as the stages read it (name, arch, seed, layer)."""
    return dict(PROBEX_TREES[tree])


def probex_params(*keys, seed=None, **extra):
    """The sections `keys` of probex as JSON for --params, with the class names, the
    tree list and `extra` beside them."""
    node = {key: PROBEX[key] for key in keys}
    node.update(
        classnames=PROBEX["classnames"],
        num_classes=PROBEX["num_classes"],
        subset_size=PROBEX["subset_size"],
        trees=PROBEX["trees"],
        **extra,
    )
    if seed is not None:
        node["seed"] = int(seed)
    return json.dumps(node, sort_keys=True)


def probex_runs(kind):
    """Every seed's table of one probe stage (kind: probe, layers or zeroshot)."""
    return [f"results/probex/runs/{kind}_s{seed}.csv" for seed in SEEDS]
