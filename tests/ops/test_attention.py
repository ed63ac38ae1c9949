import pytest
import torch

from prumerge.ops import cls_attention


def _loop_multihead(q, k, num_heads, num_prefix):
    batch, length, width = q.shape
    head_dim = width // num_heads
    out = torch.zeros(batch, length - num_prefix)
    for b in range(batch):
        for h in range(num_heads):
            sl = slice(h * head_dim, (h + 1) * head_dim)
            logits = torch.stack([q[b, 0, sl] @ k[b, t, sl] for t in range(length)]) / head_dim**0.5
            out[b] += logits.softmax(0)[num_prefix:] / num_heads
    return out


@pytest.mark.parametrize("num_prefix", [1, 5])
def test_multihead_matches_per_head_loop(num_prefix):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 17 + num_prefix, 24).unbind(0)
    got = cls_attention(q, k, num_heads=4, num_prefix_tokens=num_prefix)
    torch.testing.assert_close(got, _loop_multihead(q, k, 4, num_prefix), rtol=1e-5, atol=1e-6)


def test_multihead_matches_torch_attention_weights():
    # The encoder's own attention (nn.MultiheadAttention, averaged heads) is what we reproduce.
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, bias=False)
    x = torch.randn(2, 10, 32)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=True)
    wq, wk, _ = mha.in_proj_weight.chunk(3)
    got = cls_attention(x @ wq.T, x @ wk.T, num_heads=4)
    torch.testing.assert_close(got, weights[:, 0, 1:], rtol=1e-5, atol=1e-6)


def test_reference_mode_is_single_head_full_width():
    torch.manual_seed(2)
    q, k = torch.randn(2, 1, 9, 16).unbind(0)
    expected = ((q[:, :1] @ k.transpose(1, 2)) / 16**0.5).softmax(-1)[:, 0, 1:]
    torch.testing.assert_close(cls_attention(q, k, num_heads=4, mode="reference"), expected)
    # ...and differs from the real multi-head attention.
    assert not torch.allclose(cls_attention(q, k, num_heads=4), expected)


def test_bad_inputs_raise_value_error():
    q = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="NaN"):
        cls_attention(q.clone().index_fill_(1, torch.tensor([2]), float("nan")), q, num_heads=2)
    with pytest.raises(ValueError, match="divisible"):
        cls_attention(q, q, num_heads=3)
    with pytest.raises(ValueError, match="must both be"):
        cls_attention(q, q[:, :4], num_heads=2)
    with pytest.raises(ValueError, match="mode"):
        cls_attention(q, q, num_heads=2, mode="single")  # type: ignore[arg-type]


def test_mean_attention_matches_torch_attention_weights():
    # The mean over heads and queries of the encoder's own attention map.
    from prumerge.ops import mean_attention

    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, bias=False)
    x = torch.randn(2, 10, 32)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=True)  # (B, T, T)
    wq, wk, _ = mha.in_proj_weight.chunk(3)
    got = mean_attention(x @ wq.T, x @ wk.T, num_heads=4)
    torch.testing.assert_close(got, weights.mean(dim=1), rtol=1e-5, atol=1e-6)
    # With a [CLS] prefix, its column is dropped (the softmax still includes it).
    prefixed = mean_attention(x @ wq.T, x @ wk.T, num_heads=4, num_prefix_tokens=1)
    torch.testing.assert_close(prefixed, weights.mean(dim=1)[:, 1:], rtol=1e-5, atol=1e-6)


def test_mean_attention_of_a_padded_row_equals_the_row_alone():
    from prumerge.ops import mean_attention

    torch.manual_seed(4)
    q, k = torch.randn(2, 2, 9, 16).unbind(0)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False  # row 1 holds 6 real tokens, then padding
    got = mean_attention(q, k, num_heads=2, valid=valid)
    alone = mean_attention(q[1:, :6], k[1:, :6], num_heads=2)
    torch.testing.assert_close(got[1, :6], alone[0])
    assert (got[1, 6:] == 0).all()
    torch.testing.assert_close(got[0], mean_attention(q[:1], k[:1], num_heads=2)[0])
    # Every real query's attention sums to one, so the means sum to one per row.
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2))
