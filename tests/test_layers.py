"""The shared attention layers (ovis_u1/layers.py): rotary embedding, attention weights, the bf16 CPU path."""

from __future__ import annotations

import torch

from ovis_u1.layers import EmbedND, apply_rope, attention, attention_weights, sdpa


def test_rope_matches_complex_rotation():
    # Independent reference: channel pairs (2p, 2p+1) as complex numbers times exp(i * pos * freq_p),
    # each axis owning its own consecutive slice of pairs.
    axes, theta = (4, 6, 6), 10000.0
    ids = torch.randint(0, 20, (2, 7, 3)).float()
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    rq, rk = apply_rope(q, k, EmbedND(16, theta, axes)(ids))
    angles = torch.cat([ids[..., a, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)
                        for a, d in enumerate(axes)], dim=-1)  # [B, L, D/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]  # [B, 1, L, D/2]
    for x, rx in ((q, rq), (k, rk)):
        ref = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 3, 7, 8, 2)) * rot)
        torch.testing.assert_close(rx, ref.reshape(2, 3, 7, 16).float(), atol=1e-5, rtol=1e-5)


def test_attention_weights_match_sdpa():
    q, k, v = torch.randn(3, 2, 2, 6, 8).unbind(0)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    w = attention_weights(q, k, mask=mask)
    expected = torch.einsum("bhqk,bhkd->bqhd", w, v).reshape(2, 6, 16)
    torch.testing.assert_close(attention(q, k, v, mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_bf16_cpu_attention_path_matches_float32():
    """Under bf16 autocast on CPU, sdpa takes explicit matmuls; values and gradients track float32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 32, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 30:] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(sdpa(q, k, v, attn_mask=mask), ref)  # float32: the fused kernel itself
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    low = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    out = sdpa(*low, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for got, want in zip(torch.autograd.grad(out.float().square().sum(), low), ref_grads):
        assert (got.float() - want).norm() / want.norm() < 0.02
