"""Stage probex_lora_zoo: the SD_200 analogue, a zoo of LoRA fine-tunes of the text-to-image
model, each on a few glyphs of ONE class, for ProbeX's zero-shot classification of models
(repro.probex.zeroshot).

    python -m repro.probex.lora_zoo --corpus data/glyphs/corpus.safetensors \
        --out data/probex/lora_zoo --metrics results/probex/lora_zoo.json \
        --checkpoint-dir checkpoints/probex/lora_zoo \
        --params '{"num_classes": 10, "classnames": ["zero", ..], "heldout": 1000,
                   "foundation": {"t2i": {...store.model_params...}},
                   "lora_zoo": {"per_class": 20, "images_per_lora": 8, "rank": 4, "alpha": 4,
                                "targets": ["to_q", "to_k", "to_v", "to_out.0"],
                                "lr": [0.001, 0.01], "steps": [20, 40], "batch_size": 4,
                                "caption": "empty", "init": "shared", "split": {"val": 0.15, "test": 0.25},
                                "seed": 0, "checkpoint_every": 10}}'

As SD_200 (LoRA rank 16 fine-tunes of Stable Diffusion on 5-10 images of one class):
per class, `per_class` LoRAs of the UNet's attention projections (`targets`, peft's
rule: a module whose name is a target or ends with "." + target), rank r, scale
alpha / r, peft's "gaussian" init (A ~ N(0, 1/r), B = 0; see `init` below), each
fine-tuned with the plain denoising loss (SD's epsilon / v MSE, t ~ U{0..T-1}) on
`images_per_lora` glyphs of its class drawn from the corpus (seeded per LoRA), with
Adam at a constant learning rate drawn log-uniform in `lr` for a number of steps drawn
uniform in `steps` (inclusive): learning rate, steps, images and seed are the
nuisance. Captions (`caption`): "empty" (default) gives every image "" (the LoRA
learns its class from the images alone); "generic" gives it its class's generic caption
("a glyph of the digit seven", repro.foundation.corpus.generic_caption). Measured on
the tiny t2i (200 LoRAs, rank 4, 20-40 steps of batch 4): with "empty" a logistic
regression on one layer's B @ A tells the 10 classes apart on held-out LoRAs at 1.00
(mid-block layers) and the LoRAs' own-image loss fell for 99.5 % of them; with
"generic" the caption already names the class, the LoRAs barely move (own-image loss
fell for 70 %) and the same regression reaches 0.58 at best (chance 0.1).
The A factors start from ONE draw for the whole zoo (`init` "shared", default: a
training script run with a fixed seed, as diffusers' LoRA scripts are) or from each
LoRA's seed ("per_lora"); per-LoRA draws project every update on its own random rank-r
row space and left 0.30 at best for that regression (generic captions).
The text encoder is frozen (no LoRA there), so the captions' hidden states are
computed once.

Every LoRA trains AT ONCE. The target Linear layers get a forward hook that adds the
grouped LoRA update: the batch is made of equal contiguous blocks, one per LoRA in
training (`batch_size` samples each), and block g gets y += s * (x A_g^T) B_g^T, one
batched matmul per layer; one backward of the sum of the LoRAs' mean losses gives each
LoRA the gradient of its own loss (no LoRA's loss depends on another's factors), and
a stacked Adam with one learning rate per LoRA (repro.probex.finetune.StackedAdam,
torch.optim.Adam's update) steps them. A LoRA whose steps are done leaves the batch.
Each LoRA's images, noise and timesteps at step s come from a generator seeded by
(its seed, s): the same as if it trained alone (the tests train one LoRA alone with
peft and compare), and a resumed run draws the same batches.

What the zoo stores (repro.probex.zoo's format, tree "t2i_lora", arch "lora"): per
LoRA one file with, for every adapted module, the probed weight `<module>.weight` =
(alpha / r) B @ A (out x in, what the official code reads as B @ A) and the factors
`<module>.lora_A` [r, in] / `<module>.lora_B` [out, r]; labels [its class]; the
manifest's layers list every adapted module with its (out, in) and its splits
(train / val / test over models; repro.probex.zeroshot re-partitions by class).
Each LoRA's denoising loss on its own images, with and without the LoRA (the same
draws), is kept in the manifest: the LoRAs did learn their class.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from repro.core.cli import require
from repro.core.errors import ReproInputError
from repro.probex.finetune import StackedAdam, StackedCheckpoints, config_range
from repro.probex.zoo import MANIFEST_NAME, assign_splits, write_manifest, write_zoo_model

log = logging.getLogger(__name__)

SECTION = "probex.lora_zoo"
TREE = "t2i_lora"
ARCH = "lora"
CAPTIONS = ("generic", "empty")
INITS = ("shared", "per_lora")
# Each LoRA's draws at step s: Generator(seed * STEP_STRIDE + s); its evaluation draws
# apart from every training step.
STEP_STRIDE = 1_000_003
EVAL_STEP = STEP_STRIDE - 1
EVAL_REPEATS = 4  # fixed draws per image for the before / after loss


# ----------------------------------------------------------------------------- the plan


@dataclass
class ZooSettings:
    """The probex.lora_zoo section, checked."""

    per_class: int
    images_per_lora: int
    rank: int
    alpha: float
    targets: list[str]
    lr: tuple[float, float]
    steps: tuple[int, int]
    batch_size: int
    caption: str
    init: str  # "shared": one A init for every LoRA (drawn from seed); "per_lora": each its own
    split: dict[str, float]
    seed: int
    checkpoint_every: int
    chunk: int | None  # LoRAs per forward (None: every LoRA in training at once)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraSpec:
    """One LoRA of the zoo: its class, images (corpus rows), lr, steps, seed, split."""

    index: int
    label: int
    images: list[int]
    lr: float
    steps: int
    seed: int
    split: str


def _positive_int(section: Mapping, key: str, minimum: int = 1) -> int:
    value = require(section, key, SECTION)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ReproInputError(f"{SECTION}.{key}: must be an integer >= {minimum}, got {value!r}")
    return value


def zoo_settings(params: Mapping) -> ZooSettings:
    """`params["lora_zoo"]` as ZooSettings; a missing or bad value names its key."""
    zoo = require(params, "lora_zoo", "probex")
    if not isinstance(zoo, dict):
        raise ReproInputError(f"{SECTION}: expected a mapping, got {zoo!r}")
    alpha = require(zoo, "alpha", SECTION)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise ReproInputError(f"{SECTION}.alpha: must be a number > 0, got {alpha!r}")
    targets = require(zoo, "targets", SECTION)
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise ReproInputError(
            f"{SECTION}.targets: a non-empty list of module names, got {targets!r}"
        )
    caption = zoo.get("caption", "empty")
    if caption not in CAPTIONS:
        raise ReproInputError(f"{SECTION}.caption: one of {list(CAPTIONS)}, got {caption!r}")
    init = zoo.get("init", "shared")
    if init not in INITS:
        raise ReproInputError(f"{SECTION}.init: one of {list(INITS)}, got {init!r}")
    split = require(zoo, "split", SECTION)
    if not isinstance(split, dict) or set(split) != {"val", "test"}:
        raise ReproInputError(f"{SECTION}.split: must be {{val: .., test: ..}}, got {split!r}")
    chunk = zoo.get("chunk")
    if chunk is not None:
        chunk = _positive_int(zoo, "chunk")
    seed = zoo.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ReproInputError(f"{SECTION}.seed: must be an integer >= 0, got {seed!r}")
    return ZooSettings(
        per_class=_positive_int(zoo, "per_class"),
        images_per_lora=_positive_int(zoo, "images_per_lora"),
        rank=_positive_int(zoo, "rank"),
        alpha=float(alpha),
        targets=list(targets),
        lr=config_range(zoo, "lr", float, SECTION),
        steps=config_range(zoo, "steps", int, SECTION),
        batch_size=_positive_int(zoo, "batch_size"),
        caption=caption,
        init=init,
        split={"val": float(split["val"]), "test": float(split["test"])},
        seed=seed,
        checkpoint_every=int(zoo.get("checkpoint_every", 10)),
        chunk=chunk,
    )


def draw_loras(settings: ZooSettings, labels: Tensor, num_classes: int) -> list[LoraSpec]:
    """The zoo's LoRAs, class by class (`per_class` each), drawn from settings.seed: images
    (`images_per_lora` distinct corpus rows of the class), lr log-uniform, steps uniform
    (inclusive), seed; splits over models by repro.probex.zoo.assign_splits."""
    count = settings.per_class * num_classes
    if count < 2:
        raise ReproInputError(f"{SECTION}.per_class: {count} LoRAs in all; need at least 2")
    splits = assign_splits(
        count, settings.split["val"], settings.split["test"], settings.seed, f"{SECTION}.split"
    )
    gen = torch.Generator().manual_seed(settings.seed)
    (lr_low, lr_high), (steps_low, steps_high) = settings.lr, settings.steps
    specs = []
    for label in range(num_classes):
        pool = torch.nonzero(labels == label).flatten()
        if len(pool) < settings.images_per_lora:
            raise ReproInputError(
                f"{SECTION}.images_per_lora: {settings.images_per_lora} images per LoRA, but "
                f"the corpus holds {len(pool)} of class {label}"
            )
        for _ in range(settings.per_class):
            index = len(specs)
            images = pool[torch.randperm(len(pool), generator=gen)[: settings.images_per_lora]]
            u = float(torch.rand((), generator=gen))
            lr = math.exp(math.log(lr_low) + u * (math.log(lr_high) - math.log(lr_low)))
            steps = int(torch.randint(steps_low, steps_high + 1, (), generator=gen))
            specs.append(
                LoraSpec(
                    index=index,
                    label=label,
                    images=sorted(images.tolist()),
                    lr=lr,
                    steps=steps,
                    seed=settings.seed * 100_003 + index,
                    split=splits[index],
                )
            )
    return specs


# ----------------------------------------------------------------------------- grouped LoRA


def target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """The Linear modules of `model` the targets select (peft's rule: the name is a target
    or ends with "." + target), by name; a target matching no Linear is refused."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = {}
    for target in targets:
        names = [n for n in linears if n == target or n.endswith("." + target)]
        if not names:
            raise ReproInputError(
                f"{SECTION}.targets: {target!r} matches no Linear layer of the UNet "
                f"({type(model).__name__})"
            )
        found.update({n: linears[n] for n in names})
    return dict(sorted(found.items()))


