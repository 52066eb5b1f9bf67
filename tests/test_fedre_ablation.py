"""FedRE's ablation: the variants, the stage, its table and figure."""

import json

import pandas as pd
import pytest
import torch
from test_fedre_simulate import PARAMS, args, task_file  # noqa: F401

from repro.core.errors import ReproInputError
from repro.fedre import ablation
from repro.fedre.algorithms import Hyper, entangle_weights
from repro.fedre.plots import ablation_figure
from repro.fedre.table import ABLATION_COLUMNS, ablation_table


def test_variants_change_one_key_of_fedre():
    hypers = ablation.variant_hypers(
        Hyper(), {"fixed": {"resample_weights": False}, "onehot": {"entangle": "onehot"}}
    )
    assert list(hypers) == ["fedre", "fixed", "onehot"]
    assert hypers["fedre"] == Hyper()
    assert hypers["fixed"].resample_weights is False and hypers["fixed"].entangle == "random"
    assert hypers["onehot"].entangle == "onehot" and hypers["onehot"].resample_weights
    with pytest.raises(ReproInputError, match="fedre.ablation.variants.x.*'lr'"):
        ablation.variant_hypers(Hyper(), {"x": {"lr": 0.1}})
    with pytest.raises(ReproInputError, match="fedre.ablation.variants.fedre"):
        ablation.variant_hypers(Hyper(), {"fedre": {"entangle": "uniform"}})


def test_simplex_weights_are_uniform_on_the_simplex():
    """Dirichlet(1, 1, 1): each weight's mean is 1/3 and P(w_0 > 1/2) = (1/2)^2 = 1/4."""
    gen = torch.Generator().manual_seed(0)
    w = torch.stack([entangle_weights(3, "simplex", gen) for _ in range(20000)])
    assert torch.allclose(w.sum(1), torch.ones(len(w)))
    assert torch.allclose(w.mean(0), torch.full((3,), 1 / 3), atol=0.01)
    assert (w[:, 0] > 0.5).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # U(0,1) normalised is not: P(w_0 > 1/2) = P(u_0 > u_1 + u_2) = 1/6.
    r = torch.stack([entangle_weights(3, "random", gen) for _ in range(20000)])
    assert (r[:, 0] > 0.5).float().mean().item() == pytest.approx(1 / 6, abs=0.01)


def test_stage_runs_every_variant_from_the_same_clients(tmp_path, task_file, monkeypatch):  # noqa: F811
    monkeypatch.setenv("REPRO_MLFLOW", "0")
    params = {**PARAMS, "variants": {"fixed": {"resample_weights": False}}}
    cli = args(tmp_path, task_file, params)
    cli = [a for i, a in enumerate(cli) if a != "--comm-out" and cli[i - 1] != "--comm-out"]
    cli = [
        a for i, a in enumerate(cli) if a != "--checkpoint-dir" and cli[i - 1] != "--checkpoint-dir"
    ]
    ablation.main(cli)
    table = pd.read_csv(tmp_path / "run.csv")
    assert list(table.columns) == ABLATION_COLUMNS
    assert table.variant.tolist() == ["fedre", "fixed"]
    assert table.resample_weights.tolist() == [True, False]
    metrics = json.loads((tmp_path / "run.json").read_text())
    assert set(metrics) == {"last_mean_accuracy_fedre", "last_mean_accuracy_fixed"}


def rows(seed, variants=("fedre", "fixed"), acc=0.5):
    return pd.DataFrame(
        [
            {"task": "g", "partition": "dir", "variant": v, "entangle": "random",
             "resample_weights": v != "fixed", "seed": seed, "rounds": 3,
             "final_accuracy": acc, "last_rounds": 2, "last_mean_accuracy": acc}
            for v in variants
        ],
        columns=ABLATION_COLUMNS,
    )  # fmt: skip


def test_ablation_table_checks(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    rows(0).to_csv(a, index=False)
    rows(1).to_csv(b, index=False)
    assert len(ablation_table([a, b])) == 4
    rows(0).to_csv(b, index=False)
    with pytest.raises(ReproInputError, match="twice|2 times|appears"):
        ablation_table([a, b])
    rows(1, variants=("fixed",)).to_csv(b, index=False)
    with pytest.raises(ReproInputError, match="seeds \\[1\\] lack the reference"):
        ablation_table([a, b])
    rows(1, acc=1.2).to_csv(b, index=False)
    with pytest.raises(ReproInputError, match="last_mean_accuracy|final_accuracy"):
        ablation_table([a, b])


def test_ablation_figure_draws_the_seed_means():
    table = pd.concat([rows(0, acc=0.5), rows(1, acc=0.7)])
    fig = ablation_figure(table)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([60.0, 60.0])
    assert ablation_figure(table.iloc[0:0]).axes  # empty: a "no rows" panel
