"""Fidelity to CFG (repro.agd.fidelity), its join into the headline table, the noise
streams that make samples comparable, and the claims built on them (issue 10)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from repro.agd import evaluate, trajectories
from repro.agd.claims import fidelity_claim, transfer_claim
from repro.agd.fidelity import fidelity_table, pairwise_fidelity, read_samples
from repro.agd.table import COLUMNS, EVAL_COLUMNS, KEYS, join_fidelity
from repro.core.classifier import DigitClassifier, save_classifier
from repro.core.diffusion import (
    SAMPLING_STREAM_STRIDE,
    DiTDenoiser,
    sample_generator,
    scheduler_from_params,
)
from repro.core.distributed import STEP_STRIDE, step_generator
from repro.core.errors import ReproInputError
from repro.core.io import save_tensors
from repro.core.modelio import save_dit

SAMPLER = {"kind": "ddim", "num_train_timesteps": 1000, "beta_schedule": "linear", "steps": 4}


@pytest.fixture(autouse=True)
def no_mlflow(monkeypatch):
    monkeypatch.setenv("REPRO_MLFLOW", "0")


# ----------------------------------------------------------------------------- noise streams


def test_evaluation_noise_is_not_the_trajectories_or_a_training_steps():
    seed = 0
    draws = {
        "eval": torch.randn(64, generator=sample_generator(seed, 0, "eval")),
        "trajectories": torch.randn(64, generator=sample_generator(seed, 0, "trajectories")),
        "figures": torch.randn(64, generator=sample_generator(seed, 0, "figures")),
        "training step 0": torch.randn(64, generator=step_generator(seed, 0)),
    }
    names = list(draws)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.equal(draws[a], draws[b]), (a, b)
    # Seeds of different streams never meet: the strides keep them apart.
    assert sample_generator(1, 0, "eval").initial_seed() == STEP_STRIDE + 2 * SAMPLING_STREAM_STRIDE
    with pytest.raises(ValueError, match="outside"):
        sample_generator(0, SAMPLING_STREAM_STRIDE)
    with pytest.raises(ValueError, match="stream"):
        sample_generator(0, 0, "test")


def test_standard_trajectories_per_path_keep_one_noise_per_path(tiny_dit):
    """per_path: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with ONE eps per path;
    per_step: a fresh eps at every step."""
    scheduler = scheduler_from_params(SAMPLER)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(20, 1, 8, 8, generator=gen) * 2 - 1
    image_labels = torch.arange(20) % 10
    labels = torch.tensor([0, 1, 2])
    w = torch.tensor([1.5, 2.0, 2.5])
    recovered = {}
    for noise in ("per_path", "per_step"):
        out = Collect()
        trajectories.standard_trajectories(
            DiTDenoiser(tiny_dit()), scheduler, images, image_labels, labels, w,
            SAMPLER["steps"], 10, 8, seed=0, out=out, noise=noise,
        )  # fmt: skip
        data = out.data()
        abar = scheduler.alphas_cumprod[data["t"]].view(-1, 1, 1, 1)
        x0 = find_x0(images, image_labels, data, abar)
        recovered[noise] = ((data["x_t"] - abar.sqrt() * x0) / (1 - abar).sqrt()).view(
            SAMPLER["steps"], len(labels), -1
        )
    per_path = recovered["per_path"]
    torch.testing.assert_close(per_path, per_path[:1].expand_as(per_path), atol=1e-4, rtol=0)
    assert not torch.allclose(recovered["per_step"][0], recovered["per_step"][1], atol=1e-2)
    with pytest.raises(ReproInputError, match="standard_noise"):
        trajectories.standard_trajectories(
            None, scheduler, images, image_labels, labels, w, 4, 10, 8, 0, Collect(), "bad"
        )


class Collect:
    """A ShardWriter stand-in that keeps what it is given."""

    def __init__(self):
        self.parts = []

    def add(self, **fields):
        self.parts.append(fields)

    def data(self):
        return {k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]}


def find_x0(images, image_labels, data, abar):
    """The real image each row was noised from: the candidate of its class that best
    explains x_t at the row's lowest-noise step (exact match up to noise)."""
    n_paths = int((data["t"] == data["t"][0]).sum())
    steps = len(data["t"]) // n_paths
    x_t = data["x_t"].view(steps, n_paths, *images.shape[1:])
    t_abar = abar.view(steps, n_paths)
    last = int(torch.argmax(t_abar[:, 0]))  # the least noisy step
    chosen = []
    for p in range(n_paths):
        y = int(data["labels"][p])
        pool = images[image_labels == y]
        a = t_abar[last, p]
        residual = (x_t[last, p] - a.sqrt() * pool).flatten(1).norm(dim=1)
        chosen.append(pool[int(torch.argmin(residual))])
    return torch.stack(chosen).repeat(steps, 1, 1, 1)