class GroupedLora:
    """LoRA updates of many LoRAs at once on the target Linear layers of a model, through
    forward hooks (the model's modules and weights stay as they are).

    `bind(factors)` gives, per layer, A [G, r, in] and B [G, out, r] of the G LoRAs of
    the coming forward, whose batch is G equal contiguous blocks (block g: LoRA g);
    `unbind()` (or `with lora.bound(...)`) makes the layers plain again.
    """

    def __init__(self, model: nn.Module, targets: Sequence[str], rank: int, scale: float):
        self.modules = target_modules(model, targets)
        self.rank, self.scale = int(rank), float(scale)
        self._factors: Mapping[str, Tensor] | None = None
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()
        ]

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """{layer: (out, in)} of every adapted layer."""
        return {n: (m.out_features, m.in_features) for n, m in self.modules.items()}

    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        """{"<layer>.lora_A": (r, in), "<layer>.lora_B": (out, r)} of one LoRA."""
        shapes = {}
        for name, (out, inp) in self.shapes.items():
            shapes[f"{name}.lora_A"] = (self.rank, inp)
            shapes[f"{name}.lora_B"] = (out, self.rank)
        return shapes

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output: Tensor) -> Tensor:
            if self._factors is None:
                return output
            a, b = self._factors[f"{name}.lora_A"], self._factors[f"{name}.lora_B"]
            x = args[0]
            groups = a.shape[0]
            if x.shape[0] % groups:
                raise ValueError(f"{name}: batch {x.shape[0]} is not {groups} equal blocks")
            xs = x.reshape(groups, -1, x.shape[-1])  # [G, samples x tokens, in]
            update = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
            return output + self.scale * update.reshape(output.shape)

        return hook

    def bind(self, factors: Mapping[str, Tensor]) -> None:
        self._factors = factors

    def unbind(self) -> None:
        self._factors = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def initial_factors(
    specs: Sequence[LoraSpec],
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    init_seed: int | None = None,
) -> dict[str, Tensor]:
    """Stacked factors [N, ...] at peft's "gaussian" init: A ~ N(0, 1/r), B = 0; A drawn
    from `init_seed` for every LoRA alike (a training script with a fixed seed), or, when
    None, from each LoRA's own seed. Layers are drawn in sorted order."""
    factors = {key: torch.zeros(len(specs), *shape) for key, shape in sorted(shapes.items())}
    for row, spec in enumerate(specs):
        gen = torch.Generator().manual_seed(spec.seed if init_seed is None else int(init_seed))
        for key, shape in sorted(shapes.items()):
            if key.endswith(".lora_A"):
                factors[key][row] = torch.randn(shape, generator=gen) / rank
    return factors


