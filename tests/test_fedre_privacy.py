"""FedRE's inversion attack: the metric by hand, the attack on a constructed client, the
privacy table's checks, the privacy claim at its threshold, the inversion figure."""

import pandas as pd
import pytest
import torch
from test_fedre_algorithms import toy_client

from repro.core.errors import ReproInputError
from repro.fedre.algorithms import FedAllRep, Hyper
from repro.fedre.claims import privacy_claim
from repro.fedre.plots import inversion_figure
from repro.fedre.privacy import attack, nearest_mse, psnr
from repro.fedre.table import PRIVACY_COLUMNS, privacy_table


def test_psnr_and_nearest_mse_by_hand():
    assert psnr(torch.tensor([0.01, 0.001, 1.0])).tolist() == pytest.approx([20.0, 30.0, 0.0])
    images = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0)])
    # Mid-grey (0 in [-1, 1], 0.5 in [0, 1]) is 0.25 from both; black is 0 from image 0.
    recon = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), -1.0)])
    mse, index = nearest_mse(recon, images)
    assert mse.tolist() == pytest.approx([0.25, 0.0])
    assert index[1] == 0
    # The nearest, not the first: a white reconstruction is 1.0 from black, 0 from white.
    mse, index = nearest_mse(torch.full((1, 1, 2, 2), 1.0), images)
    assert mse.item() == 0.0 and index.item() == 1


def test_decoding_real_uploads_beats_decoding_noise():
    """The attacker's decoder maps a client's representations back toward its images:
    its reconstructions of the real uploads lie nearer the client's images than those of
    random vectors of the same size."""
    client = toy_client(n=64, classes=(0, 1, 2, 3), rep_dim=16)
    aux = client.data.train_x  # the strongest attacker: public images like the client's
    up = FedAllRep(Hyper(), num_classes=4, rep_dim=16, seed=0).upload(client)
    cfg = {"epochs": 100, "lr": 0.003, "batch_size": 32}
    kwargs = dict(seed=0, keys={"task": "t"}, archs=["mlp_narrow"])
    real = attack("fedallrep", [client], [(0, up)], aux, cfg, **kwargs)
    noise = {"reps": torch.randn_like(up["reps"]) * 5, "labels": up["labels"]}
    fake = attack("fedallrep", [client], [(0, noise)], aux, cfg, **kwargs)
    assert real[0]["vectors"] == 64
    assert real[0]["psnr"] > fake[0]["psnr"] + 1.0
    examples = {}
    attack("fedallrep", [client], [(0, up)], aux, cfg, examples=examples, **kwargs)
    assert examples["fedallrep/recon"].shape == (8, 1, 4, 4)


def privacy_rows(seed, psnrs, task="g", partition="dir"):
    return pd.DataFrame(
        [
            {"task": task, "partition": partition, "algorithm": a, "seed": seed, "client": c,
             "arch": "mlp_narrow", "vectors": 1, "mse": 10 ** (-p / 10), "psnr": p}
            for a, p in psnrs.items()
            for c in range(2)
        ],
        columns=PRIVACY_COLUMNS,
    )  # fmt: skip


def test_privacy_table_checks(tmp_path):
    a = tmp_path / "a.csv"
    privacy_rows(0, {"fedre": 10.0, "fedproto": 12.0}).to_csv(a, index=False)
    assert len(privacy_table([a])) == 4
    bad = privacy_rows(0, {"fedre": 10.0})
    bad.loc[0, "mse"] = 1.5
    bad.to_csv(a, index=False)
    with pytest.raises(ReproInputError, match="mse 1.5"):
        privacy_table([a])
    privacy_rows(0, {"fedavg": 10.0}).to_csv(a, index=False)
    with pytest.raises(ReproInputError, match="unknown algorithm"):
        privacy_table([a])


@pytest.mark.parametrize(
    ("gaps", "verdict"),
    [
        ([0.5, 0.6, 0.7], "holds"),  # mean 0.6, std 0.1: just inside
        ([-0.5, -0.6, -0.7], "does not hold"),
        ([-0.2, 0.3, 0.5], "inconclusive"),  # the spread straddles 0
        ([0.5, 0.6], "inconclusive"),  # two seeds decide nothing
    ],
)
def test_privacy_claim_at_its_threshold(gaps, verdict):
    table = pd.concat(
        [privacy_rows(s, {"fedre": 10.0, "fedproto": 10.0 + g}) for s, g in enumerate(gaps)]
    )
    claim = privacy_claim(table, "dir", "fedproto", min_seeds=3)
    assert claim.verdict == verdict
    assert claim.measured_mean == pytest.approx(sum(gaps) / len(gaps))


def test_privacy_claim_without_rows_is_inconclusive():
    table = privacy_rows(0, {"fedre": 10.0})
    claim = privacy_claim(table, "dir", "fedallrep", min_seeds=1)
    assert claim.verdict == "inconclusive" and "no seed has both" in claim.reference


def test_inversion_figure_draws_each_task_and_survives_no_examples():
    privacy = privacy_rows(0, {"fedre": 10.0, "fedproto": 12.0})
    examples = {
        "g": {
            "fedre/recon": torch.zeros(1, 1, 4, 4).numpy(),
            "fedre/nearest": torch.ones(1, 1, 4, 4).numpy(),
            "fedproto/recon": torch.zeros(3, 1, 4, 4).numpy(),
            "fedproto/nearest": torch.ones(3, 1, 4, 4).numpy(),
        }
    }
    fig = inversion_figure(privacy, examples)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 2 * (1 + 3)  # reconstruction and nearest image per vector
    assert inversion_figure(privacy, {}).axes