# ----------------------------------------------------------------------------- fidelity


def test_pairwise_fidelity_by_hand():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.ones(2, 1, 2, 2)
    b[1] = 3.0

    def features(x):  # two features: the mean and the max pixel
        flat = x.flatten(1)
        return torch.stack([flat.mean(1), flat.max(1).values], dim=1)

    result = pairwise_fidelity(a, b, features)
    assert result["fidelity_mse"] == pytest.approx((1 + 9) / 2)
    # Sample 0: features (0,0) vs (1,1): sqrt(2); sample 1: vs (3,3): sqrt(18).
    assert result["fidelity_feature"] == pytest.approx((math.sqrt(2) + math.sqrt(18)) / 2)
    with pytest.raises(ReproInputError, match="cannot pair"):
        pairwise_fidelity(a, b[:1], features)


def key(method, w, seed=0, kind="-", ckpt="base"):
    return dict(method=method, adapter_type=kind, checkpoint=ckpt, guidance_scale=w, seed=seed)


def test_fidelity_pairs_each_row_with_cfg_at_the_same_seed_and_w():
    def const(v):
        return torch.full((3, 1, 2, 2), float(v))

    samples = [
        (key("cfg", 1.5), const(1)),
        (key("cfg", 3.0), const(2)),
        (key("cfg", 1.5, seed=1), const(10)),
        (key("agd", 1.5, kind="offset"), const(1.5)),
        (key("agd", 3.0, kind="offset"), const(0)),
        (key("agd", 1.5, seed=1, kind="offset"), const(10)),
        (key("agd", 4.0, kind="offset"), const(0)),  # no CFG at w = 4: no row
        (key("none", 1.0), const(0)),  # compared with CFG at every w of its seed
        (key("real", float("nan"), ckpt="data"), const(0)),
    ]
    table = fidelity_table(samples, lambda x: x.flatten(1))
    got = {(r.method, r.seed, r.guidance_scale): r.fidelity_mse for r in table.itertuples()}
    assert got == {
        ("agd", 0, 1.5): pytest.approx(0.25),
        ("agd", 0, 3.0): pytest.approx(4.0),
        ("agd", 1, 1.5): pytest.approx(0.0),
        ("none", 0, 1.5): pytest.approx(1.0),
        ("none", 0, 3.0): pytest.approx(4.0),
    }
    assert list(table.columns) == KEYS + ["fidelity_mse", "fidelity_feature"]


def test_join_fidelity_matches_rows_by_their_whole_key():
    rows = []
    for method, kind in (("cfg", "-"), ("agd", "offset"), ("agd", "adaln")):
        for seed in (0, 1):
            row = {c: 0 for c in EVAL_COLUMNS}
            row.update(key(method, 1.5, seed, kind))
            rows.append(row)
    table = pd.DataFrame(rows)
    fidelity = pd.DataFrame(
        [
            {**key("agd", 1.5 + 1e-9, s, k), "fidelity_mse": m, "fidelity_feature": 2 * m}
            for s, k, m in (
                (0, "offset", 0.1),
                (1, "offset", 0.2),
                (0, "adaln", 0.3),
                (1, "adaln", 0.4),
            )
        ]
    )
    joined = join_fidelity(table, fidelity)
    assert list(joined.columns) == COLUMNS and len(joined) == len(table)
    got = {(r.adapter_type, r.seed): r.fidelity_mse for r in joined.itertuples()}
    assert got[("offset", 1)] == 0.2 and got[("adaln", 0)] == 0.3
    assert math.isnan(got[("-", 0)])
    with pytest.raises(ValueError, match="twice"):
        join_fidelity(table, pd.concat([fidelity, fidelity]))


# ----------------------------------------------------------------------------- claims


def claim_rows(values):
    """values: {(method, checkpoint): fid per seed}, one scale."""
    rows = []
    for (method, ckpt), fids in values.items():
        for seed, fid in enumerate(fids):
            rows.append(
                dict(
                    key(method, 1.5, seed, "-" if method == "cfg" else "offset", ckpt),
                    fid=fid,
                    fid_val=fid,
                    fidelity_mse=fid / 100,
                )
            )
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("derived_agd", "verdict"), [(20.8, "holds"), (21.2, "does not hold")])
def test_transfer_is_judged_relative_to_the_base_gap(derived_agd, verdict):
    # AGD is 1.33x CFG on the base; on the derived checkpoint 20.8/15 = 1.387 is
    # 1.04x that gap (inside 5 %), 21.2/15 = 1.413 is 1.06x (outside).
    table = claim_rows(
        {
            ("agd", "base"): [20.0, 20.0],
            ("cfg", "base"): [15.0, 15.0],
            ("agd", "derived"): [derived_agd, derived_agd],
            ("cfg", "derived"): [15.0, 15.0],
        }
    )
    claim = transfer_claim(table, "offset")
    assert claim.measured_mean == pytest.approx(derived_agd / 20.0)
    assert claim.verdict == verdict


