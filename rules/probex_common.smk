# ProbeX's helpers (rules/probex.smk includes this file): its config and the files
# each job needs. Functions only: `snakemake --lint` wants helpers and rules in
# separate files.
#
# One zoo per tree (data/probex/zoo/{tree}/manifest.json), whichever way it is made:
# - a generated tree: one safetensors file per fine-tuned model beside the manifest,
#   grown by probex_zoo from the tree's base model, which probex_base pre-trains on the
#   glyph corpus (models/foundation/backbones/{tree}.safetensors);
# - an imported tree (its entry names zoo_dir, Model-J's way): probex_zoo_import writes
#   a manifest naming the existing models where they are, and base.safetensors beside
#   it when the tree names no base (the mean of its train models).
# Each rule's `tree` wildcard matches its own trees only (PROBEX_GENERATED_PATTERN,
# PROBEX_IMPORTED_PATTERN): one rule per zoo, and no probex_base for an imported tree.
import re

from repro.probex import workflow as probex_workflow

PROBEX = config["probex"]
PROBEX_LABEL = PAPERS["probex"].label  # the report's category
PROBEX_TREES = {tree["name"]: tree for tree in PROBEX["trees"]}
PROBEX_GENERATED = probex_workflow.generated_trees(PROBEX)
PROBEX_IMPORTED = probex_workflow.imported_trees(PROBEX)


def probex_pattern(names):
    """A wildcard constraint matching exactly `names` (none: a pattern that matches nothing)."""
    return "|".join(map(re.escape, names)) or "(?!)"


PROBEX_GENERATED_PATTERN = probex_pattern(PROBEX_GENERATED)
PROBEX_IMPORTED_PATTERN = probex_pattern(PROBEX_IMPORTED)


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


def probex_import_input(wildcards):
    """An imported tree's files: its models, and its base and splits file if it names them."""
    tree = PROBEX_TREES[wildcards.tree]
    files = {"models": [str(p) for p in probex_workflow.model_files(tree["zoo_dir"])]}
    for key in ("base", "splits"):
        if key in tree:
            files[key] = tree[key]
    return files


def probex_import_args(wildcards, input):
    """--zoo-dir, and --base / --splits where the tree names them, quoted for the shell."""
    args = ["--zoo-dir", PROBEX_TREES[wildcards.tree]["zoo_dir"]]
    for key in ("base", "splits"):
        if key in input.keys():
            args += [f"--{key}", input[key]]
    return " ".join(shlex.quote(str(arg)) for arg in args)


def probex_import_params(tree):
    """The import stage's --params: the tree's entry, its class names, the drawn split."""
    entry = PROBEX_TREES[tree]
    classnames = probex_workflow.tree_classnames(PROBEX, entry)
    node = {
        **entry,
        "tree": tree,
        "classnames": classnames,
        "num_classes": len(classnames),
        "zoo": {"split": PROBEX["zoo"]["split"]},
    }
    return json.dumps(node, sort_keys=True)


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
