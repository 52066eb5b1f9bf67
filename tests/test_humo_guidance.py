"""HuMo's CFG forms (repro.humo.guidance) against hand-written combinations of stubbed
predictions, and the batched prediction helper on a tiny HuMo."""

import pytest
import torch

from repro.core.errors import ReproInputError
from repro.humo.guidance import (
    DEFAULT_WEIGHTS,
    FORMS,
    check_weights,
    combine,
    conditions_of,
    guided_velocity,
    name_of,
    needed,
    predict,
)

torch.set_num_threads(1)

# Weights unlike each other and unlike the defaults, so a swapped key shows.
WEIGHTS = {
    "paper": {
        "switch": 0.9,
        "early": {"audio": 1.5, "image": 2.5, "text": 3.5},
        "late": {"audio": 4.5, "image": 5.5, "text": 6.5},
    },
    "code_17b": {"switch": 0.9, "audio": 2.0, "text_early": 3.0, "text_late": 4.0},
    "code_1_7b": {"image": 2.25, "audio": 3.75, "text": 5.5},
    "fixed": {"audio": 1.25, "image": 2.75, "text": 3.25},
}
NAMES = ("tia", "ti", "ta", "t", "i", "a", "ia", "0")
EARLY, LATE = 0.95, 0.5  # either side of the 0.9 switch


@pytest.fixture
def preds():
    """Every possible prediction, random and distinct: using a wrong one changes the sum."""
    gen = torch.Generator().manual_seed(0)
    return {n: torch.randn(2, 3, 4, dtype=torch.float64, generator=gen) for n in NAMES}


def hand(form, task, early, p):
    """The guided velocity and the predictions it uses, written out per case."""
    w = WEIGHTS[form]
    if form in ("paper", "fixed"):
        e = w if form == "fixed" else w["early" if early else "late"]
        la, li, lt = e["audio"], e["image"], e["text"]
        if task == "TIA":
            v = (
                la * (p["tia"] - p["ti"])
                + li * (p["ti"] - p["t"])
                + lt * (p["t"] - p["0"])
                + p["0"]
            )
            return v, {"tia", "ti", "t", "0"}
        if task == "TA":
            return la * (p["ta"] - p["t"]) + lt * (p["t"] - p["0"]) + p["0"], {"ta", "t", "0"}
        return li * (p["ti"] - p["t"]) + lt * (p["t"] - p["0"]) + p["0"], {"ti", "t", "0"}
    if form == "code_17b":
        a, te, tl = w["audio"], w["text_early"], w["text_late"]
        if task == "TIA" and early:
            return a * (p["tia"] - p["ti"]) + te * (p["ti"] - p["i"]) + p["i"], {"tia", "ti", "i"}
        if task == "TIA":
            return a * (p["tia"] - p["ti"]) + tl * (p["ti"] - p["0"]) + p["0"], {"tia", "ti", "0"}
        if task == "TA":  # the image gone: v_ti -> v_t, v_i -> v_0
            s = te if early else tl
            return a * (p["ta"] - p["t"]) + s * (p["t"] - p["0"]) + p["0"], {"ta", "t", "0"}
        if early:  # TI: the audio term vanishes (v_tia -> v_ti)
            return te * (p["ti"] - p["i"]) + p["i"], {"ti", "i"}
        return tl * (p["ti"] - p["0"]) + p["0"], {"ti", "0"}
    si, sa, st = w["image"], w["audio"], w["text"]  # code_1_7b, no switch
    if task == "TIA":
        v = si * (p["tia"] - p["ta"]) + sa * (p["ta"] - p["t"]) + st * (p["t"] - p["0"]) + p["0"]
        return v, {"tia", "ta", "t", "0"}
    if task == "TA":
        return sa * (p["ta"] - p["t"]) + st * (p["t"] - p["0"]) + p["0"], {"ta", "t", "0"}
    return si * (p["ti"] - p["t"]) + st * (p["t"] - p["0"]) + p["0"], {"ti", "t", "0"}


CASES = [
    (form, task, early) for form in FORMS for task in ("TIA", "TI", "TA") for early in (True, False)
]


