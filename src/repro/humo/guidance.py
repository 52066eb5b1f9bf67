"""HuMo's multi-condition classifier-free guidance: which predictions a step needs, and their sum.

A prediction is named by the conditions it sees: "tia" (text, image, audio), "ti",
"ta", "t", "i", "0" (nothing). Text absent means the negative / empty prompt, image
absent no reference frame, audio absent no audio tokens. Each CFG form is a base
prediction plus weighted differences of nested condition sets:

- "paper" (Eq. 4, time-adaptive): v = l_a (v_tia - v_ti) + l_img (v_ti - v_t)
  + l_txt (v_t - v_0) + v_0, with weights "early" while sigma > switch and "late" after.
- "fixed": Eq. 4 with ONE set of weights at every step (the ablation of the switch).
- "code_17b" (the released 17B code, 3 predictions a step): early (sigma > switch)
  v = a (v_tia - v_ti) + t_early (v_ti - v_i) + v_i; later
  v = a (v_tia - v_ti) + t_late (v_ti - v_0) + v_0.
- "code_1_7b" (the released 1.7B code, 4 predictions, no switch):
  v = s_i (v_tia - v_ta) + s_a (v_ta - v_t) + s_t (v_t - v_0) + v_0.

A task without a condition (TI: no audio, TA: no image) removes that condition from
every prediction of the form; a difference whose two sides become equal is zero and is
dropped, so a task never asks for a condition it lacks. E.g. "paper" under TA:
v = l_a (v_ta - v_t) + l_txt (v_t - v_0) + v_0 (the 1.7B code's TA form is exactly
this rule applied to its TIA form; the 17B code's TA uses its early text weight at
every step, where this rule keeps the switch).

sigma is the flow's noise level in [0, 1], the official code's timestep / 1000: its
switch "t > 980" is sigma > 0.98.

    for name in needed(form, sigma, task): preds[name] = humo.velocity(...)
    v = combine(form, preds, sigma, weights, task)
    # or, batched: velocity_fn = guided_velocity(humo, form, weights, task, text=..., ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from repro.core.errors import ReproInputError

FORMS = ("paper", "code_17b", "code_1_7b", "fixed")
TASKS = ("TIA", "TI", "TA")
CONDITIONS = ("t", "i", "a")  # the order of letters in a prediction's name

# The defaults of humo.cfg (the config's values), and why:
# - paper: early steps (sigma > 0.98: the first ~5 of the code's 50 steps at shift 5)
#   lay out the scene and the person, so text (7.5, the 1.7B code's text scale) and image
#   (5.0) lead and audio is left at 1.0 (no extra audio push: the mouth is a late, fine
#   detail); later steps weight audio 5.5 (the released scale_a) with image and text at
#   3.0 (the 17B code's late text scale, 5.0 - 2.0), the paper's "later steps weight
#   audio/image".
# - code_17b: the released generate.yaml (scale_a 5.5, scale_t 5.0, step_change 980)
#   and its late text scale scale_t - 2.0 = 3.0.
# - code_1_7b: the released generate_1_7B.yaml (scale_t 7.5, scale_i 4.0, scale_a 7.5;
#   its example script lowers scale_t to 7.0).
# - fixed: the paper form's late weights at every step, so "paper" vs "fixed" differ in
#   the early steps only: the time-adaptive switch is the one thing compared.
DEFAULT_WEIGHTS: dict[str, dict] = {
    "paper": {
        "switch": 0.98,
        "early": {"audio": 1.0, "image": 5.0, "text": 7.5},
        "late": {"audio": 5.5, "image": 3.0, "text": 3.0},
    },
    "code_17b": {"switch": 0.98, "audio": 5.5, "text_early": 5.0, "text_late": 3.0},
    "code_1_7b": {"image": 4.0, "audio": 7.5, "text": 7.5},
    "fixed": {"audio": 5.5, "image": 3.0, "text": 3.0},
}

_EQ4 = ("audio", "image", "text")
_KEYS = {
    "paper": ("switch", "early", "late"),
    "code_17b": ("switch", "audio", "text_early", "text_late"),
    "code_1_7b": ("image", "audio", "text"),
    "fixed": _EQ4,
}


def name_of(conditions) -> str:
    """The prediction's name of a set of conditions: letters in t, i, a order, "0" if none."""
    return "".join(c for c in CONDITIONS if c in conditions) or "0"


