"""Shared fixtures: one tiny Ovis-U1 with every zero-initialised layer perturbed, and test images.

The decoder's adaLN and output layers and the refiner's gates start at zero, so an untrained model
predicts v = 0 and every block is an identity; small noise on all parameters makes every path live, so
the comparisons below compare non-trivial numbers.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_u1.images import preprocess_image
from ovis_u1.model import OvisU1
from ovis_u1.tokenizer import build_tokenizer, default_corpus

# The tiny models' tensors are so small that intra-op threads only add synchronisation, and on a busy
# (shared CI) machine they oversubscribe the cores: measured 3-4x slower wall time with 2 threads.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Add N(0, std^2) noise to every floating parameter, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def missing_grads(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the parameters (outside `skip` prefixes) that got no gradient or an all-zero one."""
    return [n for n, p in module.named_parameters()
            if not n.startswith(skip) and (p.grad is None or not p.grad.abs().sum() > 0)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer(default_corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def make_tiny(tiny_tokenizer):
    """Factory for fresh perturbed tiny models (for tests that train, cast or otherwise change one)."""

    def make(seed: int = 0) -> OvisU1:
        torch.manual_seed(seed)
        model = OvisU1.from_preset("tiny", tokenizer=tiny_tokenizer)
        perturb(model, seed=seed + 1)
        # Extra noise on the language side: a barely perturbed random LM answers with one repeated token
        # (or only whitespace), which would make the answer comparisons vacuous.
        perturb(model.llm, std=0.1, seed=seed + 2)
        perturb(model.vte, std=0.1, seed=seed + 3)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny):
    """The shared model: read-only. Tests that need to change it use `make_tiny` or monkeypatch."""
    model = make_tiny(0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a)


def patches_of(model: OvisU1, *images: Image.Image):
    """Images -> (list of per-image patch tensors, grids), through the processor with the model's config."""
    c = model.config
    out = [preprocess_image(im, c.vision.patch_size, c.adapter.hidden_stride, c.adapter.min_pixels,
                            c.adapter.max_pixels, c.adapter.image_mean, c.adapter.image_std) for im in images]
    return [p for p, _ in out], [g for _, g in out]


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo():
    """A non-square RGB test image (height 40, width 72)."""
    return random_image(40, 72, seed=3)
