"""The vision encoder and its adapter (ovis_u1/vision.py) as the model calls them: shapes, gradients,
probabilities, native-resolution packing, the batched path and window attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import missing_grads, patches_of, random_image

from ovis_u1.vision import VisualTokenizer


def two_images():
    # Non-square, different sizes and orientations: grids (1, 4, 8) and (1, 8, 4) in tiny.
    return random_image(40, 72, seed=1), random_image(56, 40, seed=2)


def test_encoder_and_adapter_forward_backward(make_tiny):
    model = make_tiny()
    patches, grids = patches_of(model, *two_images())
    assert grids == [(1, 4, 8), (1, 8, 4)]
    feats = model.visual_tokenizer.backbone(torch.cat(patches), grids)
    assert feats.shape == (64, model.config.vision.hidden_size)
    probs = model.visual_tokens(patches, grids)
    v, n_ind = model.config.adapter.vocab_size, model.config.adapter.num_indicators
    assert probs.shape == (64 // 4, v)  # one token per 2x2 merge group
    torch.testing.assert_close(probs.sum(-1), torch.ones(16), rtol=0, atol=1e-5)
    assert (probs >= 0).all()
    assert torch.equal(probs[:, -n_ind:], torch.zeros(16, n_ind))
    assert (probs[:, :-n_ind] > 0).all()
    (probs[:, :-n_ind] * torch.randn(16, v - n_ind)).sum().backward()
    assert missing_grads(model.visual_tokenizer.head) == []
    # The feature is taken before post_trunk_norm (facts sheet), so that norm gets no gradient.
    assert missing_grads(model.visual_tokenizer.backbone) == ["trunk.post_trunk_norm.weight"]


def test_packing_images_equals_one_by_one(tiny_model):
    """Several native-resolution images in one call give what each gives alone: no attention across."""
    patches, grids = patches_of(tiny_model, *two_images(), random_image(32, 32, seed=5))
    with torch.no_grad():
        together = tiny_model.visual_tokens(patches, grids)
        alone = torch.cat([tiny_model.visual_tokens([p], [g]) for p, g in zip(patches, grids)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_equal_size_images_batch_like_the_masked_packed_sequence(tiny_model):
    """Images of one size take the batched path; it equals the block-diagonal mask over the packed sequence
    and each image alone."""
    imgs = [random_image(32, 32, seed=s) for s in (1, 2, 3)]
    patches, grids = patches_of(tiny_model, *imgs)
    backbone = tiny_model.visual_tokenizer.backbone
    x = torch.cat(patches)
    with torch.no_grad():
        batched = backbone(x, grids)
        h = backbone.preprocessor(x, grids)
        cos, sin = backbone._rope(grids, h.device)
        mask = backbone._mask(grids, h.device, windowed=False)
        for block in backbone.trunk.blocks:
            h = block(h, cos, sin, mask)
        alone = torch.cat([backbone(p, [g]) for p, g in zip(patches, grids)])
    torch.testing.assert_close(batched, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def _windowed_tokenizer(tiny_model, window_px: int, fullatt=(1,)) -> VisualTokenizer:
    vision = dataclasses.replace(tiny_model.config.vision, use_window_attention=True, window_size=window_px,
                                 fullatt_blocks=fullatt)
    vt = VisualTokenizer(vision, tiny_model.config.adapter)
    vt.load_state_dict(tiny_model.visual_tokenizer.state_dict())
    return vt.eval()


def test_window_attention(tiny_model):
    patches, grids = patches_of(tiny_model, *two_images())
    windowed = _windowed_tokenizer(tiny_model, window_px=32)  # 4 x 4 patches per window
    with torch.no_grad():
        full = tiny_model.visual_tokenizer(torch.cat(patches), grids)
        win = windowed(torch.cat(patches), grids)
        alone = torch.cat([windowed(p, [g]) for p, g in zip(patches, grids)])
        # A window covering every image is full attention.
        huge = _windowed_tokenizer(tiny_model, window_px=1024)(torch.cat(patches), grids)
    assert win.shape == full.shape
    assert not torch.allclose(win, full, atol=1e-4)  # the windows do restrict attention
    torch.testing.assert_close(win, alone, rtol=1e-5, atol=1e-6)  # ... and never across images
    torch.testing.assert_close(huge, full, rtol=1e-5, atol=1e-6)


def test_vision_rejects_bad_grid(tiny_model):
    with pytest.raises(ValueError, match="divisible"):
        tiny_model.visual_tokenizer(torch.zeros(15, 3, 8, 8), [(1, 3, 5)])