def conditions_of(name: str) -> frozenset[str]:
    """The conditions a prediction's name stands for ("0": none)."""
    if name == "0":
        return frozenset()
    if not name or any(c not in CONDITIONS for c in name) or name != name_of(name):
        raise ValueError(f"guidance: {name!r} is not a prediction name (e.g. 'tia', 'ta', '0')")
    return frozenset(name)


def _check_form(form: str) -> str:
    if form not in FORMS:
        raise ReproInputError(f"humo.cfg.form: unknown CFG form {form!r} (allowed {FORMS})")
    return form


def _task_conditions(task: str) -> frozenset[str]:
    if task not in TASKS:
        raise ReproInputError(f"humo.generate.tasks: unknown task {task!r} (allowed {TASKS})")
    return frozenset(task.lower())


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReproInputError(f"{key}: {value!r} is not a number")
    return float(value)


def check_weights(form: str, weights: Mapping | None) -> dict:
    """The weights of `form` (None: DEFAULT_WEIGHTS), checked: every key present and a
    number, no unknown key, switch in [0, 1]. Errors name the key humo.cfg.<form>.<key>."""
    _check_form(form)
    weights = DEFAULT_WEIGHTS[form] if weights is None else weights
    prefix = f"humo.cfg.{form}"
    if not isinstance(weights, Mapping):
        raise ReproInputError(f"{prefix}: expected a mapping of weights, got {weights!r}")
    unknown = sorted(set(weights) - set(_KEYS[form]))
    if unknown:
        raise ReproInputError(f"{prefix}: unknown keys {unknown} (expected {list(_KEYS[form])})")
    checked: dict = {}
    for key in _KEYS[form]:
        if key not in weights:
            raise ReproInputError(f"{prefix}.{key}: missing")
        if key in ("early", "late"):
            part = weights[key]
            if not isinstance(part, Mapping) or set(part) != set(_EQ4):
                raise ReproInputError(f"{prefix}.{key}: expected exactly the keys {list(_EQ4)}")
            checked[key] = {k: _number(part[k], f"{prefix}.{key}.{k}") for k in _EQ4}
        else:
            checked[key] = _number(weights[key], f"{prefix}.{key}")
    if "switch" in checked and not 0.0 <= checked["switch"] <= 1.0:
        raise ReproInputError(f"{prefix}.switch: {checked['switch']} is not in [0, 1]")
    return checked


def _form_terms(form: str, sigma: float, w: dict) -> tuple[list[tuple[float, set, set]], set]:
    """The form at this step: [(weight, conditions of the minuend, of the subtrahend)], base."""
    tia, ti, ta, t, i, none = {"t", "i", "a"}, {"t", "i"}, {"t", "a"}, {"t"}, {"i"}, set()
    if form in ("paper", "fixed"):
        if form == "paper":
            w = w["early"] if sigma > w["switch"] else w["late"]
        return [(w["audio"], tia, ti), (w["image"], ti, t), (w["text"], t, none)], none
    if form == "code_17b":
        if sigma > w["switch"]:
            return [(w["audio"], tia, ti), (w["text_early"], ti, i)], i
        return [(w["audio"], tia, ti), (w["text_late"], ti, none)], none
    return [(w["image"], tia, ta), (w["audio"], ta, t), (w["text"], t, none)], none


def _plan(form: str, sigma, weights, task: str) -> tuple[list[tuple[float, str, str]], str]:
    """The form restricted to the task's conditions: named terms (zero ones dropped), base."""
    _check_form(form)
    have = _task_conditions(task)
    w = check_weights(form, weights)
    terms, base = _form_terms(form, float(sigma), w)
    named = []
    for weight, plus, minus in terms:
        plus, minus = name_of(plus & have), name_of(minus & have)
        if plus != minus:
            named.append((weight, plus, minus))
    return named, name_of(base & have)


def needed(
    form: str, sigma: float, task: str = "TIA", weights: Mapping | None = None
) -> tuple[str, ...]:
    """The predictions `combine` uses at this step, in order of use (the first is the
    most conditioned). Only the switch of `weights` matters here (default: the form's)."""
    terms, base = _plan(form, sigma, weights, task)
    names: list[str] = []
    for _, plus, minus in terms:
        names += [n for n in (plus, minus) if n not in names]
    if base not in names:
        names.append(base)
    return tuple(names)