def test_fidelity_claim_compares_cfg_and_standard_trajectories():
    better = claim_rows({("agd", "base"): [1.0, 1.1], ("agd_standard", "base"): [2.0, 2.1]})
    assert fidelity_claim(better, "offset").verdict == "holds"
    worse = claim_rows({("agd", "base"): [3.0, 3.1], ("agd_standard", "base"): [2.0, 2.1]})
    claim = fidelity_claim(worse, "offset")
    assert claim.verdict == "does not hold"
    assert claim.measured_mean == pytest.approx((3.0 / 2.0 + 3.1 / 2.1) / 2)


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_dit):
    """CFG, no guidance and zero-init adapters of two types evaluated on one base."""
    from repro.agd.distill import adapters_for
    from repro.agd.model import save_adapters

    root = tmp_path_factory.mktemp("fidelity")
    base = tiny_dit(seed=3)
    save_dit(base, root / "base")
    gen = torch.Generator().manual_seed(0)
    for split in ("test", "val"):
        x = torch.rand(40, 1, 8, 8, generator=gen) * 2 - 1
        save_tensors(
            root / f"{split}.safetensors",
            {"images": x, "labels": torch.arange(40) % 10},
            kind="digits",
        )
    torch.manual_seed(0)
    save_classifier(root / "classifier.safetensors", DigitClassifier().eval())
    adapters = []
    for kind in ("offset", "adaln"):
        for seed in (0, 1):
            params = {"adapter_type": kind, "adapter_dim": 8, "w_scale": 1.0, "seed": seed}
            path = root / f"{kind}_s{seed}.safetensors"
            save_adapters(path, adapters_for(base, params))
            adapters.append(str(path))
    params = {
        "num_samples": 20,
        "batch_size": 8,  # several batches: batch i's noise must match across methods
        "feature_net": "digit_classifier",
        "sampler": SAMPLER,
        "guidance_scales": [1.5, 3.0],
    }
    for method in ("cfg", "none", "agd"):
        extra = ["--adapters", *adapters] if method == "agd" else []
        evaluate.main(
            [
                *("--method", method, "--checkpoint", str(root / "base")),
                *("--checkpoint-name", "base", "--seeds", "0", "1", *extra),
                *("--reference", str(root / "test.safetensors")),
                *("--validation", str(root / "val.safetensors")),
                *("--classifier", str(root / "classifier.safetensors")),
                *("--out", str(root / f"{method}.csv"), "--params", json.dumps(params)),
                *("--samples", str(root / f"{method}.safetensors"), "--device", "cpu"),
            ]
        )
    return root


def test_evaluation_keeps_every_rows_samples_with_its_key(evaluated):
    table = pd.read_csv(evaluated / "agd.csv")
    assert list(table.columns) == EVAL_COLUMNS
    assert sorted(set(zip(table.adapter_type, table.seed, strict=True))) == [
        ("adaln", 0), ("adaln", 1), ("offset", 0), ("offset", 1),
    ]  # fmt: skip
    samples = read_samples(evaluated / "agd.safetensors")
    assert len(samples) == len(table) == 2 * 2 * 2
    assert all(images.shape == (20, 1, 8, 8) for _, images in samples)


def test_zero_init_adapters_sit_exactly_where_no_guidance_does(evaluated):
    """At init the adapted model IS the base, so its samples are the conditional
    model's, from the same noise: its fidelity to CFG must equal no guidance's at
    every (seed, w). A stream or batch mismatch between methods breaks this."""
    samples = [
        row
        for name in ("cfg", "none", "agd")
        for row in read_samples(evaluated / f"{name}.safetensors")
    ]
    table = fidelity_table(samples, lambda x: x.flatten(1))
    none = table[table.method == "none"].set_index(["seed", "guidance_scale"]).fidelity_mse
    for kind in ("offset", "adaln"):
        agd = table[(table.method == "agd") & (table.adapter_type == kind)]
        agd = agd.set_index(["seed", "guidance_scale"]).fidelity_mse
        assert len(agd) == 4
        pd.testing.assert_series_equal(agd.sort_index(), none.sort_index(), rtol=1e-9)
    assert (none > 0).all()  # and CFG does differ from no guidance


def test_adapter_files_map_to_seeds_by_position(evaluated):
    files = sorted(str(p) for p in evaluated.glob("offset_s*.safetensors"))
    assert evaluate.adapter_jobs(files, [0, 1]) == [(0, files[0]), (1, files[1])]
    with pytest.raises(ReproInputError, match="do not split"):
        evaluate.adapter_jobs(files[:1], [0, 1])
    with pytest.raises(ReproInputError, match="second offset"):
        evaluate.adapter_jobs([files[0], files[0]], [0])
