"""FedRE in the shared workflow: config checks and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/fedre.smk. Config: the `fedre` section, schema schemas/fedre.schema.yaml.
One simulation job per task x partition x seed runs every algorithm
(repro.fedre.simulate); repro.fedre.table gathers the runs.
"""

from __future__ import annotations

from collections.abc import Mapping

from repro.core.papers import PaperSpec

ACCURACY = "results/fedre_accuracy.csv"
SUMMARY = "results/fedre_summary.csv"
ABLATION = "results/fedre_ablation.csv"
PRIVACY = "results/fedre_privacy.csv"
COMMUNICATION = "results/fedre_communication.csv"
FIGURES = {
    "curves": "results/figures/fedre_curves.png",
    "communication": "results/figures/fedre_communication.png",
    "ablation": "results/figures/fedre_ablation.png",
    "inversion": "results/figures/fedre_inversion.png",
}
CLAIMS = "results/claims/fedre.csv"

# In the order of the tables and figures. "local" never communicates; "fedallrep"
# uploads every representation (the privacy reference, not a method to use).
ALGORITHMS = ("local", "fedproto", "fedgh", "lg_fedavg", "fedtgp", "fedre", "fedallrep")
PARTITION_KINDS = ("dirichlet", "pathological")
TASK_SOURCES = ("digits", "glyphs", "imagefolder")
# The client architectures of repro.fedre.model (its ARCHITECTURES, in order).
CLIENT_ARCHITECTURES = (
    "mlp_narrow",
    "mlp_wide",
    "mlp_deep",
    "cnn_small",
    "cnn_wide",
    "cnn_deep",
    "cnn_bn",
    "resnet_tiny",
    "mobilenet_tiny",
    "vit_tiny",
)


def targets(config: Mapping) -> list[str]:
    return [ACCURACY, SUMMARY, COMMUNICATION, PRIVACY, ABLATION, *FIGURES.values(), CLAIMS]


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the fedre section; assumes the schema passed."""
    fr = cfg["fedre"]
    errors = []
    unknown = sorted(set(fr["algorithms"]) - set(ALGORITHMS))
    if unknown:
        errors.append(f"fedre.algorithms: unknown {unknown} (allowed: {list(ALGORITHMS)})")
    if len(fr["clients"]) != fr["num_clients"]:
        errors.append(
            f"fedre.clients: {len(fr['clients'])} architectures for fedre.num_clients "
            f"{fr['num_clients']} (one per client)"
        )
    unknown = sorted(set(fr["clients"]) - set(CLIENT_ARCHITECTURES))
    if unknown:
        errors.append(
            f"fedre.clients: unknown architectures {unknown} (allowed: {list(CLIENT_ARCHITECTURES)})"
        )
    for name, part in fr["partitions"].items():
        if part["kind"] == "dirichlet" and not part.get("alpha", 0) > 0:
            errors.append(f"fedre.partitions.{name}.alpha: must be > 0, got {part.get('alpha')}")
        if part["kind"] == "pathological" and not part.get("classes_per_client", 0) >= 1:
            errors.append(f"fedre.partitions.{name}.classes_per_client: must be >= 1")
    for name, task in fr["tasks"].items():
        if task["source"] == "imagefolder" and task.get("dataset") not in (
            cfg.get("data", {}).get("imagefolders") or {}
        ):
            errors.append(
                f"fedre.tasks.{name}.dataset: {task.get('dataset')!r} is not an entry of "
                "data.imagefolders"
            )
        if task["source"] == "glyphs":
            chars = task.get("chars", "")
            if len(set(chars)) != len(chars) or len(chars) < 2:
                errors.append(f"fedre.tasks.{name}.chars: need >= 2 distinct characters")
    claims = fr["claims"]
    missing = sorted(set(claims["baselines"]) - set(fr["algorithms"]))
    if missing or "fedre" not in fr["algorithms"]:
        errors.append(
            f"fedre.claims.baselines: {missing or ['fedre']} not in fedre.algorithms "
            f"({fr['algorithms']}): a claim compares two algorithms that both ran"
        )
    if claims["partition"] not in fr["partitions"]:
        errors.append(
            f"fedre.claims.partition: {claims['partition']!r} is not a partition of "
            f"fedre.partitions ({sorted(fr['partitions'])})"
        )
    if claims["many_class_task"] not in fr["tasks"]:
        errors.append(
            f"fedre.claims.many_class_task: {claims['many_class_task']!r} is not a task of "
            f"fedre.tasks ({sorted(fr['tasks'])})"
        )
    unrun = sorted(set(fr["privacy"]["algorithms"]) - set(fr["algorithms"]))
    if unrun:
        errors.append(
            f"fedre.privacy.algorithms: {unrun} not in fedre.algorithms: nothing to attack"
        )
    for name, task in fr["tasks"].items():
        if task["source"] == "imagefolder" and fr["privacy"]["algorithms"]:
            errors.append(
                f"fedre.tasks.{name}: the inversion attack renders its public images as "
                "glyphs; an imagefolder task needs fedre.privacy.algorithms: []"
            )
    ablation = fr["ablation"]
    for key, table in (("task", "tasks"), ("partition", "partitions")):
        if ablation[key] not in fr[table]:
            errors.append(
                f"fedre.ablation.{key}: {ablation[key]!r} is not in fedre.{table} "
                f"({sorted(fr[table])})"
            )
    if not 1 <= fr["last_rounds"] <= fr["rounds"]:
        errors.append(
            f"fedre.last_rounds: {fr['last_rounds']} must be between 1 and fedre.rounds "
            f"({fr['rounds']})"
        )
    return errors


PAPER = PaperSpec(
    name="fedre",
    title="Representation Entanglement for Model-Heterogeneous Federated Learning (FedRE)",
    label="FedRE",
    schema="fedre.schema.yaml",
    targets=targets,
    tables=(ACCURACY, SUMMARY, COMMUNICATION, PRIVACY, ABLATION),
    claims=CLAIMS,
    checks=checks,
)
