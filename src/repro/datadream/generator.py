"""DataDream's generator LoRA: peft LoRA layers on the text-to-image model's UNet AND text encoder.

The paper (and the official code) adapts SD 2.1 with LoRA r 16, alpha 16, "gaussian"
init, on the UNet's attention projections to_q / to_k / to_v / to_out.0 (plus
add_k_proj / add_v_proj where the blocks have them) and on the text encoder's
q_proj / k_proj / v_proj / out_proj. The same code adapts the tiny t2i of
repro.foundation.t2i: only the model is smaller.

    lora = GeneratorLora(t2i, lora_settings(params["lora"]), seed=0)   # attached, B = 0
    lora.parameters()          # the only trainable parameters of the model now
    lora.state() / lora.load_state(state, where)
    lora.reset()               # back to the seeded gaussian init (one LoRA per class)
    lora.set_scale(0.0)        # output == the unadapted model's, exactly
    save_lora(path, {"all": lora.state()}, meta) / load_lora(path)

A LoRA file (kind "datadream_lora") holds one or more LoRA states ("groups"): one per
class for DataDream_cls (named by the class name), one ("all") for DataDream_dset,
with the LoRA settings needed to attach the same layers again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from repro.core.errors import ReproInputError
from repro.core.io import load_tensors, save_tensors

KIND = "datadream_lora"
ADAPTER = "datadream"  # the peft adapter name of the generator LoRA
COMPONENTS = ("unet", "text_encoder")
# The config key of each component's target list, as errors name it.
TARGET_KEYS = {"unet": "datadream.lora.unet_targets", "text_encoder": "datadream.lora.text_targets"}
# Projections that only attention blocks with extra key/value inputs have (diffusers'
# added_kv_proj_dim: SimpleCrossAttn* blocks). The paper's list names them for the UNets
# that have them; SD 2.1's and the tiny t2i's blocks have none, so they may match nothing.
# Every other target that matches no module is a config error.
WHERE_PRESENT = frozenset({"add_k_proj", "add_v_proj"})
INITS = ("gaussian",)
DSET_GROUP = "all"  # the one group of a DataDream_dset LoRA file


def lora_settings(params: Mapping) -> dict:
    """The LoRA settings of the config section datadream.lora, checked: {rank, alpha, init,
    unet_targets, text_targets}."""
    settings = {}
    for key in ("rank", "alpha"):
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ReproInputError(f"datadream.lora.{key}: must be a number > 0, got {value!r}")
        settings[key] = value
    if int(settings["rank"]) != settings["rank"]:
        raise ReproInputError(f"datadream.lora.rank: must be an integer, got {settings['rank']}")
    settings["rank"] = int(settings["rank"])
    init = params.get("init", "gaussian")
    if init not in INITS:
        raise ReproInputError(f"datadream.lora.init: {init!r} is not one of {list(INITS)}")
    settings["init"] = init
    for key in TARGET_KEYS.values():
        name = key.rsplit(".", 1)[1]
        targets = params.get(name)
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
        ):
            raise ReproInputError(
                f"{key}: must be a non-empty list of module names, got {targets!r}"
            )
        settings[name] = list(targets)
    return settings


def matching_modules(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """For every target, the names of the modules of `model` it selects, by peft's rule
    for a list of targets: the module's name is the target or ends with "." + target."""
    names = [name for name, _ in model.named_modules()]
    return {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers inside `model`, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


class GeneratorLora:
    """The LoRA of one text-to-image model (anything with .unet and .text_encoder modules).

    Attaching freezes every weight of the model and makes the LoRA weights the only
    trainable ones. The LoRA starts from peft's "gaussian" init (A ~ N(0, 1/r), B = 0:
    the model's output is unchanged), A drawn from `seed` alone so that `reset` gives the
    same start for every class of DataDream_cls, as separate runs with one seed would.
    """

    def __init__(self, t2i, settings: dict, seed: int):
        from peft import LoraConfig, inject_adapter_in_model

        self.t2i = t2i
        self.settings = dict(settings)
        self.seed = int(seed)
        # Checked before any layer is touched: a bad target leaves the model as it was.
        self.targets = {
            component: self._check_targets(component, getattr(t2i, component))
            for component in COMPONENTS
        }
        for component in COMPONENTS:
            model = getattr(t2i, component)
            model.requires_grad_(False)
            targets = [t for t, names in self.targets[component].items() if names]
            config = LoraConfig(
                r=self.settings["rank"],
                lora_alpha=self.settings["alpha"],
                init_lora_weights=self.settings["init"],
                target_modules=targets,
                lora_dropout=0.0,
            )
            try:
                inject_adapter_in_model(config, model, adapter_name=ADAPTER)
            except ValueError as err:  # e.g. a target that names a module peft cannot adapt
                raise ReproInputError(f"{TARGET_KEYS[component]}: {err}") from err
        self._parameters = {}
        for component in COMPONENTS:
            for name, param in getattr(t2i, component).named_parameters():
                is_lora = f".{ADAPTER}." in name and (".lora_A." in name or ".lora_B." in name)
                param.requires_grad_(is_lora)
                if is_lora:
                    self._parameters[f"{component}.{name}"] = param
        self.reset()

    def _check_targets(self, component: str, model: nn.Module) -> dict[str, list[str]]:
        found = matching_modules(model, self.settings[TARGET_KEYS[component].rsplit(".", 1)[1]])
        unmatched = [t for t, names in found.items() if not names and t not in WHERE_PRESENT]
        if unmatched:
            raise ReproInputError(
                f"{TARGET_KEYS[component]}: {unmatched} match no module of the "
                f"{component} ({type(model).__name__}); its attention projections are named "
                f"{_projection_names(model)}"
            )
        if not any(found.values()):
            raise ReproInputError(
                f"{TARGET_KEYS[component]}: {list(found)} match no module of the {component}"
            )
        return found

    # ------------------------------------------------------------------ what is attached

    def counts(self) -> dict[str, dict[str, int]]:
        """LoRA layers attached per component and target (0 for an absent where-present one)."""
        out = {}
        for component in COMPONENTS:
            layers = lora_layers(getattr(self.t2i, component))
            out[component] = {
                target: sum(1 for n in layers if n == target or n.endswith("." + target))
                for target in self.targets[component]
            }
        return out

    def parameters(self) -> list[nn.Parameter]:
        return list(self._parameters.values())

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._parameters.values())

    def module(self) -> nn.Module:
        """An nn.Module whose state is exactly the LoRA weights (the same tensors): what a
        training checkpoint saves, without the frozen model."""
        return _LoraParameters(self._parameters)

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the LoRA weights, keyed "<component>.<module>.lora_[AB].<adapter>.weight"."""
        return {k: p.detach().clone() for k, p in self._parameters.items()}

    def load_state(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Set the LoRA weights; a state of other layers or shapes is refused, naming `where`."""
        missing = sorted(set(self._parameters) - set(state))
        extra = sorted(set(state) - set(self._parameters))
        if missing or extra:
            raise ReproInputError(
                f"{where}: LoRA weights do not fit the attached layers "
                f"({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} unexpected, "
                f"e.g. {extra[:2]})"
            )
        with torch.no_grad():
            for key, param in self._parameters.items():
                value = state[key]
                if value.shape != param.shape:
                    raise ReproInputError(
                        f"{where}: {key} has shape {tuple(value.shape)}, the attached layer "
                        f"{tuple(param.shape)}"
                    )
                if not torch.isfinite(value).all():
                    raise ReproInputError(f"{where}: {key} holds NaN or inf")
                param.copy_(value.to(param.device, param.dtype))

    def reset(self) -> None:
        """The seeded gaussian init: every A ~ N(0, 1/r) from `seed`, every B = 0."""
        gen = torch.Generator().manual_seed(self.seed)
        std = 1.0 / self.settings["rank"]
        with torch.no_grad():
            # Sorted keys: the draw order does not depend on module registration order.
            for key in sorted(self._parameters):
                param = self._parameters[key]
                if ".lora_A." in key:
                    value = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
                    param.copy_(value.to(param.device, param.dtype))
                else:
                    param.zero_()

    # ------------------------------------------------------------------ scale

    def set_scale(self, scale: float) -> None:
        """Multiply every LoRA update by `scale` (alpha / r x scale); 0 gives the unadapted
        model's outputs exactly (base + 0), 1 the trained LoRA."""
        for component in COMPONENTS:
            for layer in lora_layers(getattr(self.t2i, component)).values():
                layer.set_scale(ADAPTER, float(scale))

    @contextlib.contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        self.set_scale(scale)
        try:
            yield
        finally:
            self.set_scale(1.0)