def combine(
    form: str,
    preds: Mapping[str, Tensor],
    sigma: float,
    weights: Mapping | None = None,
    task: str = "TIA",
) -> Tensor:
    """The guided velocity: preds[base] + sum of weight * (preds[plus] - preds[minus]).

    `preds` maps prediction names to velocities (at least `needed(form, sigma, task)`);
    `weights` is humo.cfg.<form> (None: DEFAULT_WEIGHTS[form]).
    """
    terms, base = _plan(form, sigma, weights, task)
    missing = [n for n in needed(form, sigma, task, weights) if n not in preds]
    if missing:
        raise ValueError(f"combine({form!r}, task {task}): predictions {missing} missing")
    v = preds[base]
    for weight, plus, minus in terms:
        v = v + weight * (preds[plus] - preds[minus])
    return v


# ----------------------------------------------------------------------------- running them


def predict(
    humo,
    names,
    x: Tensor,
    sigma: float,
    *,
    text: Tensor,
    negative_text: Tensor,
    reference: Tensor | None = None,
    audio: Tensor | None = None,
    mode: str | None = None,
    batch: bool = True,
) -> dict[str, Tensor]:
    """The velocities `names` of a HuMo at (x, sigma), one model call per group.

    text / negative_text [B or 1, L, D]: the prompts and the negative (empty) prompt;
    reference [B, C, 1, h, w] and audio windows [B, F, W, G, D]: needed only by the names
    that contain "i" / "a". With `batch`, the predictions that agree on the reference
    frame's presence share one call (rows stacked; audio switched off per row by
    HuMo.velocity's `audio_on`); in mode "overwrite_last" a zero reference is "no image",
    so every prediction shares one call. Without `batch`, one call per name.
    """
    mode = humo.injection if mode is None else mode
    size = x.shape[0]
    text = text.expand(size, -1, -1)
    negative_text = negative_text.expand(size, -1, -1)
    wanted = [(name, conditions_of(name)) for name in names]
    for name, conds in wanted:
        if "i" in conds and reference is None:
            raise ValueError(f"predict: {name!r} needs a reference")
        if "a" in conds and audio is None:
            raise ValueError(f"predict: {name!r} needs audio")
    if not batch:
        return {
            name: humo.velocity(
                x,
                sigma,
                text if "t" in conds else negative_text,
                reference=reference if "i" in conds else None,
                audio=audio if "a" in conds else None,
                mode=mode,
            )
            for name, conds in wanted
        }
    if mode == "overwrite_last":
        groups = [wanted]
    else:
        groups = [[w for w in wanted if "i" in w[1]], [w for w in wanted if "i" not in w[1]]]
    preds: dict[str, Tensor] = {}
    for group in groups:
        if not group:
            continue
        with_image = any("i" in conds for _, conds in group)
        with_audio = any("a" in conds for _, conds in group)
        refs = None
        if with_image:
            zero = torch.zeros_like(reference)
            refs = torch.cat([reference if "i" in conds else zero for _, conds in group])
        v = humo.velocity(
            torch.cat([x] * len(group)),
            sigma,
            torch.cat([text if "t" in conds else negative_text for _, conds in group]),
            reference=refs,
            audio=torch.cat([audio] * len(group)) if with_audio else None,
            mode=mode,
            audio_on=(
                torch.tensor(["a" in conds for _, conds in group]).repeat_interleave(size)
                if with_audio
                else None
            ),
        )
        for (name, _), part in zip(group, v.split(size), strict=True):
            preds[name] = part
    return preds


def guided_velocity(
    humo,
    form: str,
    weights: Mapping | None,
    task: str,
    *,
    text: Tensor,
    negative_text: Tensor,
    reference: Tensor | None = None,
    audio: Tensor | None = None,
    mode: str | None = None,
    batch: bool = True,
) -> Callable[[Tensor, float], Tensor]:
    """velocity_fn(x, sigma) for repro.foundation.t2v.euler_sample: at each step the
    predictions `needed` by the form (`predict`), combined by `combine`. The task decides
    which of reference / audio are used (TI ignores audio, TA the reference)."""
    _task_conditions(task)
    check_weights(form, weights)
    reference = reference if "I" in task else None
    audio = audio if "A" in task else None

    def velocity_fn(x: Tensor, sigma: float) -> Tensor:
        names = needed(form, sigma, task, weights)
        preds = predict(
            humo,
            names,
            x,
            sigma,
            text=text,
            negative_text=negative_text,
            reference=reference,
            audio=audio,
            mode=mode,
            batch=batch,
        )
        return combine(form, preds, sigma, weights, task)

    return velocity_fn