@pytest.mark.parametrize("form, task, early", CASES)
def test_forms_against_hand_combinations(preds, form, task, early):
    sigma = EARLY if early else LATE
    expected, used = hand(form, task, early, preds)
    names = needed(form, sigma, task, WEIGHTS[form])
    assert set(names) == used and len(names) == len(used)
    got = combine(form, preds, sigma, WEIGHTS[form], task)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Only the needed predictions are read: the others may be missing.
    only = {n: preds[n] for n in names}
    torch.testing.assert_close(combine(form, only, sigma, WEIGHTS[form], task), expected)


@pytest.mark.parametrize("form", FORMS)
def test_tasks_never_ask_for_a_missing_condition(form):
    for sigma in (0.0, 0.5, 0.9, 0.91, 1.0):
        for task, lacking in (("TA", "i"), ("TI", "a")):
            assert not any(lacking in n for n in needed(form, sigma, task, WEIGHTS[form]))
        assert needed(form, sigma, "TIA", WEIGHTS[form])[0] == "tia"


def test_switch_is_strictly_above(preds):
    # The code switches at "t > 980": sigma exactly at the switch is a late step.
    for form in ("paper", "code_17b"):
        weights = dict(WEIGHTS[form], switch=0.98)
        at = combine(form, preds, 0.98, weights)
        above = combine(form, preds, 0.98 + 1e-9, weights)
        early = {**WEIGHTS[form], "switch": 0.9}
        torch.testing.assert_close(at, combine(form, preds, LATE, early))
        torch.testing.assert_close(above, combine(form, preds, EARLY, early))
    assert "i" in needed("code_17b", 0.981, "TIA") and "0" in needed("code_17b", 0.98, "TIA")
    # Forms without a switch are the same at every step.
    for form in ("code_1_7b", "fixed"):
        torch.testing.assert_close(
            combine(form, preds, 0.99, WEIGHTS[form]), combine(form, preds, 0.1, WEIGHTS[form])
        )


def test_paper_form_moves_weight_to_audio_late(preds):
    # With the defaults: early steps push audio by 1.0 (no push), late by 5.5.
    d = DEFAULT_WEIGHTS["paper"]
    early = combine("paper", preds, 0.99, None) - combine("fixed", preds, 0.99, d["early"])
    late = combine("paper", preds, 0.5, None) - combine("fixed", preds, 0.5, d["late"])
    assert early.abs().max() == 0 and late.abs().max() == 0


def test_defaults_are_valid_and_used(preds):
    for form in FORMS:
        check_weights(form, DEFAULT_WEIGHTS[form])
        torch.testing.assert_close(
            combine(form, preds, 0.5, None), combine(form, preds, 0.5, DEFAULT_WEIGHTS[form])
        )
    w = DEFAULT_WEIGHTS["code_17b"]
    v = combine("code_17b", preds, 0.5, None)
    expected = 5.5 * (preds["tia"] - preds["ti"]) + 3.0 * (preds["ti"] - preds["0"]) + preds["0"]
    assert w["text_late"] == 3.0
    torch.testing.assert_close(v, expected)


def test_names():
    assert name_of({"a", "t"}) == "ta" and name_of(set()) == "0" and name_of({"i"}) == "i"
    assert conditions_of("tia") == {"t", "i", "a"} and conditions_of("0") == frozenset()
    for bad in ("at", "x", "", "tt"):
        with pytest.raises(ValueError):
            conditions_of(bad)


def test_bad_inputs(preds):
    with pytest.raises(ReproInputError, match="humo.cfg.form"):
        needed("eq5", 0.5, "TIA")
    with pytest.raises(ReproInputError, match="humo.cfg.form"):
        combine("eq5", preds, 0.5)
    with pytest.raises(ReproInputError, match="task"):
        needed("paper", 0.5, "IA")
    bad_late = {**WEIGHTS["paper"], "late": {"audio": 1.0, "image": 1.0}}
    with pytest.raises(ReproInputError, match="humo.cfg.paper.late"):
        combine("paper", preds, 0.5, bad_late)
    with pytest.raises(ReproInputError, match="humo.cfg.code_17b.text_late"):
        combine("code_17b", preds, 0.5, {"switch": 0.9, "audio": 1.0, "text_early": 1.0})
    with pytest.raises(ReproInputError, match="humo.cfg.fixed.audio"):
        combine("fixed", preds, 0.5, {"audio": "5", "image": 1.0, "text": 1.0})
    with pytest.raises(ReproInputError, match="humo.cfg.fixed"):
        combine("fixed", preds, 0.5, {**WEIGHTS["fixed"], "txt": 1.0})
    with pytest.raises(ReproInputError, match="humo.cfg.code_17b.switch"):
        combine("code_17b", preds, 0.5, {**WEIGHTS["code_17b"], "switch": 980})
    with pytest.raises(ValueError, match="missing"):
        combine("code_1_7b", {n: preds[n] for n in ("tia", "t", "0")}, 0.5)


