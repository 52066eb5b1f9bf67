"""DataDream's classifier: CLIP fine-tuned with LoRA on q and v of both towers.

As in the paper and its official code: peft LoRA (rank r, alpha, dropout) on the
attention's q_proj and v_proj of every block of the vision AND the text tower (the
official code's merged qkv is split in transformers' CLIP, so q_proj / v_proj are its
q and v). Nothing else trains: not the towers, not the projections, not CLIP's
logit scale. The logits are CLIP's zero-shot classifier, kept trainable through the
LoRAs: logit_scale x cosine(image embedding, embedding of each class prompt), with the
class prompts re-encoded at every training step (the text tower's LoRA trains too).
LoRA's B starts at zero, so before training the classifier IS zero-shot CLIP.

The CLIP is repro.foundation.clip's Clip (model, tokenizer, normalisation), at any
scale: the tiny one the pipeline pre-trains, or openai/clip-vit-base-patch16.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repro.core.errors import ReproInputError

SECTION = "datadream.classifier"
DEFAULT_TARGETS = ("q_proj", "v_proj")


def lora_config(params: dict):
    """peft's LoraConfig from the classifier section: rank, alpha, dropout, targets."""
    from peft import LoraConfig

    for key in ("rank", "alpha", "dropout"):
        if key not in params:
            raise ReproInputError(f"{SECTION}.{key}: missing (got keys {sorted(params)})")
    rank, alpha, dropout = params["rank"], params["alpha"], params["dropout"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ReproInputError(f"{SECTION}.rank: must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise ReproInputError(f"{SECTION}.alpha: must be a number > 0, got {alpha!r}")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ReproInputError(f"{SECTION}.dropout: must be in [0, 1), got {dropout!r}")
    targets = params.get("targets", list(DEFAULT_TARGETS))
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ReproInputError(f"{SECTION}.targets: must be a list of module names, got {targets!r}")
    return LoraConfig(
        r=rank,
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(targets),
        bias="none",
    )


def attach_lora(model: nn.Module, params: dict, seed: int) -> list[str]:
    """Inject LoRA layers into `model` (a transformers CLIPModel) in place and freeze
    everything else; returns the names of the wrapped modules.

    The LoRA's A matrices are drawn from `seed` alone (B is zero). A target list that
    matches no module is a ReproInputError naming datadream.classifier.targets.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = lora_config(params)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unmatched = [t for t in config.target_modules if t not in names]
    if unmatched:
        raise ReproInputError(
            f"{SECTION}.targets: {sorted(unmatched)} match no module of the CLIP "
            f"(attention projections: q_proj, k_proj, v_proj, out_proj)"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


class ClipClassifier(nn.Module):
    """Logits over the classes of `prompts` (one per class) for images in [-1, 1].

    `clip` is a repro.foundation.clip.Clip; with `lora` (the classifier section) LoRA
    is attached to its model in place (seeded by `seed`), else it is zero-shot CLIP.
    """

    def __init__(self, clip, prompts: list[str], lora: dict | None = None, seed: int = 0):
        super().__init__()
        self.clip = clip
        self.model = clip.model  # a submodule: .train() / .eval() / .to() reach it
        self.prompts = list(prompts)
        self.lora_modules = attach_lora(self.model, lora, seed) if lora is not None else []
        if lora is None:
            self.model.requires_grad_(False)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters (the LoRAs' A and B), by name, in a fixed order."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.lora_parameters().values())

    def text_embeddings(self) -> Tensor:
        """The class prompts' L2-normalised embeddings [K, P] (grads flow to the text LoRAs)."""
        return self.clip.encode_text(self.prompts)

    def forward(self, images: Tensor, text: Tensor | None = None) -> Tensor:
        """logit_scale x cosine(image, class prompt): [N, K]. `text` (text_embeddings())
        may be passed in to encode the prompts once for many batches."""
        text = self.text_embeddings() if text is None else text
        image = self.clip.encode_images(images)
        # CLIP's learned temperature, frozen: a constant of the classifier.
        return self.clip.logit_scale.detach() * image @ text.T

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Predicted class per image (eval mode: no LoRA dropout), on the CPU."""
        was_training = self.training
        self.eval()
        try:
            text = self.text_embeddings()
            preds = [
                self(images[i : i + batch_size], text).argmax(dim=1).cpu()
                for i in range(0, len(images), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)

    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
        """Fraction of `images` classified as `labels`."""
        if len(labels) == 0:
            return float("nan")
        # An exact fraction (count / n), not a float32 mean: the table shows it as is.
        return int((self.predict(images, batch_size) == labels.cpu()).sum()) / len(labels)


class LoraWeights(nn.Module):
    """The LoRA parameters of a ClipClassifier as one module (the same Parameter objects):
    what a checkpoint saves and restores, instead of the whole CLIP (150M parameters at
    paper scale, of which the LoRAs are ~1%)."""

    def __init__(self, parameters: dict[str, nn.Parameter]):
        super().__init__()
        # ParameterDict keys may not contain dots.
        self.weights = nn.ParameterDict({k.replace(".", "__"): p for k, p in parameters.items()})
