"""The refiner bypass: what it hands the decoder, that it changes generations, and that it restores."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ovis_u1.ablation import RefinerBypass, refiner_bypassed
from ovis_u1.refiner import TokenRefiner


def test_bypass_outputs(tiny_model):
    refiner = tiny_model.refiner
    x = torch.randn(2, 5, tiny_model.config.refiner.in_dim)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        ref = refiner(x, mask)
        kept = RefinerBypass(refiner)(x, mask)
        raw = RefinerBypass(refiner, cls="raw")(x, mask)
        embedded = refiner.input_embedder(x)
    assert torch.equal(kept.tokens, embedded) and torch.equal(raw.tokens, embedded)
    assert torch.equal(kept.cls, ref.cls)
    assert torch.equal(raw.cls, refiner.cls_token[:, 0].expand(2, -1))
    assert not torch.allclose(ref.tokens, embedded)  # the perturbed refiner does move the tokens
    with pytest.raises(ValueError, match="cls must be one of"):
        RefinerBypass(refiner, cls="zero")
    with pytest.raises(ValueError, match="no blocks"):  # depth 0 has nothing to bypass
        RefinerBypass(TokenRefiner(dataclasses.replace(tiny_model.config.refiner, depth=0)))


def test_bypass_changes_generation_and_restores(tiny_model):
    refiner = tiny_model.refiner
    kwargs = dict(num_inference_steps=2, seed=0, progress=False, output_type="latent")
    normal = tiny_model.text_to_image("a red circle", **kwargs)
    with refiner_bypassed(tiny_model) as m:
        assert isinstance(m.refiner, RefinerBypass)
        with pytest.raises(ValueError, match="already bypassed"), refiner_bypassed(m):
            pass
        bypassed = m.text_to_image("a red circle", **kwargs)
    assert tiny_model.refiner is refiner
    assert not torch.allclose(normal, bypassed)
    with pytest.raises(RuntimeError), refiner_bypassed(tiny_model):
        raise RuntimeError("restored even when the block fails")
    assert tiny_model.refiner is refiner
    assert torch.equal(tiny_model.text_to_image("a red circle", **kwargs), normal)
