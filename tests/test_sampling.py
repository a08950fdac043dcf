"""The sampler's first-block cache (ovis_u1/sampling.py) on a tiny decoder: never reused at threshold 0,
reused at a huge one, and dropped when the batch changes. The sampling loop itself is tested through the
public tasks in test_generation.py."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb
from test_decoder import decoder_inputs

from ovis_u1.config import get_preset
from ovis_u1.decoder import VisualDecoder
from ovis_u1.sampling import FirstBlockCache, cached_forward


@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny").decoder


@pytest.fixture(scope="module")
def decoder(cfg):
    torch.manual_seed(0)
    return perturb(VisualDecoder(cfg)).eval().requires_grad_(False)


def test_first_block_cache_threshold_zero_never_hits(cfg, decoder):
    kw = decoder_inputs(cfg)
    cache = FirstBlockCache(threshold=0.0)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(cached_forward(decoder, cache, **kw), decoder(**kw), atol=0, rtol=0)
    assert cache.calls == 3 and cache.hits == 0


def test_first_block_cache_hits(cfg, decoder):
    kw = decoder_inputs(cfg, with_ref=True)
    cache = FirstBlockCache(threshold=1e9)
    with torch.no_grad():
        first = cached_forward(decoder, cache, **kw)
        second = cached_forward(decoder, cache, **kw)
    assert (cache.calls, cache.hits) == (2, 1)
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    # A new batch shape drops the stored residuals: the next call is a full one.
    with torch.no_grad():
        cached_forward(decoder, cache, **decoder_inputs(cfg, batch=1))
    assert (cache.calls, cache.hits) == (3, 1)
    cache.reset()
    assert (cache.calls, cache.hits) == (0, 0)
