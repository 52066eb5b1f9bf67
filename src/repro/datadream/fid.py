"""Stage datadream_fid: how close a synthetic set is to the real data, as FID to the
real test split, the digits' or an ImageFolder data set's (the paper's
distribution-distance argument: adapted generators should give lower FID than the
unadapted one), with the shared FID machinery
(repro.core.metrics; at tiny scale on the digit classifier's features).

    python -m repro.datadream.fid --synthetic data/datadream/synthetic/cls_16shot_s0.safetensors \
        --reference data/digits/test.safetensors \
        --classifier models/core/digit_classifier.safetensors \
        --out results/datadream/fid/cls_16shot_s0.json --params '{"feature_net": ..., "batch_size": ...}'

The JSON: {generator, shots, seed, n_per_class, fid, inception_score, num_images}.
"""

from __future__ import annotations

import logging
from pathlib import Path

from repro.core.data import CLASSIFICATION_KINDS, ImageDataset, load_image_dataset
from repro.core.errors import ReproInputError
from repro.core.io import write_json
from repro.core.metrics import build_scorer
from repro.core.stage import Stage, run
from repro.datadream.generate import KIND as SYNTHETIC_KIND

log = logging.getLogger(__name__)

META_KEYS = ("generator", "shots", "seed", "n_per_class")


def load_synthetic(path: str | Path) -> ImageDataset:
    """A synthetic set of repro.datadream.generate, non-empty, with its meta (errors name it)."""
    data = load_image_dataset(path, kind=SYNTHETIC_KIND)
    if len(data.images) < 2:
        raise ReproInputError(
            f"{path}: the synthetic set holds {len(data.images)} images; FID needs at least 2"
        )
    missing = [k for k in META_KEYS if k not in data.meta]
    if missing:
        raise ReproInputError(f"{path}: synthetic set without {missing} in its metadata")
    return data


def fid_of(
    synthetic: ImageDataset, reference: ImageDataset, params: dict, where: str, device=None
) -> dict:
    """FID (and IS) of the synthetic images against the reference images."""
    if params.get("feature_net") == "digit_classifier":
        # The classifier reads the digits' own shape: another one is a different data set.
        if synthetic.images.shape[1:] != reference.images.shape[1:]:
            raise ReproInputError(
                f"{where}: synthetic images of shape {tuple(synthetic.images.shape[1:])}, the "
                f"reference's are {tuple(reference.images.shape[1:])} (feature_net "
                "digit_classifier reads the digits' shape)"
            )
    scorer = build_scorer(params, reference.images, device=device)
    return scorer.score(synthetic.images)


def main(argv=None) -> None:
    stage = Stage(__doc__, paper="datadream", out="FID JSON")
    add = stage.parser.add_argument
    add("--synthetic", required=True, help="the synthetic set (.safetensors)")
    add("--reference", required=True, help="the real reference images (the test split)")
    add("--classifier", default=None, help="digit classifier (feature_net digit_classifier)")
    args = stage.start(argv)
    params = dict(stage.params)
    if args.classifier is not None:
        params["classifier"] = args.classifier
    synthetic = load_synthetic(args.synthetic)
    reference = load_image_dataset(args.reference, kind=CLASSIFICATION_KINDS)
    scores = fid_of(synthetic, reference, params, str(args.synthetic), device=stage.device)
    result = {
        **{k: synthetic.meta[k] for k in META_KEYS},
        "fid": scores["fid"],
        "inception_score": scores["inception_score"],
        "num_images": scores["num_images"],
        "num_reference": len(reference.images),
        "synthetic": str(args.synthetic),
    }
    if stage.is_main:
        write_json(args.out, result)
    log.info("FID of %s: %.3f", args.synthetic, result["fid"])
    stage.finish(result, artifacts=[args.out])


if __name__ == "__main__":
    run(main)
