"""SLA in the shared workflow: config checks and final files (repro.core.papers).

Light on purpose (no torch): Snakemake imports it when it parses the workflow.
Rules: rules/sla.smk. Config: the `sla` section, schema schemas/sla.schema.yaml.

Two experiments:

- the kernels (sla_kernel_bench -> results/sla_kernel.csv), on a GPU;
- the quality: talking faces at SLA's size (sla_faces) -> the text-to-video foundation
  (foundation_t2v, shared with HuMo) fine-tuned as a whole per attention variant and
  seed (sla_finetune) -> test/val losses, samples of the test captions, attention FLOPs
  and attention time (sla_sample) -> frame FID with a frame encoder trained on real
  frames (sla_judge) -> results/sla_quality.csv (sla_eval) -> claims, figures;
- the image experiment: glyphs at 16 x 16 (sla_glyphs) -> a DiT trained with full
  attention (sla_image_base) -> fine-tuned per variant and seed (sla_image_finetune)
  -> FID and attention FLOPs (sla_image_eval, with sla_image_classifier's features)
  -> results/sla_image.csv (sla_image_table).
"""

from __future__ import annotations

from collections.abc import Mapping

from repro.core.papers import PaperSpec
from repro.kernels.sla_blocks import block_counts, num_blocks

KERNEL_TABLE = "results/sla_kernel.csv"
QUALITY_TABLE = "results/sla_quality.csv"
IMAGE_TABLE = "results/sla_image.csv"
FIGURES = {
    "quality": "results/figures/sla_quality.png",
    "frames": "results/figures/sla_frames.png",
    "loss": "results/figures/sla_loss.png",
}
CLAIMS = "results/claims/sla.csv"

ATTENTIONS = ("full", "paper", "main", "sparse_only", "linear_only")
# Attention kinds with an exact (sparse) branch: they need a critical block in every row.
SPARSE_KINDS = ("paper", "main", "sparse_only")
VARIANT_DEFAULTS = {"k_h": 0.05, "k_l": 0.10, "phi": "softmax"}
CLAIM_VARIANTS = ("full", "sla", "sparse_low", "linear")


def quality_variants(config: Mapping, section: str = "quality") -> dict[str, dict]:
    """The variants of sla.<section>.variants (quality: the video experiment, image: the
    DiT) by name, in config order, each with its attention, k_h, k_l, phi (defaults
    filled in) and seeds (its own, else sla.<section>.seeds, else the top-level seeds)."""
    quality = config["sla"][section]
    default_seeds = quality.get("seeds") or config.get("seeds") or [0]
    out = {}
    for spec in quality["variants"]:
        variant = {**VARIANT_DEFAULTS, **spec}
        variant["seeds"] = [int(s) for s in spec.get("seeds") or default_seeds]
        out[variant.pop("name")] = variant
    return out


def nominal_sparsity(attention: str, k_h: float) -> float:
    """The sparsity the paper names a variant by: the fraction of non-critical blocks."""
    if attention == "full":
        return 0.0
    if attention == "linear_only":
        return 1.0
    return 1.0 - float(k_h)


def install_kwargs(variant: Mapping, block_q: int, block_kv: int) -> dict:
    """repro.sla.processor.install_sla's arguments for a resolved variant, with the k_h
    and k_l it effectively runs at: full attention is k_h = 100 %, linear-only 0, and
    only the paper's three-class form has negligible blocks (k_l)."""
    attention = variant["attention"]
    k_h = {"full": 1.0, "linear_only": 0.0}.get(attention, float(variant["k_h"]))
    return {
        "variant": attention,
        "k_h": k_h,
        "k_l": float(variant["k_l"]) if attention == "paper" else 0.0,
        "phi": variant["phi"],
        "block_q": int(block_q),
        "block_kv": int(block_kv),
    }


def glyph_params(config: Mapping, split: str) -> dict:
    """SLA's image data: data.glyphs (the split's own n and seed for val / test) with
    sla.image.glyphs on top."""
    glyphs = dict(config["data"]["glyphs"])
    heldout = {"val": glyphs.pop("val"), "test": glyphs.pop("test")}
    if split in heldout:
        glyphs.update(heldout[split])
    return {**glyphs, **config["sla"]["image"].get("glyphs", {})}


def faces_params(config: Mapping) -> dict:
    """SLA's talking faces: data.faces with sla.quality.faces on top. With data.faces.root
    set, SLA reads the same real clips at its own size and frame count; a null root is left
    out (the params of a config without the key: drawn, as before)."""
    params = {**config["data"]["faces"], **config["sla"]["quality"].get("faces", {})}
    if params.get("root", "") is None:
        del params["root"]
    return params


