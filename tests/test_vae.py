"""The VAE wrapper (ovis_u1/vae.py): shapes, output range, gradients through both halves, sampled encoding."""

from __future__ import annotations

import torch
from conftest import missing_grads


def test_vae_encode_decode_shapes_and_grads(make_tiny):
    model = make_tiny()
    f, c = model.vae.downsample, model.config.vae.latent_channels
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    z = model.vae.encode(pixels)
    assert z.shape == (2, c, 32 // f, 48 // f)
    out = model.vae.decode(z)
    assert out.shape == pixels.shape
    assert out.min() >= -1 and out.max() <= 1
    (out - pixels).square().mean().backward()
    # Gradients reach both halves: through decode, then through encode's posterior mean.
    assert missing_grads(model.vae) == []


def test_vae_sampled_encoding(tiny_model):
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = tiny_model.vae.encode(pixels, sample=True, generator=g1)
        b = tiny_model.vae.encode(pixels, sample=True, generator=g2)
        mean = tiny_model.vae.encode(pixels)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, mean)
