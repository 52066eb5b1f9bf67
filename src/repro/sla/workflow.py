"""SLA in the shared workflow: config checks and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/sla.smk. Config: the `sla` section, schema schemas/sla.schema.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping

from repro.core.papers import PaperSpec

KERNEL_TABLE = "results/sla_kernel.csv"


def targets(config: Mapping) -> list[str]:
    return [KERNEL_TABLE]


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the sla section; assumes the schema passed."""
    errors = []
    bench = cfg["sla"]["kernel_bench"]
    splits = [("k_l", s, bench["k_l"]) for s in [bench["sparsity"], *bench["sparsities"]]]
    splits += [
        (f"forms[{i}].k_l", bench["sparsity"], form["k_l"])
        for i, form in enumerate(bench.get("forms", []))
    ]
    for key, s, k_l in splits:
        if (1.0 - s) + k_l > 1.0 + 1e-9:
            errors.append(
                f"sla.kernel_bench: sparsity {s} leaves {1 - s:.3g} of the blocks critical, "
                f"which with {key} = {k_l} negligible exceeds all of them"
            )
    return errors


PAPER = PaperSpec(
    name="sla",
    title="SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention",
    label="SLA",
    schema="sla.schema.yaml",
    targets=targets,
    tables=(KERNEL_TABLE,),
    claims=None,
    checks=checks,
)
