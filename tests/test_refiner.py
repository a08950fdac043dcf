"""The bidirectional token refiner (ovis_u1/refiner.py) on the tiny preset: shapes, gradients, padding,
adaLN-Zero at init, no timestep input."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import missing_grads, perturb

from ovis_u1.config import get_preset
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