def probed_weights(factors: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """{"<layer>.weight": scale * B @ A} [N, out, in] of stacked factors."""
    out = {}
    for key in factors:
        if key.endswith(".lora_A"):
            layer = key[: -len(".lora_A")]
            out[f"{layer}.weight"] = scale * factors[f"{layer}.lora_B"] @ factors[key]
    return out


# ----------------------------------------------------------------------------- training


def batch_rows(n: int, batch_size: int, gen: torch.Generator) -> Tensor:
    """`batch_size` of n rows: whole shuffled passes, then part of one more."""
    passes = -(-batch_size // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[:batch_size]


def lora_draws(
    spec: LoraSpec, step: int, batch_size: int, num_timesteps: int, image_shape
) -> tuple[Tensor, Tensor, Tensor]:
    """(rows of spec.images, timesteps, noise) of one LoRA's batch at `step`: a function of
    (its seed, step) alone, however many LoRAs train beside it."""
    gen = torch.Generator().manual_seed(spec.seed * STEP_STRIDE + step)
    rows = batch_rows(len(spec.images), batch_size, gen)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=gen)
    noise = torch.randn((batch_size, *image_shape), generator=gen)
    return rows, t, noise


class LoraTrainer:
    """Everything a step needs: the t2i (frozen), the corpus images in model space, the
    captions' hidden states per class and the grouped LoRA hooks."""

    def __init__(self, t2i, lora: GroupedLora, images: Tensor, hidden: Tensor, batch_size: int):
        self.t2i, self.lora, self.batch_size = t2i, lora, int(batch_size)
        self.x0 = images  # [N corpus, C, H, W] in model space, on the device
        self.hidden = hidden  # [num_classes or 1, L, D]: the captions' hidden states
        self.scheduler = t2i.scheduler

    def batch(self, specs: Sequence[LoraSpec], step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t, hidden, target) of the LoRAs' blocks at `step`, concatenated."""
        device = self.x0.device
        shape = tuple(self.x0.shape[1:])
        T = int(self.scheduler.config.num_train_timesteps)
        rows, ts, noises = [], [], []
        for spec in specs:
            r, t, noise = lora_draws(spec, step, self.batch_size, T, shape)
            rows.append(torch.tensor(spec.images)[r])
            ts.append(t)
            noises.append(noise)
        rows = torch.cat(rows).to(device)
        t = torch.cat(ts).to(device)
        noise = torch.cat(noises).to(device)
        x0 = self.x0[rows]
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        labels = torch.tensor(
            [spec.label if len(self.hidden) > 1 else 0 for spec in specs], device=device
        )
        hidden = self.hidden[labels.repeat_interleave(self.batch_size)]
        return x_t, t, hidden, target

    def losses(self, specs: Sequence[LoraSpec], factors: Mapping[str, Tensor], step: int) -> Tensor:
        """Each LoRA's mean denoising loss [G] at `step` with `factors` [G, ...] bound
        (None: the unadapted model)."""
        x_t, t, hidden, target = self.batch(specs, step)
        if factors is not None:
            self.lora.bind(factors)
        try:
            pred = self.t2i.unet(x_t, t, encoder_hidden_states=hidden).sample
        finally:
            self.lora.unbind()
        mse = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
        return mse.view(len(specs), self.batch_size).mean(1)


def caption_states(t2i, chars: str, caption: str) -> Tensor:
    """The frozen text encoder's hidden states of each class's caption [C, L, D] ("generic")
    or of "" [1, L, D] ("empty")."""
    from repro.foundation.corpus import generic_caption

    prompts = [generic_caption(ch) for ch in chars] if caption == "generic" else [""]
    with torch.no_grad():
        return t2i.encode_prompts(prompts).detach()


def train_loras(
    trainer: LoraTrainer,
    specs: Sequence[LoraSpec],
    factors: Mapping[str, Tensor],
    *,
    chunk: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    desc: str = "probex_lora_zoo",
) -> tuple[dict[str, Tensor], dict]:
    """Train every LoRA of `specs` from `factors` [N, ...] (their init) for its own steps at
    its own lr, `chunk` LoRAs per forward (None: all in training); returns the trained
    factors [N, ...] (CPU) and a summary (steps, resumed_from, final_loss, seconds)."""
    device = trainer.x0.device
    total = max(spec.steps for spec in specs)
    steps = torch.tensor([spec.steps for spec in specs])
    lrs = torch.tensor([spec.lr for spec in specs], dtype=torch.float32)
    optimizer = StackedAdam({k: v.to(device) for k, v in factors.items()})
    stacked_checkpoints = StackedCheckpoints(checkpoint_dir, checkpoint_every, total, len(specs))
    start, last_loss = stacked_checkpoints.resume(optimizer)
    started = time.perf_counter()
    bar = tqdm(range(start, total), desc=desc, initial=start, total=total, disable=None)
    for step in bar:
        active = torch.nonzero(steps > step).flatten()
        size = len(active) if chunk is None else int(chunk)
        for begin in range(0, len(active), size):
            ids = active[begin : begin + size]
            on_device = ids.to(device)
            params = {k: v[on_device].requires_grad_() for k, v in optimizer.params.items()}
            losses = trainer.losses([specs[int(i)] for i in ids], params, step)
            if not torch.isfinite(losses).all():
                bad = [specs[int(i)].index for i in ids[~torch.isfinite(losses.detach().cpu())]]
                raise ReproInputError(f"{SECTION}.lr: loss diverged at step {step} for LoRAs {bad}")
            grads = torch.autograd.grad(losses.sum(), list(params.values()))
            optimizer.step(dict(zip(params, grads, strict=True)), lrs[ids].to(device), on_device)
            last_loss[ids] = losses.detach().cpu()
        done = step + 1
        bar.set_postfix(
            loras=len(active), loss=f"{float(last_loss[active].mean()):.3g}", refresh=False
        )
        stacked_checkpoints.maybe_save(done, optimizer, last_loss)
    bar.close()
    seconds = time.perf_counter() - started
    trained = {k: v.detach().cpu() for k, v in optimizer.params.items()}
    summary = {
        "steps": total,
        "resumed_from": start,
        "final_loss": float(last_loss.mean()),
        "train_seconds": seconds,
        "lora_steps": int(steps.sum()),
    }
    return trained, summary


@torch.no_grad()
def own_image_loss(
    trainer: LoraTrainer,
    specs: Sequence[LoraSpec],
    factors: Mapping[str, Tensor] | None,
    chunk: int = 256,
) -> list[float]:
    """Each LoRA's denoising loss on its own images (EVAL_REPEATS fixed draws of a batch,
    the same with and without the LoRA: `factors` None is the unadapted model)."""
    device = trainer.x0.device
    out = torch.zeros(len(specs))
    for begin in range(0, len(specs), chunk):
        rows = slice(begin, begin + chunk)
        bound = None if factors is None else {k: v[rows].to(device) for k, v in factors.items()}
        total = torch.zeros(len(specs[rows]))
        for repeat in range(EVAL_REPEATS):
            total += trainer.losses(specs[rows], bound, EVAL_STEP - repeat).cpu()
        out[rows] = total / EVAL_REPEATS
    return out.tolist()


# ----------------------------------------------------------------------------- the zoo


def write_lora_zoo(
    out: str | Path,
    classnames: list[str],
    layers: Mapping[str, tuple[int, int]],
    factors: Mapping[str, Tensor],
    specs: Sequence[LoraSpec],
    settings: ZooSettings,
    extra: Sequence[Mapping] | None = None,
) -> dict:
    """The zoo directory: one file per LoRA (probed weights and factors), then the manifest."""
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        (out / MANIFEST_NAME).unlink()  # an old zoo is incomplete from here on
    if (out / "models").exists():
        shutil.rmtree(out / "models")
    weights = probed_weights(factors, settings.scale)
    entries = []
    for row, spec in enumerate(specs):
        file = f"models/{spec.index:04d}.safetensors"
        info = {
            "lr": spec.lr,
            "steps": spec.steps,
            "seed": spec.seed,
            "rank": settings.rank,
            "alpha": settings.alpha,
            "caption": settings.caption,
            "images": spec.images,
        }
        state = {k: v[row].contiguous() for k, v in {**weights, **factors}.items()}
        write_zoo_model(
            out / file,
            state,
            [spec.label],
            {"tree": TREE, "arch": ARCH, "split": spec.split, **info},
        )
        entries.append(
            {
                "file": file,
                "labels": [spec.label],
                "split": spec.split,
                **info,
                **(extra or [{}] * len(specs))[row],
            }
        )
    return write_manifest(
        out / MANIFEST_NAME,
        tree=TREE,
        arch=ARCH,
        base=None,
        classnames=classnames,
        layers=layers,
        models=entries,
    )


def build_zoo(t2i, corpus, classnames: list[str], settings: ZooSettings, checkpoint_dir=None):
    """Train the zoo's LoRAs on `t2i` (loaded, on its device); returns (specs, layers,
    factors, per-LoRA losses, summary)."""
    num_classes = len(classnames)
    specs = draw_loras(settings, corpus.labels, num_classes)
    t2i.unet.requires_grad_(False)
    t2i.text_encoder.requires_grad_(False)
    t2i.unet.eval()
    lora = GroupedLora(t2i.unet, settings.targets, settings.rank, settings.scale)
    try:
        with torch.no_grad():
            x0 = torch.cat(
                [
                    t2i.to_model_space(corpus.images[i : i + 1024])
                    for i in range(0, len(corpus.images), 1024)
                ]
            )
        trainer = LoraTrainer(
            t2i, lora, x0, caption_states(t2i, corpus.chars, settings.caption), settings.batch_size
        )
        init = initial_factors(
            specs,
            lora.factor_shapes(),
            settings.rank,
            settings.seed if settings.init == "shared" else None,
        )
        before = own_image_loss(trainer, specs, None)
        factors, summary = train_loras(
            trainer,
            specs,
            init,
            chunk=settings.chunk,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=settings.checkpoint_every,
        )
        after = own_image_loss(trainer, specs, factors)
    finally:
        lora.remove()
    return specs, lora.shapes, factors, before, after, summary


def main(argv=None) -> None:
    from repro.core.stage import Stage
    from repro.foundation.corpus import load_corpus
    from repro.foundation.t2i import load_t2i

    stage = Stage(
        __doc__, paper="probex", out="the LoRA zoo directory", metrics=True, checkpoint_dir=True
    )
    stage.parser.add_argument("--corpus", required=True, help="glyph corpus (.safetensors)")
    args = stage.start(argv)
    params = stage.params
    settings = zoo_settings(params)
    num_classes = require(params, "num_classes", "probex")
    classnames = require(params, "classnames", "probex")
    if not isinstance(classnames, list) or len(classnames) != num_classes:
        raise ReproInputError(f"probex.classnames: {num_classes} names needed, got {classnames!r}")
    heldout = params.get("heldout")
    corpus = load_corpus(args.corpus, heldout) if heldout else _whole_corpus(args.corpus)
    if len(corpus.chars) != num_classes:
        raise ReproInputError(
            f"{args.corpus}: a corpus of {len(corpus.chars)} chars ({corpus.chars!r}), but "
            f"probex.num_classes is {num_classes}"
        )
    foundation = require(require(params, "foundation", "probex"), "t2i", "probex.foundation")
    t2i = load_t2i(foundation).to(stage.device)
    model_dir = foundation.get("pretrained")
    inputs = [args.corpus] + ([model_dir] if model_dir and Path(model_dir).is_dir() else [])
    specs, layers, factors, before, after, summary = build_zoo(
        t2i, corpus, classnames, settings, stage.checkpoints(*inputs)
    )
    if stage.is_main:
        write_lora_zoo(
            args.out,
            classnames,
            layers,
            factors,
            specs,
            settings,
            extra=[{"loss_before": b, "loss_after": a} for b, a in zip(before, after, strict=True)],
        )
    splits = [s.split for s in specs]
    improved = sum(a < b for b, a in zip(before, after, strict=True))
    stage.finish(
        stage.summary(
            summary,
            loras=len(specs),
            loras_train=splits.count("train"),
            loras_val=splits.count("val"),
            loras_test=splits.count("test"),
            layers=len(layers),
            lora_parameters=sum(v[0].numel() for v in factors.values()),
            own_loss_before=sum(before) / len(before),
            own_loss_after=sum(after) / len(after),
            own_loss_improved_fraction=improved / len(specs),
            seconds_per_step=summary["train_seconds"]
            / max(1, summary["steps"] - summary["resumed_from"]),
        )
    )


def _whole_corpus(path):
    """The corpus file with nothing held out (the zoo's images are a random part of it)."""
    from repro.core.data import load_image_dataset
    from repro.foundation.corpus import Corpus

    data = load_image_dataset(path, kind="glyphs")
    chars = data.meta.get("chars")
    if not isinstance(chars, str):
        raise ReproInputError(f"{path}: a glyph corpus needs meta.chars")
    empty = data.images[:0]
    return Corpus(
        data.images, data.labels, list(data.captions or []), empty, data.labels[:0], [], chars
    )


if __name__ == "__main__":
    from repro.core.stage import run

    run(main)
