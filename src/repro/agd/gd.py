"""Stage agd_gd: guidance distillation of the WHOLE model (Meng et al. 2023).

The baseline AGD is compared with: the same guidance-scale conditioning, but
every parameter of the base is trained, on standard (forward-noised)
trajectories. Saved as a diffusers model directory plus its w-conditioning.

    python -m repro.agd.gd --base models/agd/base --trajectories data/agd/trajectories/standard \
        --out models/agd/gd_s0 --metrics results/agd/gd/gd_s0.json --params '{...}'
"""

from __future__ import annotations

import logging
from pathlib import Path

from repro.agd.distill import run
from repro.agd.model import save_adapters, save_dit
from repro.core.cli import parse_stage_args, stage_parser
from repro.core.io import write_json
from repro.core.tracking import log_run

log = logging.getLogger(__name__)

GD_ADAPTERS = "w_conditioning.safetensors"


def main(argv=None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--base", required=True, help="base model directory")
    parser.add_argument("--trajectories", required=True, help="standard trajectory directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--metrics", required=True, help="output metrics JSON")
    parser.add_argument("--checkpoint-dir", required=True, help="resume checkpoints")
    args = parse_stage_args(parser, argv)
    student, metrics = run(args, train_base=True, desc="agd_gd")
    student.detach()
    out = Path(args.out)
    save_dit(student.base, out / "transformer")
    save_adapters(out / GD_ADAPTERS, student.adapters, extra_meta={"metrics": metrics})
    write_json(args.metrics, metrics)
    log.info("gd: %s", metrics)
    log_run(
        paper="agd",
        rule=args.rule,
        scale=args.scale,
        params=args.params,
        metrics=metrics,
        artifacts=[args.metrics],
    )


if __name__ == "__main__":
    main()
