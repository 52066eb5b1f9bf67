"""A tree read from models that exist (Model-J's way): the import stage through its command
line (manifest, fixed and drawn splits, labels, the estimated or given base, files named
where they are), every bad input refused naming the file or key, the config checks of
imported trees beside generated ones, the router on imported zoos, and the Snakemake plan
(probex_zoo_import for an imported tree, no probex_base for it)."""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from repro.core.config import load_yaml, schema_errors, validate_config
from repro.core.errors import ReproInputError
from repro.probex import import_zoo, probe
from repro.probex import workflow as probex_workflow
from repro.probex.zoo import load_base_state, load_layer, load_zoo

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["zero", "one", "two", "three", "four", "five"]
LAYER = "encoder.layer.1.attention.output.dense"


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def write_modelj(directory, n=12, *, seed=0, shift=0.0, classes=6, k=3):
    """n Model-J-style files (plain safetensors, Hugging Face names, a `classifier` head,
    classes as a JSON string under dataset_chosen_targets); returns {file name: labels}
    and the base they were fine-tuned from."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    base = {
        "embeddings.patch.weight": torch.randn(8, 1, 2, 2, generator=gen) + shift,
        "encoder.layer.0.attention.output.dense.weight": torch.randn(8, 8, generator=gen),
        f"{LAYER}.weight": torch.randn(8, 8, generator=gen) + shift,
        f"{LAYER}.bias": torch.zeros(8),
        "classifier.weight": torch.randn(classes, 8, generator=gen),
    }
    labels = {}
    for i in range(n):
        chosen = sorted(torch.randperm(classes, generator=gen)[:k].tolist())
        state = {key: v + 0.01 * torch.randn(v.shape, generator=gen) for key, v in base.items()}
        name = f"model_{i:03d}.safetensors"
        save_file(state, directory / name, {"dataset_chosen_targets": json.dumps(chosen)})
        labels[name] = chosen
    return labels, base


FIXED = {
    f"model_{i:03d}.safetensors": s
    for i, s in enumerate(["train"] * 7 + ["val"] * 2 + ["test"] * 3)
}


def params(**extra):
    return {
        "tree": "mj",
        "arch": "vit",
        "layer": LAYER,
        "classnames": NAMES,
        "zoo": {"split": {"val": 0.25, "test": 0.25}},
        **extra,
    }


def run_import(zoo_dir, out, *, base=None, splits=None, **extra):
    """The stage through its command line; returns (zoo, metrics)."""
    argv = ["--zoo-dir", str(zoo_dir), "--out", str(out), "--metrics", str(out) + ".json"]
    if base is not None:
        argv += ["--base", str(base)]
    if splits is not None:
        argv += ["--splits", str(splits)]
    import_zoo.main([*argv, "--params", json.dumps(params(**extra))])
    return load_zoo(Path(out) / "manifest.json"), json.loads(Path(str(out) + ".json").read_text())


def write_json(path, value):
    Path(path).write_text(json.dumps(value))
    return path


# --------------------------------------------------------------------------- the stage


def test_fixed_splits_labels_layers_and_estimated_base(tmp_path):
    labels, _ = write_modelj(tmp_path / "modelj")
    splits = write_json(tmp_path / "splits.json", FIXED)
    zoo, metrics = run_import(tmp_path / "modelj", tmp_path / "zoo", splits=splits)

    assert zoo.tree == "mj" and zoo.arch == "vit" and zoo.classnames == NAMES
    assert zoo.model_kind is None  # foreign files: no repro kind to check
    assert [zoo.path(m).name for m in zoo.models] == sorted(labels)
    assert [m["labels"] for m in zoo.models] == [labels[n] for n in sorted(labels)]
    assert [m["split"] for m in zoo.models] == [FIXED[n] for n in sorted(labels)]
    # Heads are not layers; a conv's weight is read as out x in*kh*kw.
    assert zoo.layers == {
        "embeddings.patch": (8, 4),
        "encoder.layer.0.attention.output.dense": (8, 8),
        LAYER: (8, 8),
    }
    # The models are named where they are (an absolute directory stays absolute): no copy.
    raw = json.loads((tmp_path / "zoo/manifest.json").read_text())
    assert raw["models"][0]["file"] == str(tmp_path / "modelj/model_000.safetensors")
    assert not list((tmp_path / "zoo").glob("model_*"))
    assert raw["splits_source"] == str(splits)

    X, Y, split_list = load_layer(zoo, LAYER)
    assert X.shape == (12, 8, 8) and Y.sum(1).tolist() == [3.0] * 12
    assert split_list == [FIXED[n] for n in sorted(labels)]

    # No base given: the mean of the TRAIN models, beside the manifest.
    assert raw["base"] == "base.safetensors" and "mean of 7 train" in raw["base_source"]
    train = [zoo.path(m) for m in zoo.models if m["split"] == "train"]
    expected = torch.stack([load_file(f)[f"{LAYER}.weight"] for f in train]).mean(0)
    assert torch.allclose(load_base_state(zoo)[f"{LAYER}.weight"], expected, atol=1e-6)
    assert metrics["models"] == 12 and metrics["base_estimated"] == 1
    assert (metrics["models_train"], metrics["models_val"], metrics["models_test"]) == (7, 2, 3)
    assert metrics["layers"] == 3 and metrics["classes"] == len(NAMES)
    assert metrics["classes_per_model_mean"] == 3.0


def test_the_split_file_may_list_files_per_split(tmp_path):
    write_modelj(tmp_path / "modelj")
    by_split = {s: [n for n, v in FIXED.items() if v == s] for s in ("train", "val", "test")}
    splits = write_json(tmp_path / "splits.json", by_split)
    zoo, _ = run_import(tmp_path / "modelj", tmp_path / "zoo", splits=splits)
    assert zoo.splits == [FIXED[n] for n in sorted(FIXED)]


def test_drawn_splits_are_reproducible_from_the_seed(tmp_path):
    write_modelj(tmp_path / "modelj", n=20)
    first, _ = run_import(tmp_path / "modelj", tmp_path / "a", seed=3)
    again, _ = run_import(tmp_path / "modelj", tmp_path / "b", seed=3)
    other, _ = run_import(tmp_path / "modelj", tmp_path / "c", seed=4)
    assert first.splits == again.splits != other.splits
    assert [first.splits.count(s) for s in ("train", "val", "test")] == [10, 5, 5]
    # The base is the mean of each draw's own train models.
    assert not torch.equal(
        load_base_state(first)[f"{LAYER}.weight"], load_base_state(other)[f"{LAYER}.weight"]
    )


def test_a_given_base_is_named_and_checked(tmp_path):
    _, base = write_modelj(tmp_path / "modelj")
    save_file(base, tmp_path / "base.safetensors")
    zoo, metrics = run_import(
        tmp_path / "modelj", tmp_path / "zoo", base=tmp_path / "base.safetensors"
    )
    assert zoo.base == tmp_path / "base.safetensors" and metrics["base_estimated"] == 0
    assert torch.equal(load_base_state(zoo)[f"{LAYER}.weight"], base[f"{LAYER}.weight"])
    assert not (tmp_path / "zoo/base.safetensors").exists()
    # A base saved under other tensor names (a hub model's "vit." prefix) cannot route.
    save_file({f"vit.{k}": v for k, v in base.items()}, tmp_path / "hub.safetensors")
    with pytest.raises(ReproInputError, match=rf"hub\.safetensors: .*no tensor {LAYER}\.weight"):
        run_import(tmp_path / "modelj", tmp_path / "zoo2", base=tmp_path / "hub.safetensors")
    with pytest.raises(ReproInputError, match=r"nope\.safetensors"):
        run_import(tmp_path / "modelj", tmp_path / "zoo3", base=tmp_path / "nope.safetensors")


def test_a_relative_directory_is_named_relative_and_the_workdir_may_move(tmp_path, monkeypatch):
    work = tmp_path / "work"
    write_modelj(work / "modelj")
    monkeypatch.chdir(work)
    run_import("modelj", "data/probex/zoo/mj", splits=write_json(work / "s.json", FIXED))
    raw = json.loads((work / "data/probex/zoo/mj/manifest.json").read_text())
    assert raw["models"][0]["file"] == "../../../../modelj/model_000.safetensors"
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    shutil.rmtree(work / "modelj")
    zoo = load_zoo(moved / "data/probex/zoo/mj/manifest.json")
    assert load_layer(zoo, LAYER)[0].shape == (12, 8, 8)


# --------------------------------------------------------------------------- bad input


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ReproInputError, match=r"nowhere: not a directory"):
        run_import(tmp_path / "nowhere", tmp_path / "zoo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReproInputError, match=r"empty: no \.safetensors model files"):
        run_import(tmp_path / "empty", tmp_path / "zoo")


def test_a_model_without_its_classes_is_named(tmp_path):
    _, base = write_modelj(tmp_path / "modelj")
    save_file(base, tmp_path / "modelj/model_005.safetensors")  # no metadata
    with pytest.raises(
        ReproInputError, match=r"model_005\.safetensors: metadata lacks .*dataset_chosen_targets"
    ):
        run_import(tmp_path / "modelj", tmp_path / "zoo")
    save_file(
        base, tmp_path / "modelj/model_005.safetensors", {"dataset_chosen_targets": '["cat"]'}
    )
    with pytest.raises(ReproInputError, match=r"model_005\.safetensors: .*class indices"):
        run_import(tmp_path / "modelj", tmp_path / "zoo")


def test_classes_beyond_the_class_names_are_named(tmp_path):
    write_modelj(tmp_path / "modelj", classes=8)  # classes up to 7, six names
    with pytest.raises(ReproInputError, match=r"model_\d+\.safetensors: classes \[[67]"):
        run_import(tmp_path / "modelj", tmp_path / "zoo")


def test_split_files_that_do_not_match_the_directory_are_named(tmp_path):
    write_modelj(tmp_path / "modelj")
    extra = write_json(tmp_path / "extra.json", {**FIXED, "model_999.safetensors": "test"})
    with pytest.raises(ReproInputError, match=r"extra\.json: names \['model_999\.safetensors'\]"):
        run_import(tmp_path / "modelj", tmp_path / "zoo", splits=extra)
    short = write_json(tmp_path / "short.json", {k: v for k, v in FIXED.items() if "011" not in k})
    with pytest.raises(
        ReproInputError, match=r"model_011\.safetensors: no split given.*short\.json"
    ):
        run_import(tmp_path / "modelj", tmp_path / "zoo", splits=short)
    bad = write_json(tmp_path / "bad.json", {**FIXED, "model_000.safetensors": "holdout"})
    with pytest.raises(ReproInputError, match=r"bad\.json: split 'holdout' of model_000"):
        run_import(tmp_path / "modelj", tmp_path / "zoo", splits=bad)
    no_test = write_json(tmp_path / "no_test.json", {k: "train" for k in FIXED})
    with pytest.raises(ReproInputError, match=r"no_test\.json: no val / test models"):
        run_import(tmp_path / "modelj", tmp_path / "zoo", splits=no_test)


def test_an_unknown_layer_and_a_model_of_another_shape_are_named(tmp_path):
    _, base = write_modelj(tmp_path / "modelj")
    with pytest.raises(
        ReproInputError, match=r"probex\.trees\.layer: 'blocks\.9'.*their layers are"
    ):
        run_import(tmp_path / "modelj", tmp_path / "zoo", layer="blocks.9")
    odd = {**base, f"{LAYER}.weight": torch.zeros(8, 4)}
    save_file(odd, tmp_path / "modelj/model_004.safetensors", {"dataset_chosen_targets": "[1]"})
    with pytest.raises(
        ReproInputError, match=rf"model_004\.safetensors: tensor {LAYER}\.weight has shape \[8, 4\]"
    ):
        run_import(tmp_path / "modelj", tmp_path / "zoo")


def test_the_cli_exits_2_with_one_line_naming_the_directory(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "repro.probex.import_zoo",
            "--zoo-dir",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "zoo"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--params",
            json.dumps(params()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'nowhere'}")


# --------------------------------------------------------------------------- the router


def test_the_router_sends_imported_models_to_their_tree_by_the_estimated_base(tmp_path):
    """Two imported trees (no base given): the experts' router reads the train-mean bases
    and sends every val and test model to its own tree."""
    zoos = []
    for index, tree in enumerate(("mj_a", "mj_b")):
        write_modelj(tmp_path / tree, n=16, seed=index, shift=index)
        zoo, _ = run_import(tmp_path / tree, tmp_path / "zoo" / tree, tree=tree, seed=index)
        zoos.append(zoo)
    settings = {
        "seed": 0,
        "trees": [{"name": "mj_a", "layer": LAYER}, {"name": "mj_b", "layer": LAYER}],
        "probe": {
            "probex": {"rank_u": 2, "rank_v": 2, "rank_t": 4},
            "statnn": {"hidden": 4},
            "epochs": 2,
            "batch_size": 16,
            "lr": 0.01,
            "weight_decay": 0.0,
        },
    }
    table = probe.run_probes(zoos, settings)
    experts = table[table.method == "probex_experts"]
    assert experts.tree.tolist() == ["mj_a", "mj_b"]
    assert experts.routing_accuracy.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- config


def tiny():
    return load_yaml(ROOT / "config.yaml")


def imported(tmp_path, **extra):
    write_modelj(tmp_path / "modelj", classes=10)
    return {
        "name": "modelj",
        "arch": "supvit",  # a free label for an imported tree
        "layer": LAYER,
        "zoo_dir": str(tmp_path / "modelj"),
        **extra,
    }


def with_trees(*trees):
    cfg = tiny()
    cfg["probex"]["trees"] = [*cfg["probex"]["trees"], *trees]
    return cfg


def test_an_imported_tree_beside_generated_ones_is_accepted(tmp_path):
    splits = write_json(tmp_path / "s.json", FIXED)
    save_file({"x.weight": torch.zeros(2, 2)}, tmp_path / "base.safetensors")
    tree = imported(tmp_path, splits=str(splits), base=str(tmp_path / "base.safetensors"))
    cfg = with_trees(tree)
    validate_config(cfg)  # no seed needed: the splits are fixed
    generated = [t["name"] for t in tiny()["probex"]["trees"]]
    assert probex_workflow.generated_trees(cfg["probex"]) == generated
    assert probex_workflow.imported_trees(cfg["probex"]) == [tree["name"]]
    names = list(tiny()["probex"]["classnames"])
    validate_config(with_trees({**tree, "classnames": names}))


BAD_TREES = [
    # (the tree's entry: a function of tmp_path, words the message must contain)
    (lambda p: {**imported(p), "basee": "x"}, ["probex.trees.3", "'basee' was unexpected"]),
    (
        lambda p: {**imported(p), "zoo_dir": str(p / "no")},
        ["probex.trees[3].zoo_dir", "not a directory"],
    ),
    (
        lambda p: {**imported(p), "base": str(p / "no.safetensors")},
        ["probex.trees[3].base", "not a file"],
    ),
    (
        lambda p: {**imported(p), "splits": str(p / "no.json")},
        ["probex.trees[3].splits", "not a file"],
    ),
    (
        lambda p: {**imported(p), "classnames": ["cat", "dog"]},
        ["probex.trees[3].classnames", "differ from probex.trees[0]"],
    ),
    (
        lambda p: {"name": "g", "arch": "vit", "seed": 0, "layer": "x", "base": str(p)},
        ["probex.trees[3].base", "only an imported tree"],
    ),
    (
        lambda p: {"name": "g", "arch": "vit", "seed": 0, "layer": "x", "splits": "s.json"},
        ["probex.trees[3].splits", "only an imported tree"],
    ),
    (
        lambda p: {"name": "g", "arch": "vit", "layer": "x"},
        ["probex.trees.3", "'seed' is a required"],
    ),
    (
        lambda p: {"name": "g", "arch": "supvit", "seed": 0, "layer": "x"},
        ["probex.trees.3.arch", "'vit'"],
    ),
]


@pytest.mark.parametrize("make,words", BAD_TREES, ids=[str(i) for i in range(len(BAD_TREES))])
def test_a_bad_tree_is_refused_naming_its_key(tmp_path, make, words):
    with pytest.raises(ReproInputError) as err:
        validate_config(with_trees(make(tmp_path)))
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"


def test_an_empty_zoo_dir_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = with_trees({"name": "e", "arch": "x", "layer": "x", "zoo_dir": str(tmp_path / "empty")})
    assert schema_errors(cfg) == []
    with pytest.raises(ReproInputError, match=r"probex\.trees\[3\]\.zoo_dir: .*no \.safetensors"):
        validate_config(cfg)


# --------------------------------------------------------------------------- the plan


def snakemake(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: {rule: jobs}."""
    table = output.split("Job stats:", 1)[1]
    return {
        m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"
    }