class _LoraParameters(nn.Module):
    """The LoRA weights as one module's parameters (shared tensors, not copies)."""

    def __init__(self, parameters: Mapping[str, nn.Parameter]):
        super().__init__()
        # Parameter names may not contain ".": "/" stands in for it.
        self.lora = nn.ParameterDict({k.replace(".", "/"): p for k, p in parameters.items()})


def _projection_names(model: nn.Module) -> list[str]:
    """The distinct last names of the Linear layers inside attention modules (a hint)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "attn" in name.lower():
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(names)


# ---------------------------------------------------------------------- files


def save_lora(
    path: str | os.PathLike,
    groups: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    variant: str,
    classes: list[str],
    settings: dict,
    extra_meta: Mapping[str, object] | None = None,
) -> None:
    """One safetensors file (kind datadream_lora) holding every group's LoRA state."""
    tensors = {}
    for group, state in groups.items():
        if "/" in group:
            raise ValueError(f"LoRA group names may not contain '/': {group!r}")
        for key, value in state.items():
            tensors[f"{group}/{key}"] = value
    meta = {
        "variant": variant,
        "classes": list(classes),
        "groups": list(groups),
        "lora": dict(settings),
        **dict(extra_meta or {}),
    }
    save_tensors(path, tensors, KIND, meta)


def load_lora(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(groups, meta) of a LoRA file; a missing, truncated or foreign file, or one whose
    metadata or groups are incomplete, is refused naming the file."""
    path = Path(path)
    tensors, meta = load_tensors(path, kind=KIND)
    for key in ("variant", "classes", "groups", "lora"):
        if key not in meta:
            raise ReproInputError(f"{path}: LoRA file without '{key}' in its metadata")
    try:
        settings = lora_settings(meta["lora"])
    except ReproInputError as err:
        raise ReproInputError(f"{path}: its LoRA settings are invalid ({err})") from err
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in meta["groups"]}
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        if group not in groups or not name:
            raise ReproInputError(f"{path}: tensor {key!r} belongs to no listed LoRA group")
        groups[group][name] = value
    empty = [g for g, state in groups.items() if not state]
    if empty:
        raise ReproInputError(f"{path}: LoRA groups {empty} hold no weights")
    return groups, {**meta, "lora": settings}


def lora_group(variant: str, classname: str) -> str:
    """The group of a LoRA file that generates class `classname`."""
    return classname if variant == "cls" else DSET_GROUP
