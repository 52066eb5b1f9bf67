"""HuMo's model (repro.humo.model) on a tiny WanTransformer3DModel: windows, audio attention,
injection, focus-by-predicting, trainable sets, save / load."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from repro.core.errors import ReproInputError
from repro.core.io import save_tensors, write_json
from repro.humo.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AudioProjector,
    FrameLocalAudioAttention,
    HuMo,
    HuMoWanBlock,
    MaskPredictor,
    audio_condition,
    audio_windows,
    inject_reference,
    install_audio,
    load_humo,
    mask_loss,
    save_humo,
    trainable_parameters,
    video_frames,
    window_indices,
)

torch.set_num_threads(1)

DIM = 16  # 2 heads x 8
FRAMES, SIZE = 3, 8  # [B, 3, 3, 8, 8]: 3 latent frames of 4 x 4 tokens
WINDOW, GROUPS, FEAT = 5, 2, 3


def tiny_wan(seed=0, layers=2):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=3,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return model.eval()


def tiny_humo(seed=0, trained_audio=False, **kwargs):
    """A HuMo on tiny_wan(seed); trained_audio: the zero-initialised audio output
    projections drawn at random, as after some stage-2 training (audio then matters)."""
    config = dict(
        audio_window=WINDOW,
        audio_groups=GROUPS,
        audio_feature_dim=FEAT,
        audio_hidden=8,
        audio_tokens=3,
        mask_blocks=2,
    )
    config.update(kwargs)
    humo = HuMo(tiny_wan(seed), **config).eval()
    if trained_audio:
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for block in humo.transformer.blocks:
                out = block.audio_attn.to_out
                out.weight.copy_(torch.randn(out.weight.shape, generator=gen) * 0.3)
                out.bias.copy_(torch.randn(out.bias.shape, generator=gen) * 0.1)
    return humo


def inputs(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 3, FRAMES, SIZE, SIZE, generator=gen),
        "text": torch.randn(batch, 5, 16, generator=gen),
        "ref": torch.randn(batch, 3, 1, SIZE, SIZE, generator=gen),
        "audio": torch.randn(batch, FRAMES, WINDOW, GROUPS, FEAT, generator=gen),
    }


# ----------------------------------------------------------------------------- audio windows


def test_window_indices_r1_by_hand():
    # r = 1, shift 2: every latent frame is one video frame, its window frames k-2 .. k+2.
    assert window_indices(4, 1, 2).tolist() == [
        [-2, -1, 0, 1, 2],
        [-1, 0, 1, 2, 3],
        [0, 1, 2, 3, 4],
        [1, 2, 3, 4, 5],
    ]


def test_window_indices_r4_by_hand():
    # r = 4 (Wan's VAE), 9 video frames -> 3 latent frames, windows of 4 + 2*2 = 8:
    # frame 0: 3 zero frames + audio frames -2..2; frame 1: video frames 1..4 +- 2;
    # frame 2: video frames 5..8 +- 2 (the official get_audio_emb_window).
    assert window_indices(9, 4, 2).tolist() == [
        [-1, -1, -1, -2, -1, 0, 1, 2],
        [-1, 0, 1, 2, 3, 4, 5, 6],
        [3, 4, 5, 6, 7, 8, 9, 10],
    ]


def test_window_indices_frame0_by_hand():
    assert window_indices(3, 1, 2, frame0=3).tolist() == [
        [1, 2, 3, 4, 5],
        [2, 3, 4, 5, 6],
        [3, 4, 5, 6, 7],
    ]
    assert window_indices(5, 4, 1, frame0=2).tolist() == [
        [-1, -1, -1, 1, 2, 3],
        [2, 3, 4, 5, 6, 7],
    ]


def numbered_features(length, groups=GROUPS, dim=FEAT):
    """features[t, g, d] = 100 (t + 1) + 10 g + d: every entry says where it came from."""
    t = torch.arange(length).view(-1, 1, 1)
    g = torch.arange(groups).view(1, -1, 1)
    d = torch.arange(dim).view(1, 1, -1)
    return (100 * (t + 1) + 10 * g + d).float()


def test_audio_windows_gather_and_zero_padding():
    feats = numbered_features(9)
    win = audio_windows(feats, 9, 4, 2)
    assert win.shape == (3, 8, GROUPS, FEAT)
    # Only the group-0 / dim-0 entry (100 (t + 1)) per frame, 0 where padded.
    assert win[:, :, 0, 0].tolist() == [
        [0, 0, 0, 0, 0, 100, 200, 300],
        [0, 100, 200, 300, 400, 500, 600, 700],
        [400, 500, 600, 700, 800, 900, 0, 0],
    ]
    assert win[1, 1, 1, 2] == 100 + 10 + 2
    # A padded frame is zero in every group and dim.
    assert torch.all(win[2, 6:] == 0) and torch.all(win[0, :5] == 0)


def test_audio_windows_frame0_reads_later_audio():
    feats = numbered_features(12)
    win = audio_windows(feats, 5, 1, 2, frame0=3)
    assert win[:, :, 0, 0].tolist() == [
        [200, 300, 400, 500, 600],
        [300, 400, 500, 600, 700],
        [400, 500, 600, 700, 800],
        [500, 600, 700, 800, 900],
        [600, 700, 800, 900, 1000],
    ]
    # Latent frame 0's leading zeros stay zeros even where audio exists (frame0 > 0).
    win4 = audio_windows(numbered_features(12), 5, 4, 1, frame0=2)
    assert win4[0, :, 0, 0].tolist() == [0, 0, 0, 200, 300, 400]


def test_audio_windows_batched_equals_per_clip():
    feats = torch.randn(3, 10, GROUPS, FEAT)
    batched = audio_windows(feats, 9, 4, 2)
    assert batched.shape == (3, 3, 8, GROUPS, FEAT)
    for i in range(3):
        assert torch.equal(batched[i], audio_windows(feats[i], 9, 4, 2))


def test_audio_shorter_than_the_clip():
    # The clip needs audio frames frame0 .. frame0 + num_frames - 1.
    audio_windows(torch.zeros(9, 1, 2), 9, 1)  # just long enough
    with pytest.raises(ReproInputError, match="audio shorter than the clip"):
        audio_windows(torch.zeros(8, 1, 2), 9, 1)
    audio_windows(torch.zeros(7, 1, 2), 5, 1, frame0=2)
    with pytest.raises(ReproInputError, match="audio shorter than the clip"):
        audio_windows(torch.zeros(6, 1, 2), 5, 1, frame0=2)
    with pytest.raises(ValueError):
        audio_windows(torch.zeros(9, 2), 9, 1)


# ----------------------------------------------------------------------------- projector, attention


def test_projector_matches_hand_computation():
    torch.manual_seed(0)
    proj = AudioProjector(WINDOW, GROUPS, FEAT, hidden=8, tokens=3, dim=DIM)
    with torch.no_grad():
        proj.norm.weight.normal_()
        proj.norm.bias.normal_()
    windows = torch.randn(2, 4, WINDOW, GROUPS, FEAT)
    out = proj(windows)
    assert out.shape == (2, 4, 3, DIM)
    flat = windows.reshape(2, 4, WINDOW * GROUPS * FEAT)
    h = torch.relu(flat @ proj.proj1.weight.T + proj.proj1.bias)
    h = torch.relu(h @ proj.proj2.weight.T + proj.proj2.bias)
    tokens = (h @ proj.proj3.weight.T + proj.proj3.bias).reshape(2, 4, 3, DIM)
    mean = tokens.mean(-1, keepdim=True)
    var = tokens.var(-1, unbiased=False, keepdim=True)
    expected = (tokens - mean) / torch.sqrt(var + 1e-5) * proj.norm.weight + proj.norm.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        proj(torch.randn(2, 4, WINDOW + 1, GROUPS, FEAT))


def random_attention(seed=0):
    torch.manual_seed(seed)
    attn = FrameLocalAudioAttention(DIM, 2)
    with torch.no_grad():
        attn.to_out.weight.normal_()
        attn.to_out.bias.normal_()
    return attn


def test_audio_attention_starts_at_exactly_zero():
    attn = FrameLocalAudioAttention(DIM, 2)
    out = attn(torch.randn(2, 3 * 4, DIM), torch.randn(2, 3, 5, DIM))
    assert torch.equal(out, torch.zeros_like(out))


def test_audio_attention_is_frame_local():
    attn = random_attention()
    hidden = torch.randn(2, 3 * 4, DIM)  # 3 frames of 4 tokens
    audio = torch.randn(2, 3, 5, DIM)
    base = attn(hidden, audio)
    for j in range(3):
        moved = audio.clone()
        moved[:, j] += torch.randn(2, 5, DIM)
        diff = (attn(hidden, moved) - base).abs().amax(dim=(0, 2)).view(3, 4)
        for f in range(3):
            if f == j:
                assert diff[f].min() > 1e-4, f"frame {j}'s own tokens did not change"
            else:
                assert diff[f].max() == 0, f"frame {f} changed with frame {j}'s audio"


def test_audio_attention_equals_masked_full_attention():
    """Independent reference: ordinary attention over ALL audio tokens with a mask that
    lets frame f's queries see frame f's audio tokens only."""
    attn = random_attention(1)
    hidden, audio = torch.randn(2, 3 * 4, DIM), torch.randn(2, 3, 5, DIM)
    x = F.layer_norm(hidden, (DIM,), attn.norm.weight, attn.norm.bias, eps=1e-6)
    q = attn.norm_q(attn.to_q(x)).view(2, 12, 2, 8).transpose(1, 2)
    keys = audio.reshape(2, 15, DIM)
    k = attn.norm_k(attn.to_k(keys)).view(2, 15, 2, 8).transpose(1, 2)
    v = attn.to_v(keys).view(2, 15, 2, 8).transpose(1, 2)
    frame_of_query = torch.arange(12) // 4
    frame_of_key = torch.arange(15) // 5
    allowed = frame_of_query[:, None] == frame_of_key[None, :]
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 12, DIM))
    torch.testing.assert_close(attn(hidden, audio), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- installation


def test_install_keeps_stock_weights_and_outputs():
    stock = tiny_wan()
    patched = install_audio(copy.deepcopy(stock))
    assert all(type(b) is HuMoWanBlock for b in patched.blocks)
    assert all(isinstance(b, WanTransformerBlock) for b in patched.blocks)
    stock_state, state = stock.state_dict(), patched.state_dict()
    assert set(stock_state) <= set(state)
    assert all(".audio_attn." in key for key in set(state) - set(stock_state))
    assert all(torch.equal(stock_state[k], state[k]) for k in stock_state)

    inp = inputs()
    timestep = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        expected = stock(inp["x"], timestep, inp["text"]).sample
        assert torch.equal(patched(inp["x"], timestep, inp["text"]).sample, expected)
        with audio_condition(patched, None):
            assert torch.equal(patched(inp["x"], timestep, inp["text"]).sample, expected)
    install_audio(patched)  # a second install leaves the blocks as they are
    assert set(patched.state_dict()) == set(state)


def test_audio_none_is_the_stock_model_even_after_audio_training():
    stock = tiny_wan()
    humo = tiny_humo(trained_audio=True)
    inp = inputs()
    with torch.no_grad():
        expected = stock(inp["x"], torch.tensor([400.0, 400.0]), inp["text"]).sample
        got = humo.velocity(inp["x"], 0.4, inp["text"])
        with_audio = humo.velocity(inp["x"], 0.4, inp["text"], audio=inp["audio"])
    assert torch.equal(got, expected)
    assert (with_audio - expected).abs().max() > 1e-3  # the trained audio attention acts


def test_zero_init_stage2_starts_from_the_stage1_model():
    humo = tiny_humo()  # fresh audio modules: stage 2's starting point
    inp = inputs()
    with torch.no_grad():
        for ref in (None, inp["ref"]):
            before = humo.velocity(inp["x"], 0.7, inp["text"], reference=ref)
            after = humo.velocity(inp["x"], 0.7, inp["text"], reference=ref, audio=inp["audio"])
            assert torch.equal(before, after)


def test_audio_on_switches_rows_off_exactly():
    humo = tiny_humo(trained_audio=True)
    inp = inputs()
    with torch.no_grad():
        both = humo.velocity(inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"])
        none = humo.velocity(inp["x"], 0.5, inp["text"], inp["ref"])
        mixed = humo.velocity(
            inp["x"],
            0.5,
            inp["text"],
            inp["ref"],
            inp["audio"],
            audio_on=torch.tensor([True, False]),
        )
    torch.testing.assert_close(mixed[0], both[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], none[1], rtol=0, atol=1e-6)
    assert (both[1] - none[1]).abs().max() > 1e-3


def test_audio_condition_records_and_restores():
    humo = tiny_humo(trained_audio=True)
    blocks = list(humo.transformer.blocks)
    inp = inputs()
    tokens = torch.randn(2, FRAMES, 3, DIM)
    timestep = torch.tensor([500.0, 500.0])
    with torch.no_grad(), audio_condition(humo.transformer, tokens, record_last=1) as recorded:
        humo.transformer(inp["x"], timestep, inp["text"])
    assert len(recorded) == 1 and recorded[0].shape == (2, FRAMES * 16, DIM)
    assert all(getattr(b, "_humo_audio", None) is None for b in blocks)
    with pytest.raises(RuntimeError), audio_condition(humo.transformer, tokens):
        raise RuntimeError("inside")
    assert all(getattr(b, "_humo_audio", None) is None for b in blocks)
    with pytest.raises(ValueError, match="install_audio"), audio_condition(tiny_wan(), tokens):
        pass


def test_reference_frame_hears_zero_tokens():
    humo = tiny_humo(trained_audio=True)
    inp = inputs()
    seen = []
    hook = humo.transformer.blocks[0].audio_attn.register_forward_hook(
        lambda module, args, out: seen.append(args[1])
    )
    with torch.no_grad():
        humo.velocity(inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"])
    hook.remove()
    tokens = seen[0]
    assert tokens.shape == (2, FRAMES + 1, 3, DIM)
    assert torch.equal(tokens[:, -1], torch.zeros(2, 3, DIM))
    torch.testing.assert_close(tokens[:, :FRAMES], humo.audio_projector(inp["audio"]))


def test_gradient_checkpointing_gives_the_same_gradients():
    inp = inputs()
    mask = (torch.rand(2, FRAMES, SIZE, SIZE) > 0.5).float()

    def grads(checkpointing):
        humo = tiny_humo(trained_audio=True).train()
        if checkpointing:
            humo.transformer.enable_gradient_checkpointing()
        v, logits = humo.forward_train(inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"])
        (v.square().mean() + mask_loss(logits, mask)).backward()
        return {n: p.grad.clone() for n, p in humo.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed)
    assert any(".audio_attn.to_q." in n for n in plain)  # the audio path got gradients
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- focus-by-predicting


def test_mask_predictor_unpatchifies_by_hand():
    pred = MaskPredictor(4, (1, 2, 2))
    with torch.no_grad():
        pred.proj.weight.copy_(torch.eye(4))
        pred.proj.bias.zero_()
    # grid: 2 frames of 2 x 3 tokens; token (f, i, j) carries [a, b, c, d] = its 2x2 patch.
    tokens = torch.arange(2 * 6 * 4, dtype=torch.float32).view(1, 12, 4)
    half = [tokens * 0.5, tokens * 1.5]  # the mean of the recorded outputs is `tokens`
    logits = pred(half, (2, 2, 3))
    assert logits.shape == (1, 2, 4, 6)
    for f in range(2):
        for i in range(2):
            for j in range(3):
                token = tokens[0, f * 6 + i * 3 + j]
                for a in range(2):
                    for b in range(2):
                        assert logits[0, f, 2 * i + a, 2 * j + b] == token[2 * a + b]


def test_mask_loss_by_hand():
    # One clip, 2 frames of 1 x 2 pixels. Frame 0: mask [1, 0]; frame 1: no face (clamp).
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])
    sp = torch.nn.functional.softplus
    # BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l).
    frame0 = (sp(torch.tensor(-2.0)) + sp(torch.tensor(-1.0))) / 1.0  # h*w/sum = 2/1
    frame1 = (sp(torch.tensor(0.5)) + sp(torch.tensor(0.0))) / 1.0  # sum 0 -> clamped to 1
    expected = (frame0 + frame1) / 2
    torch.testing.assert_close(mask_loss(logits, mask), expected)
    # The size-aware weight: a face of 2 pixels out of 4 weighs the frame's mean BCE by 4/2.
    logits2, mask2 = torch.randn(1, 1, 2, 2), torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    bce = F.binary_cross_entropy_with_logits(logits2, mask2)
    torch.testing.assert_close(mask_loss(logits2, mask2), bce * 4 / 2)


def test_mask_loss_refuses_mismatched_shapes():
    with pytest.raises(ReproInputError, match="mask"):
        mask_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ReproInputError, match="mask"):
        mask_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8))


def test_forward_train_mask_logits_on_the_latent_grid():
    humo = tiny_humo(trained_audio=True)
    inp = inputs()
    v, logits = humo.forward_train(inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"])
    assert v.shape == inp["x"].shape and logits.shape == (2, FRAMES, SIZE, SIZE)
    _, none = humo.forward_train(inp["x"], 0.5, inp["text"], inp["ref"])
    assert none is None


# ----------------------------------------------------------------------------- injection


def test_inject_reference_modes():
    latents = torch.randn(2, 3, 4, 8, 8)
    ref = torch.randn(2, 3, 1, 8, 8)
    appended = inject_reference(latents, ref, "append")
    assert appended.shape == (2, 3, 5, 8, 8)
    assert torch.equal(appended[:, :, :4], latents) and torch.equal(appended[:, :, 4:], ref)
    written = inject_reference(latents, ref, "overwrite_last")
    assert written.shape == latents.shape
    assert torch.equal(written[:, :, :3], latents[:, :, :3])
    assert torch.equal(written[:, :, 3:], ref)
    assert torch.equal(video_frames(appended, 4, "append"), latents)
    assert torch.equal(video_frames(written, 3, "overwrite_last"), latents[:, :, :3])
    with pytest.raises(ReproInputError, match="humo.injection"):
        inject_reference(latents, ref, "prepend")
    with pytest.raises(ReproInputError, match="humo.injection"):
        video_frames(latents, 3, "prepend")
    with pytest.raises(ReproInputError, match="humo.injection"):
        tiny_humo(injection="prepend")
    with pytest.raises(ValueError):
        inject_reference(latents, torch.randn(2, 3, 1, 4, 4), "append")


def test_velocity_modes():
    humo = tiny_humo(trained_audio=True)
    inp = inputs()
    with torch.no_grad():
        append_ref = humo.velocity(inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"])
        over_ref = humo.velocity(
            inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"], mode="overwrite_last"
        )
        append_none = humo.velocity(inp["x"], 0.5, inp["text"])
        over_none = humo.velocity(inp["x"], 0.5, inp["text"], mode="overwrite_last")
        over_zero = humo.velocity(
            inp["x"], 0.5, inp["text"], torch.zeros_like(inp["ref"]), mode="overwrite_last"
        )
        append_ref_no_audio = humo.velocity(inp["x"], 0.5, inp["text"], inp["ref"])
    assert append_ref.shape == over_ref.shape == inp["x"].shape
    # The 1.7B slot holds the reference: the model sees what "append" shows it.
    assert torch.equal(append_ref, over_ref)
    # Without a reference: the 1.7B code's zero slot; "append" adds no frame.
    assert torch.equal(over_none, over_zero)
    assert (over_none - append_none).abs().max() > 1e-4
    assert (append_ref_no_audio - append_none).abs().max() > 1e-4  # the image acts


def test_velocity_sigma_per_row_and_shape_checks():
    humo = tiny_humo(trained_audio=True)
    inp = inputs()
    with torch.no_grad():
        rows = humo.velocity(inp["x"], torch.tensor([0.2, 0.9]), inp["text"], audio=inp["audio"])
        first = humo.velocity(inp["x"][:1], 0.2, inp["text"][:1], audio=inp["audio"][:1])
        second = humo.velocity(inp["x"][1:], 0.9, inp["text"][1:], audio=inp["audio"][1:])
    torch.testing.assert_close(rows, torch.cat([first, second]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="audio windows"):
        humo.velocity(inp["x"], 0.5, inp["text"], audio=inp["audio"][:, :2])
    with pytest.raises(ValueError, match="sigma"):
        humo.velocity(inp["x"], torch.tensor([0.1, 0.2, 0.3]), inp["text"])


def test_latent_shape():
    class Pixels:  # the tiny foundation: no VAE
        spatial_ratio = 1

        @staticmethod
        def latent_frames(frames):
            return frames

    class Latents:  # Wan's VAE: 4x in time, 8x in space
        spatial_ratio = 8

        @staticmethod
        def latent_frames(frames):
            return 1 + (frames - 1) // 4

    humo = tiny_humo()
    assert humo.latent_shape(Pixels, 9, (16, 16)) == (3, 9, 16, 16)
    assert humo.latent_shape(Latents, 81, torch.Size([480, 832])) == (3, 21, 60, 104)
    with pytest.raises(ReproInputError, match="size"):
        humo.latent_shape(Latents, 81, (484, 832))


def test_mask_blocks_must_fit_the_transformer():
    tiny_humo(mask_blocks=2)
    with pytest.raises(ReproInputError, match="humo.model.mask_blocks"):
        tiny_humo(mask_blocks=3)
    with pytest.raises(ReproInputError, match="humo.model.mask_blocks"):
        tiny_humo(mask_blocks=0)


# ----------------------------------------------------------------------------- trainable sets


def names_of(humo, params):
    ids = {id(p) for p in params}
    return {n for n, p in humo.named_parameters() if id(p) in ids}


def test_trainable_sets():
    humo = tiny_humo()
    every = {n for n, _ in humo.named_parameters()}
    attn1 = {n for n in every if n.startswith("transformer.blocks.") and ".attn1." in n}
    audio = {n for n in every if ".audio_attn." in n or not n.startswith("transformer.")}
    assert attn1 and audio and len(attn1) == 2 * 10  # q, k, v, out (w, b) and norm_q / norm_k
    assert names_of(humo, trainable_parameters(humo, "1", "minimal")) == attn1
    assert names_of(humo, trainable_parameters(humo, 1, "full_finetune")) == every - audio
    assert names_of(humo, trainable_parameters(humo, "2", "minimal")) == attn1 | audio
    assert names_of(humo, trainable_parameters(humo, "2", "full_finetune")) == every
    assert any(n.startswith("mask_predictor.") for n in audio)
    assert any(n.startswith("audio_projector.") for n in audio)
    with pytest.raises(ReproInputError, match="humo stage"):
        trainable_parameters(humo, "3", "minimal")
    with pytest.raises(ReproInputError, match="humo.variants"):
        trainable_parameters(humo, "1", "lora")


def one_step(humo, stage, variant, audio):
    inp = inputs()
    params = trainable_parameters(humo, stage, variant)
    before = {n: p.detach().clone() for n, p in humo.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    humo.train()
    v, logits = humo.forward_train(
        inp["x"], 0.6, inp["text"], inp["ref"], inp["audio"] if audio else None
    )
    loss = (v - inp["x"]).square().mean()
    if logits is not None:
        loss = loss + mask_loss(logits, (torch.rand(logits.shape) > 0.5).float())
    loss.backward()
    opt.step()
    changed = {n for n, p in humo.named_parameters() if not torch.equal(p, before[n])}
    return changed, names_of(humo, params)


def test_stage1_step_changes_self_attention_only():
    humo = tiny_humo()
    changed, trainable = one_step(humo, "1", "minimal", audio=False)
    assert changed and changed <= trainable
    assert all(".attn1." in n for n in changed)
    assert any(".attn1.to_q." in n for n in changed) and any(".attn1.to_out." in n for n in changed)


def test_stage2_step_trains_audio_not_the_rest():
    humo = tiny_humo()
    changed, trainable = one_step(humo, "2", "minimal", audio=True)
    assert changed <= trainable
    assert any(".audio_attn.to_out." in n for n in changed)  # zero-init: its grad is not zero
    assert any(n.startswith("mask_predictor.") for n in changed)
    assert not any(".ffn." in n or ".attn2." in n for n in changed)


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    humo = tiny_humo(seed=3, trained_audio=True, injection="overwrite_last")
    inp = inputs()
    with torch.no_grad():
        expected = humo.forward_train(inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"])
    save_humo(humo, tmp_path / "m", {"variant": "full", "stage": "2"})
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file() and (tmp_path / "m" / CONFIG_FILE).is_file()
    loaded = load_humo(
        tmp_path / "m", tiny_wan(seed=7)
    ).eval()  # other init: weights come from the file
    assert loaded.injection == "overwrite_last" and loaded.config == humo.config
    assert loaded.saved_config == {"variant": "full", "stage": "2"}
    with torch.no_grad():
        got = loaded.forward_train(inp["x"], 0.5, inp["text"], inp["ref"], inp["audio"])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ReproInputError, match=CONFIG_FILE):
        load_humo(tmp_path / "nothing", tiny_wan())
    humo = tiny_humo()
    save_humo(humo, tmp_path / "m", {})
    with pytest.raises(ReproInputError, match=WEIGHTS_FILE):
        load_humo(tmp_path / "m", tiny_wan(layers=3))  # another foundation transformer
    (tmp_path / "m" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ReproInputError, match=WEIGHTS_FILE):
        load_humo(tmp_path / "m", tiny_wan())
    save_tensors(tmp_path / "m" / WEIGHTS_FILE, {"x": torch.zeros(1)}, kind="talking_faces")
    with pytest.raises(ReproInputError, match=WEIGHTS_FILE):
        load_humo(tmp_path / "m", tiny_wan())
    write_json(tmp_path / "m" / CONFIG_FILE, {"config": {}})
    with pytest.raises(ReproInputError, match=CONFIG_FILE):
        load_humo(tmp_path / "m", tiny_wan())
    write_json(tmp_path / "m" / CONFIG_FILE, {"model": {"audio_windows": 5}})
    with pytest.raises(ReproInputError, match=CONFIG_FILE):
        load_humo(tmp_path / "m", tiny_wan())