def test_the_plan_imports_the_tree_and_builds_no_base_for_it(tmp_path):
    smoke = load_yaml(ROOT / "configs/smoke.yaml")
    trees = copy.deepcopy(tiny()["probex"]["trees"][:2])
    tree = {
        "name": "modelj",
        "arch": "vit",
        "layer": LAYER,
        "zoo_dir": str(tmp_path / "data_modelj"),
        "splits": str(write_json(tmp_path / "splits.json", FIXED)),
        "classnames": list(tiny()["probex"]["classnames"]),
    }
    write_modelj(tmp_path / "data_modelj", classes=10)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(json.dumps({"probex": {"trees": [*trees, tree]}}))
    configs = ["--configfile", str(ROOT / "configs/smoke.yaml"), str(overlay)]
    work = tmp_path / "work"
    work.mkdir()
    proc = snakemake(work, "-n", "-p", *configs, "--", "results/probex_accuracy.csv")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = job_counts(proc.stdout)
    assert jobs["probex_zoo_import"] == 1
    assert jobs["probex_base"] == jobs["probex_zoo"] == 2
    assert jobs["probex_probe"] == len(smoke.get("seeds", tiny()["seeds"]))
    assert "backbones/modelj" not in proc.stdout
    assert re.search(r"--zoo-dir \S*data_modelj --splits \S*splits\.json", proc.stdout)
    # The imported zoo itself, for real: one cheap job, nothing upstream.
    proc = snakemake(work, "--cores", "1", *configs, "--", "data/probex/zoo/modelj")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    zoo = load_zoo(work / "data/probex/zoo/modelj/manifest.json")
    assert zoo.splits == [FIXED[n] for n in sorted(FIXED)] and zoo.base.name == "base.safetensors"
    metrics = json.loads((work / "results/probex/zoo/modelj.json").read_text())
    assert metrics["models"] == 12 and metrics["base_estimated"] == 1
