"""Interventions for experiments and the tutorials: run the model with one part switched off.

    with refiner_bypassed(model):  # text stream = input_embedder(condition); the CLS is still refined
        images = model.text_to_image(prompt)
    with refiner_bypassed(model, cls="raw"):  # ... and the CLS is the learned token, the same for all

The facts sheet notes that the report gives no ablation of the refiner; these make the comparison a
one-liner at inference time (a model trained without a refiner would be the full answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .refiner import RefinerOutput, TokenRefiner

CLS_CHOICES = ("refined", "raw")


class RefinerBypass(nn.Module):
    """Stands in for a TokenRefiner: the decoder gets the refiner's input projection, not its blocks' output.

    The CLS vector is the refined one (cls="refined"), so only the per-token refinement is removed, or the
    learned CLS token as it enters the blocks (cls="raw"), so the decoder also loses the pooled prompt.
    """

    def __init__(self, refiner: TokenRefiner, cls: str = "refined"):
        super().__init__()
        if cls not in CLS_CHOICES:
            raise ValueError(f"cls must be one of {CLS_CHOICES}, got {cls!r}")
        if not refiner.cfg.depth:
            raise ValueError("this model's refiner has no blocks (depth 0), so there is nothing to bypass")
        self.refiner, self.cls = refiner, cls

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False) -> RefinerOutput:
        out = self.refiner(x, mask, return_attention=return_attention)
        tokens = self.refiner.input_embedder(x)  # [B, L, C]: what the blocks start from
        if self.cls == "refined":
            return dataclasses.replace(out, tokens=tokens)
        cls = self.refiner.cls_token[:, 0].to(tokens.dtype).expand(x.shape[0], -1)  # [B, C]
        return dataclasses.replace(out, tokens=tokens, cls=cls)


@contextmanager
def refiner_bypassed(model, cls: str = "refined") -> Iterator:
    """Within the block, every generation call of `model` uses a RefinerBypass; restored on exit."""
    original = model.refiner
    if isinstance(original, RefinerBypass):
        raise ValueError("the refiner is already bypassed")
    model.refiner = RefinerBypass(original, cls)
    try:
        yield model
    finally:
        model.refiner = original


__all__ = ["CLS_CHOICES", "RefinerBypass", "refiner_bypassed"]
