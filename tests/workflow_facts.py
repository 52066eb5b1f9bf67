"""Facts about the workflow that several test modules check, written down once.

GPU_RULES: the rules that run a model, each with the config section whose
`processes` (default 1) is the number of GPUs it asks for at paper scale (None:
one GPU). At tiny and smoke scale no rule asks for a GPU. CPU_RULES never ask.
"""

from collections.abc import Mapping

GPU_RULES: dict[str, tuple[str, ...] | None] = {
    "agd_base": ("agd", "base"),
    "agd_trajectories": None,
    "agd_distill": ("agd", "distill"),
    "agd_gd": ("agd", "gd"),
    "agd_transfer": ("agd", "transfer"),
    "agd_eval": None,
    "agd_throughput": None,
    "datadream_lora": None,
    "datadream_generate": None,
    "datadream_fid": None,
    "datadream_classify": None,
    "datadream_classify_real": None,
    "probex_base": None,
    "probex_zoo": None,
    "probex_probe": None,
    "probex_layers": None,
    "probex_lora_zoo": None,
    "probex_zeroshot": None,
    "fedre_simulate": None,
    "fedre_ablation": None,
    "humo_audio": None,
    "humo_stage1": ("humo", "train"),
    "humo_stage2": ("humo", "train"),
    "humo_generate": None,
    "sla_kernel_bench": None,
    "sla_finetune": None,
    "sla_sample": None,
    "sla_image_base": None,
    "sla_image_finetune": None,
    "sla_image_eval": None,
}
CPU_RULES = frozenset(
    {
        "hub_fetch",
        "digits",
        "glyphs",
        "digit_classifier",
        "agd_table",
        "agd_figures",
        "agd_claims",
        "datadream_fewshot",
        "datadream_table",
        "datadream_figures",
        "datadream_claims",
        "probex_table",
        "probex_figures",
        "probex_claims",
        "fedre_glyphs",
        "fedre_aux",
        "fedre_table",
        "fedre_figures",
        "fedre_claims",
        "faces",
        "humo_judges",
        "humo_metrics",
        "humo_metrics_real",
        "humo_table",
        "humo_strips",
        "humo_figures",
        "humo_claims",
        "sla_faces",
        "sla_judge",
        "sla_eval",
        "sla_claims",
        "sla_figures",
        "sla_glyphs",
        "sla_image_classifier",
        "sla_image_table",
        "claims",
    }
)


def expected_gpus(rule: str, config: Mapping) -> int:
    """The GPUs `rule` asks for under the merged `config` (0 for a CPU rule)."""
    if rule not in GPU_RULES or config["scale"] != "paper":
        return 0
    section = GPU_RULES[rule]
    if section is None:
        return 1
    node = config
    for key in section:
        node = node[key]
    return int(node.get("processes", 1))