# ----------------------------------------------------------------------------- on a tiny HuMo


def tiny(injection):
    """A tiny HuMo (2 blocks of 2 heads x 8, 3 x 3 x 8 x 8 latents) whose audio output
    projections are drawn at random, as after stage-2 training: every condition acts."""
    from diffusers import WanTransformer3DModel

    from repro.humo.model import HuMo

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=3,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    humo = HuMo(
        transformer,
        audio_window=5,
        audio_groups=2,
        audio_feature_dim=3,
        audio_hidden=8,
        audio_tokens=3,
        mask_blocks=2,
        injection=injection,
    ).eval()
    with torch.no_grad():
        for block in humo.transformer.blocks:
            block.audio_attn.to_out.weight.normal_(std=0.3)
            block.audio_attn.to_out.bias.normal_(std=0.1)
    return humo


def model_inputs():
    gen = torch.Generator().manual_seed(5)
    return {
        "x": torch.randn(2, 3, 3, 8, 8, generator=gen),
        "text": torch.randn(2, 5, 16, generator=gen),
        "negative": torch.randn(1, 5, 16, generator=gen),
        "ref": torch.randn(2, 3, 1, 8, 8, generator=gen),
        "audio": torch.randn(2, 3, 5, 2, 3, generator=gen),
    }


@pytest.mark.parametrize("injection", ["append", "overwrite_last"])
def test_predict_batched_equals_one_call_each(injection):
    humo, inp = tiny(injection), model_inputs()
    names = ("tia", "ti", "ta", "t", "i", "0")
    kwargs = dict(
        text=inp["text"], negative_text=inp["negative"], reference=inp["ref"], audio=inp["audio"]
    )
    with torch.no_grad():
        batched = predict(humo, names, inp["x"], 0.6, **kwargs)
        single = predict(humo, names, inp["x"], 0.6, batch=False, **kwargs)
        direct = humo.velocity(inp["x"], 0.6, inp["text"], inp["ref"], inp["audio"])
        negative = inp["negative"].expand(2, -1, -1)
        plain = humo.velocity(inp["x"], 0.6, negative)
    assert set(batched) == set(single) == set(names)
    for name in names:
        torch.testing.assert_close(batched[name], single[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single["tia"], direct)
    torch.testing.assert_close(single["0"], plain)
    # The conditions act: every prediction differs from every other one.
    for a in names:
        for b in names:
            if a < b:
                assert (single[a] - single[b]).abs().max() > 1e-4, (a, b)


def test_predict_refuses_a_missing_condition():
    humo, inp = tiny("append"), model_inputs()
    with pytest.raises(ValueError, match="reference"):
        predict(humo, ("ti",), inp["x"], 0.5, text=inp["text"], negative_text=inp["negative"])
    with pytest.raises(ValueError, match="audio"):
        predict(humo, ("ta",), inp["x"], 0.5, text=inp["text"], negative_text=inp["negative"])


@pytest.mark.parametrize("task", ["TIA", "TA", "TI"])
def test_guided_velocity_is_combine_of_direct_calls(task):
    humo, inp = tiny("append"), model_inputs()
    negative = inp["negative"].expand(2, -1, -1)
    fn = guided_velocity(
        humo,
        "paper",
        WEIGHTS["paper"],
        task,
        text=inp["text"],
        negative_text=inp["negative"],
        reference=inp["ref"],
        audio=inp["audio"],
    )
    for sigma in (EARLY, LATE):
        with torch.no_grad():
            got = fn(inp["x"], sigma)
            preds = {
                name: humo.velocity(
                    inp["x"],
                    sigma,
                    inp["text"] if "t" in name else negative,
                    reference=inp["ref"] if "i" in name else None,
                    audio=inp["audio"] if "a" in name else None,
                )
                for name in needed("paper", sigma, task, WEIGHTS["paper"])
            }
        expected = combine("paper", preds, sigma, WEIGHTS["paper"], task)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