def tokens(frames: int, size: int, patch: list[int]) -> int:
    """Tokens of a [3, frames, size, size] clip under a (t, h, w) patch."""
    pt, ph, pw = (int(p) for p in patch)
    return -(-frames // pt) * (size // ph) * (size // pw)


def variant_errors(
    name: str,
    variant: Mapping,
    seq_len: int,
    block_q: int,
    block_kv: int,
    key: str,
    section: str = "quality",
) -> list[str]:
    """What makes a variant impossible on a sequence of `seq_len` tokens; each message
    starts with the config key (`key`) it is about."""
    errors = []
    for block_key, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block > seq_len:
            errors.append(
                f"sla.{section}.{block_key}: blocks of {block} tokens are longer than the "
                f"sequence ({seq_len} tokens)"
            )
    if errors:
        return errors
    attention, k_h, k_l = variant["attention"], float(variant["k_h"]), float(variant["k_l"])
    if attention == "paper" and k_h + k_l > 1.0 + 1e-9:
        errors.append(f"{key}: k_h + k_l = {k_h} + {k_l} exceeds 100 % of the blocks")
    n_kv = num_blocks(seq_len, block_kv)
    critical, _ = block_counts(n_kv, k_h, k_l if attention == "paper" else 0.0)
    if attention in SPARSE_KINDS and critical < 1:
        errors.append(
            f"{key}: k_h = {k_h} leaves no critical block of the {n_kv} key blocks a row "
            f"({seq_len} tokens in blocks of {block_kv}); raise k_h to at least {1 / n_kv:.3g}"
        )
    return errors


def _name_errors(names: list[str], section: str) -> list[str]:
    errors = [
        f"sla.{section}.variants: {name!r} is defined more than once"
        for name in sorted({n for n in names if names.count(n) > 1})
    ]
    if "real" in names:
        errors.append(f"sla.{section}.variants: 'real' names the real data's row; rename it")
    return errors


def image_checks(config: Mapping) -> list[str]:
    image = config["sla"]["image"]
    names = [spec["name"] for spec in image["variants"]]
    errors = _name_errors(names, "image")
    variants = quality_variants(config, "image")
    model = image["model"]
    size = int(glyph_params(config, "train")["size"])
    if size != int(model["sample_size"]):
        errors.append(
            f"sla.image.model.sample_size: {model['sample_size']}, but the glyphs are drawn at "
            f"{size} (sla.image.glyphs.size)"
        )
    seq_len = (int(model["sample_size"]) // int(model["patch_size"])) ** 2
    for i, name in enumerate(names):
        errors += variant_errors(
            name,
            variants[name],
            seq_len,
            int(image["block_q"]),
            int(image["block_kv"]),
            f"sla.image.variants[{i}] ({name})",
            section="image",
        )
    return sorted(set(errors), key=errors.index)


def quality_checks(config: Mapping) -> list[str]:
    quality = config["sla"]["quality"]
    names = [spec["name"] for spec in quality["variants"]]
    errors = _name_errors(names, "quality")
    variants = quality_variants(config)
    claims = quality["claims"]
    for key in CLAIM_VARIANTS:
        if claims[key] not in variants:
            errors.append(
                f"sla.quality.claims.{key}: {claims[key]!r} is not a variant of "
                f"sla.quality.variants ({', '.join(variants)})"
            )
    # The sequence is known here only for the tiny model built by foundation_t2v; a
    # loaded checkpoint's patch is checked by the stage (repro.sla.finetune).
    t2v = config.get("foundation", {}).get("t2v", {})
    if t2v.get("pretrained") is None and "transformer" in t2v:
        faces = faces_params(config)
        patch = t2v["transformer"].get("patch_size", [1, 2, 2])
        seq_len = tokens(int(faces["frames"]), int(faces["size"]), patch)
        for i, name in enumerate(names):
            errors += variant_errors(
                name,
                variants[name],
                seq_len,
                int(quality["block_q"]),
                int(quality["block_kv"]),
                f"sla.quality.variants[{i}] ({name})",
            )
    return sorted(set(errors), key=errors.index)


def kernel_checks(config: Mapping) -> list[str]:
    errors = []
    bench = config["sla"]["kernel_bench"]
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


def checks(config: Mapping) -> list[str]:
    """Checks between values of the sla section; assumes the schema passed."""
    return kernel_checks(config) + quality_checks(config) + image_checks(config)


def targets(config: Mapping) -> list[str]:
    return [KERNEL_TABLE, QUALITY_TABLE, IMAGE_TABLE, *FIGURES.values(), CLAIMS]


PAPER = PaperSpec(
    name="sla",
    title="SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention",
    label="SLA",
    schema="sla.schema.yaml",
    targets=targets,
    tables=(KERNEL_TABLE, QUALITY_TABLE, IMAGE_TABLE),
    claims=CLAIMS,
    checks=checks,
)
