"""The bidirectional token refiner (ovis_u1/refiner.py) on the tiny preset: shapes, gradients, padding,
adaLN-Zero at init, no timestep input, and no blocks at all (depth 0)."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import missing_grads, perturb

from ovis_u1.config import RefinerConfig, get_preset
from ovis_u1.refiner import TokenRefiner


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny").refiner


@pytest.fixture
def refiner(cfg):
    # The zero-initialised gates make the blocks identities; perturbed, every path is live.
    torch.manual_seed(0)
    return perturb(TokenRefiner(cfg)).eval()


def test_refiner_forward_backward(cfg, refiner):
    x = torch.randn(2, 7, cfg.in_dim)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = refiner.train()(x, mask, return_attention=True)
    assert out.tokens.shape == (2, 7, cfg.hidden_size)
    assert out.cls.shape == (2, cfg.hidden_size)
    assert len(out.attention) == len(out.gates) == cfg.depth
    assert out.attention[0].shape == (2, cfg.num_heads, 8, 8)
    torch.testing.assert_close(out.attention[0].sum(-1), torch.ones(2, cfg.num_heads, 8))
    assert out.attention[0][1, :, :, 5:].abs().max() == 0  # padded keys get no weight
    assert out.gates[0][0].shape == (2, cfg.hidden_size)
    (out.tokens[mask].square().mean() + out.cls.square().mean()).backward()
    assert missing_grads(refiner) == []


def test_refiner_zero_gates_at_init(cfg):
    # adaLN-Zero: an untrained refiner is input_embedder on the tokens and the raw CLS.
    ref = TokenRefiner(cfg)
    x = torch.randn(1, 3, cfg.in_dim)
    out = ref(x)
    torch.testing.assert_close(out.tokens, ref.input_embedder(x))
    torch.testing.assert_close(out.cls, ref.cls_token[:, 0])


def test_refiner_padding_parity(cfg, refiner):
    a, b = torch.randn(1, 6, cfg.in_dim), torch.randn(1, 3, cfg.in_dim)
    padded = torch.cat([a, torch.cat([b, torch.randn(1, 3, cfg.in_dim)], dim=1)])
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        both = refiner(padded, mask)
        alone_a, alone_b = refiner(a), refiner(b)
    torch.testing.assert_close(both.tokens[0], alone_a.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.tokens[1, :3], alone_b.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.cls[0], alone_a.cls[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.cls[1], alone_b.cls[0], atol=1e-5, rtol=0)


def test_refiner_has_no_timestep(cfg, refiner):
    params = inspect.signature(TokenRefiner.forward).parameters
    assert not any("time" in name or name == "t" for name in params)
    assert not any("time" in name for name, _ in refiner.named_parameters())
    x = torch.randn(1, 4, cfg.in_dim)
    with torch.no_grad():
        torch.testing.assert_close(refiner(x).tokens, refiner(x).tokens, atol=0, rtol=0)


def test_refiner_without_blocks_hands_over_the_projection_and_its_mean():
    """depth 0, the ablation studies' arm: the input projection, and its masked mean for the pooled vector."""
    torch.manual_seed(0)
    refiner = TokenRefiner(RefinerConfig(in_dim=16, hidden_size=8, num_heads=2, depth=0))
    names = {n for n, _ in refiner.named_parameters()}
    assert names == {"input_embedder.weight", "input_embedder.bias"}  # no gates, no CLS left untrained
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = refiner(x, mask, return_attention=True)
    h = refiner.input_embedder(x)
    assert torch.equal(out.tokens, h)
    torch.testing.assert_close(out.cls, torch.stack([h[0].mean(0), h[1, :3].mean(0)]))
    assert out.gates == [] and out.attention == []
    # Padding does not move the pooled vector; without a mask every token counts.
    x2 = x.clone()
    x2[1, 3:] = 100.0
    torch.testing.assert_close(refiner(x2, mask).cls, out.cls)
    torch.testing.assert_close(refiner(x).cls, h.mean(1))
    with pytest.raises(ValueError, match="depth must be a whole number >= 0"):
        TokenRefiner(RefinerConfig(in_dim=16, hidden_size=8, num_heads=2, depth=-1))
