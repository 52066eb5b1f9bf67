"""Attention FLOPs: hand-counted masks, dense equality, the paper's kernel-benchmark shape."""

import pytest
import torch

from repro.kernels.attention_flops import (
    AttentionFlops,
    AttentionFlopsCounter,
    counting_attention_flops,
    dense_attention_flops,
    full_attention_flops,
    record_attention_flops,
    sla_attention_flops,
)
from repro.kernels.sla_reference import classify_blocks

C, M, N = 1, 0, -1  # critical, marginal, negligible

# One (batch, head): 40 queries in blocks of 16 (16, 16, 8), 24 keys in blocks of 16 (16, 8).
HAND = torch.tensor([[[[C, M], [M, C], [N, C]]]], dtype=torch.int8)
HAND_ARGS = {"block_q": 16, "block_kv": 16, "len_q": 40, "len_k": 24, "head_dim": 16}


def test_dense_flops_is_4_b_h_lq_lk_d():
    assert dense_attention_flops(2, 3, 5, 7, 16) == 4 * 2 * 3 * 5 * 7 * 16
    with pytest.raises(ValueError, match="head_dim"):
        dense_attention_flops(1, 1, 4, 4, 0)


def test_hand_counted_mask_marginal():
    flops = sla_attention_flops(HAND, **HAND_ARGS, linear="marginal")
    d = 16
    # Critical token pairs: row 0 x col 0 = 16*16, row 1 x col 1 = 16*8, row 2 x col 1 = 8*8.
    assert flops.sparse == 4 * d * (16 * 16 + 16 * 8 + 8 * 8) == 28672
    assert flops.dense == 4 * 40 * 24 * d == 61440
    key_states = 24 * (2 * d * d + d)  # h_j and z_j for every key token
    pre_aggregation = 2 * (d * d + d) + 4 * (d * d + d)  # totals + 4 non-marginal blocks
    per_query = 40 * (2 * d * d + 3 * d)
    assert flops.linear == key_states + pre_aggregation + per_query == 36704
    assert flops.total == 28672 + 36704
    assert flops.block_sparsity == pytest.approx(0.5)  # 3 of 6 blocks critical
    assert flops.sparsity == pytest.approx(1 - (28672 + 36704) / 61440)


def test_hand_counted_mask_other_linear_modes():
    d = 16
    all_keys = sla_attention_flops(HAND, **HAND_ARGS, linear="all")
    assert all_keys.sparse == 28672
    assert all_keys.linear == 24 * (2 * d * d + d) + 2 * (d * d + d) + 40 * (2 * d * d + 3 * d)
    none = sla_attention_flops(HAND, **HAND_ARGS, linear="none")
    assert none.linear == 0 and none.total == 28672


def test_dense_equality_at_k_h_one():
    q, k = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 70, 16)  # partial last blocks
    mask = classify_blocks(q, k, block_q=16, block_kv=32, k_h=1.0, k_l=0.0)
    flops = sla_attention_flops(
        mask.classes, block_q=16, block_kv=32, len_q=50, len_k=70, head_dim=16, linear="none"
    )
    assert flops.sparse == flops.dense == dense_attention_flops(2, 3, 50, 70, 16)
    assert flops.sparsity == 0.0 and flops.block_sparsity == 0.0
    assert full_attention_flops(2, 3, 50, 70, 16) == AttentionFlops(
        dense=flops.dense, sparse=flops.dense
    )


def test_paper_benchmark_shape_is_about_95_percent_sparse():
    """B 2, H 16, L 32760, D 128, blocks of 64, k_h = 5 %: ceil(0.05 * 512) = 26 critical."""
    batch, heads, length, d, n = 2, 16, 32760, 128, 512
    rows = torch.arange(n)[:, None]
    critical = (rows * 7 + torch.arange(26)[None, :] * 19) % n  # 26 distinct blocks per row
    classes = torch.zeros(batch, heads, n, n, dtype=torch.int8)
    classes[..., rows, critical] = C
    flops = sla_attention_flops(
        classes, block_q=64, block_kv=64, len_q=length, len_k=length, head_dim=d, linear="none"
    )
    assert flops.block_sparsity == pytest.approx(1 - 26 / 512)
    assert 0.945 < flops.sparsity < 0.955
    with_linear = sla_attention_flops(
        classes, block_q=64, block_kv=64, len_q=length, len_k=length, head_dim=d
    )
    # The linear branch is O(L d^2): below 1 % of dense attention at this length.
    assert 0 < with_linear.linear / with_linear.dense < 0.01


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="classes"):
        sla_attention_flops(HAND[0], **HAND_ARGS)
    with pytest.raises(ValueError, match="len_q"):
        sla_attention_flops(HAND, **{**HAND_ARGS, "len_q": 100})
    with pytest.raises(ValueError, match="linear"):
        sla_attention_flops(HAND, **HAND_ARGS, linear="some")


def test_counter_sums_calls_while_active_and_nests():
    one = sla_attention_flops(HAND, **HAND_ARGS)
    record_attention_flops(one)  # no counter: nothing happens
    assert not counting_attention_flops()
    with AttentionFlopsCounter() as outer:
        assert counting_attention_flops()
        record_attention_flops(one)
        with AttentionFlopsCounter() as inner:
            record_attention_flops(one)
        record_attention_flops(one)
    assert not counting_attention_flops()
    assert outer.calls == 3 and inner.calls == 1
    assert outer.flops.total == 3 * one.total
    assert outer.flops.dense == 3 * one.dense
    assert outer.flops.block_sparsity == pytest.approx(one.block_sparsity)
    assert outer.flops.as_dict()["attention_flops"] == 3 * one.total
