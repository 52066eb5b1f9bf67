"""HuMo in the shared workflow: config checks and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/humo.smk. Config: the `humo` section, schema schemas/humo.schema.yaml.

The DAG: talking faces (rule faces) -> the text-to-video foundation (foundation_t2v)
-> audio features (humo_audio) -> stage 1 per seed and stage-1 kind (minimal-invasive
or full fine-tune) -> stage 2 per variant -> generated test clips per variant, task and
CFG form -> metric rows (judges trained once on the real training clips) -> table,
figures, claims.
"""

from __future__ import annotations

from collections.abc import Mapping

from repro.core.papers import PaperSpec

METRICS = "results/humo_metrics.csv"
CURVES = "results/humo_sync_curves.csv"
FIGURES = {
    "ablation": "results/figures/humo_ablation.png",
    "sync": "results/figures/humo_sync.png",
    "cfg": "results/figures/humo_cfg.png",
    "strips": "results/figures/humo_strips.png",
}
CLAIMS = "results/claims/humo.csv"

# The trained variants (the paper's ablation table): the full method, without
# focus-by-predicting (no mask loss), without progressive training (one stage that
# trains everything from the start), and full fine-tuning instead of minimal-invasive
# injection (every transformer weight trained in both stages).
VARIANTS = ("full", "no_focus", "no_progressive", "full_finetune")
# What stage 1 each two-stage variant starts from ("minimal": self-attention only).
STAGE1_OF = {"full": "minimal", "no_focus": "minimal", "full_finetune": "full_finetune"}
TASKS = ("TI", "TA", "TIA")
CFG_FORMS = ("paper", "code_17b", "code_1_7b", "fixed")
INJECTIONS = ("append", "overwrite_last")
AUDIO_ENCODERS = ("logmel", "whisper")


def generated_sets(cfg: Mapping, variant: str) -> list[tuple[str, str]]:
    """(task, cfg form) pairs generated for `variant`: the full model does every task
    at the main form and TIA at every form; each ablation TIA at the main form."""
    gen = cfg["humo"]["generate"]
    main = gen["cfg"]
    if variant != "full":
        return [("TIA", main)]
    pairs = [(task, main) for task in gen["tasks"]]
    pairs += [("TIA", form) for form in gen["cfg_forms"] if form != main]
    return pairs


def targets(config: Mapping) -> list[str]:
    return [METRICS, CURVES, *FIGURES.values(), CLAIMS]


def checks(cfg: Mapping) -> list[str]:
    """Checks between values of the humo section; assumes the schema passed."""
    hm = cfg["humo"]
    errors = []
    gen = hm["generate"]
    if gen["cfg"] not in gen["cfg_forms"]:
        errors.append(
            f"humo.generate.cfg: {gen['cfg']!r} is not in humo.generate.cfg_forms "
            f"({gen['cfg_forms']})"
        )
    claims = hm["claims"]
    for key in ("cfg", "fixed_cfg"):
        if claims[key] not in gen["cfg_forms"]:
            errors.append(
                f"humo.claims.{key}: {claims[key]!r} is not generated (humo.generate.cfg_forms "
                f"{gen['cfg_forms']})"
            )
    if "full" not in hm["variants"]:
        errors.append("humo.variants: must include 'full' (every claim compares against it)")
    train = hm["train"]
    if not 0 <= train["task_mix"]["end"] <= 1 or not 0 <= train["task_mix"]["start"] <= 1:
        errors.append("humo.train.task_mix: start and end are fractions in [0, 1]")
    frames = cfg["data"]["faces"]["frames"]
    if hm["evaluate"]["max_offset"] >= frames - 2:
        errors.append(
            f"humo.evaluate.max_offset: {hm['evaluate']['max_offset']} leaves fewer than 3 "
            f"overlapping frames of data.faces.frames {frames}"
        )
    t2v = (cfg.get("foundation") or {}).get("t2v") or {}
    layers = (t2v.get("transformer") or {}).get("num_layers")
    # Only the tiny model's depth is in the config; a loaded one is checked when loaded.
    if t2v.get("pretrained") is None and layers is not None and hm["model"]["mask_blocks"] > layers:
        errors.append(
            f"humo.model.mask_blocks: {hm['model']['mask_blocks']} exceeds "
            f"foundation.t2v.transformer.num_layers {layers}"
        )
    return errors


PAPER = PaperSpec(
    name="humo",
    title="HuMo: Human-Centric Video Generation via Collaborative Multi-Modal Conditioning",
    label="HuMo",
    schema="humo.schema.yaml",
    targets=targets,
    tables=(METRICS,),
    claims=CLAIMS,
    checks=checks,
    # Whisper (paper scale): fetched by hub_fetch like the foundation models.
    hub_keys=(("humo.audio.pretrained", None),),
)
