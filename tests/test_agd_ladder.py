"""The scale ladder: rung configs (repro.agd.workflow) and the ladder table and figure
(repro.agd.ladder)."""

from __future__ import annotations

import copy
import json

import matplotlib.image
import pandas as pd
import pytest

from repro.agd import ladder
from repro.agd.table import COLUMNS
from repro.agd.workflow import checks, ladder_rungs, rung_config, targets
from repro.core.config import load_yaml
from repro.core.errors import ReproInputError
from repro.core.results import read_table

TINY = load_yaml("config.yaml")


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


def with_rungs(rungs):
    cfg = copy.deepcopy(TINY)
    cfg["agd"]["ladder"] = {"rungs": rungs}
    return cfg


def test_a_rung_is_the_agd_section_with_its_overlay_merged():
    cfg = with_rungs({"b8": {"base": {"model": {"num_layers": 8}}}, "off": None})
    assert ladder_rungs(cfg) == ["b8"]  # a rung set to null is off
    rung = rung_config(cfg, "b8")
    assert rung["base"]["model"]["num_layers"] == 8
    # Everything else is the main run's, and the rung has no ladder of its own.
    assert (
        rung["base"]["model"]["attention_head_dim"]
        == TINY["agd"]["base"]["model"]["attention_head_dim"]
    )
    assert rung["distill"] == TINY["agd"]["distill"] and "ladder" not in rung
    assert "results/agd_ladder.csv" in targets(cfg)
    assert "results/agd_ladder.csv" not in targets(with_rungs({"b8": None}))
    assert checks(cfg) == []


@pytest.mark.parametrize(
    ("overlay", "needle"),
    [
        ({"base": {"model": {"num_layerz": 8}}}, "agd.ladder.rungs.b8.base.model.num_layerz"),
        ({"base": {"pretrained": "facebook/DiT-XL-2-256"}}, "reuses the main run's pretrained"),
        # Cross-field checks run on the merge and name the rung.
        ({"distill": {"adapter_types": ["adaln"]}}, "agd.ladder.rungs.b8.distill.adapter_type"),
        ({"eval": {"guidance_scales": [5.0]}}, "agd.ladder.rungs.b8.eval.guidance_scales"),
    ],
)
def test_bad_rungs_are_named(overlay, needle):
    errors = checks(with_rungs({"b8": overlay}))
    assert any(needle in e for e in errors), errors


def headline(ratios_by_type, cfg_fid=20.0, base_params=1000):
    """A headline table: CFG at two scales, AGD of each type with the given ratios per seed
    (val FID selects w = 1.5 for both; the w = 3 test FIDs are traps)."""
    rows = []
    for seed in range(3):
        for w in (1.5, 3.0):
            trap = 0.0 if w == 1.5 else 1.0
            rows.append(row("cfg", "-", w, seed, cfg_fid - 10 * trap, cfg_fid + trap, base_params))
            for kind, ratios in ratios_by_type.items():
                fid = ratios[seed] * cfg_fid
                rows.append(row("agd", kind, w, seed, fid - 10 * trap, fid + trap, base_params))
    return pd.DataFrame(rows)[COLUMNS]


def row(method, kind, w, seed, fid, fid_val, base_params):
    return dict(
        method=method,
        adapter_type=kind,
        checkpoint="base",
        guidance_scale=w,
        steps=10,
        nfe=10,
        seed=seed,
        fid=fid,
        fid_val=fid_val,
        inception_score=5.0,
        images_per_s=1.0,
        trainable_params=0 if method == "cfg" else 30,
        base_params=base_params,
        fidelity_mse=float("nan") if method == "cfg" else 0.1 * w,
        fidelity_feature=float("nan") if method == "cfg" else 1.0,
    )


def test_rung_rows_compare_each_adapter_type_with_cfg_at_val_selected_w():
    table = headline({"offset": [1.2, 1.3, 1.4], "adaln": [1.0, 1.0, 1.02]})
    rows = {r["adapter_type"]: r for r in ladder.rung_rows(table, "main", 4)}
    assert list(rows) == ["offset", "adaln"]  # claims' adapter order
    offset, adaln = rows["offset"], rows["adaln"]
    assert offset["w_agd"] == offset["w_cfg"] == 1.5  # not the w = 3 traps
    assert offset["ratio_mean"] == pytest.approx(1.3) and offset["verdict"] == "does not hold"
    assert adaln["ratio_mean"] == pytest.approx(1.0067, abs=1e-4) and adaln["verdict"] == "holds"
    assert offset["fid_cfg"] == pytest.approx(20.0) and offset["fid_agd"] == pytest.approx(26.0)
    assert offset["adapter_fraction"] == pytest.approx(0.03)
    assert offset["fidelity_mse"] == pytest.approx(0.15)  # at CFG's selected w


def test_the_stage_writes_the_table_and_figure(tmp_path):
    paths = []
    for name, params, ratios in (("main", 1000, [1.3] * 3), ("b8", 2000, [1.1] * 3)):
        path = tmp_path / f"{name}.csv"
        headline({"offset": ratios, "adaln": [1.0] * 3}, base_params=params).to_csv(
            path, index=False
        )
        paths.append(str(path))
    params = {"rungs": [{"name": "main", "num_layers": 4}, {"name": "b8", "num_layers": 8}]}
    out, figure = tmp_path / "ladder.csv", tmp_path / "ladder.png"
    ladder.main(
        [
            *("--tables", *paths, "--out", str(out), "--figure", str(figure)),
            *("--params", json.dumps(params), "--device", "cpu"),
        ]
    )
    table = read_table(out, required=ladder.COLUMNS)
    assert list(table.rung) == ["main", "main", "b8", "b8"]
    assert list(table.num_layers) == [4, 4, 8, 8]
    assert table.set_index(["rung", "adapter_type"]).ratio_mean.to_dict() == pytest.approx(
        {
            ("main", "offset"): 1.3,
            ("main", "adaln"): 1.0,
            ("b8", "offset"): 1.1,
            ("b8", "adaln"): 1.0,
        }
    )
    image = matplotlib.image.imread(figure)
    assert image.shape[0] > 300 and image.shape[1] > 600
    with pytest.raises(ReproInputError, match="1 tables for 2 rungs"):
        ladder.main(
            [
                *("--tables", paths[0], "--out", str(out), "--figure", str(figure)),
                *("--params", json.dumps(params), "--device", "cpu"),
            ]
        )


def test_fidelity_is_read_at_cfgs_selected_w_not_agds():
    table = headline({"offset": [1.2, 1.2, 1.2]})
    agd_at_3 = (table.method == "agd") & (table.guidance_scale == 3.0)
    table.loc[agd_at_3, "fid_val"] = 1.0  # AGD's val now picks w = 3, CFG's stays 1.5
    (row,) = ladder.rung_rows(table, "main", 4)
    assert row["w_agd"] == 3.0 and row["w_cfg"] == 1.5
    assert row["fidelity_mse"] == pytest.approx(0.15)  # 0.1 * w at w = 1.5, not 0.3
