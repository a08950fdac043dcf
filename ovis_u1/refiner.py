"""Bidirectional token refiner (published prefix `visual_generator.backbone.txt_in.`).

It turns the LLM condition (last two hidden layers, concatenated) into the decoder's text stream and a
CLS vector that stands in for FLUX's pooled CLIP vector. It has no timestep input, so one refiner pass
serves every denoising step.

With depth 0 (an ablation the report never ran: docs/ablations.md) there are no blocks and so no CLS to
refine: the text stream is the input projection of the condition and the CLS is the masked mean of those
projected tokens, so the decoder still gets a pooled prompt vector; a model is trained that way.

Axes: B batch, L tokens (CLS included where said), H heads, D head dim, K q/k/v, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import RefinerConfig
from .layers import attention, attention_weights


@dataclass
class RefinerOutput:
    tokens: Tensor  # [B, L, hidden]: the tokens after the CLS, the decoder's text stream
    cls: Tensor  # [B, hidden]: the decoder's `y`
    mask: Tensor | None  # [B, L] as given (True = real token)
    attention: list[Tensor] | None  # per block [B, heads, L+1, L+1] when asked for
    gates: list[tuple[Tensor, Tensor]]  # per block (gate_msa, gate_mlp), each [B, hidden]


class ContextEmbedder(nn.Module):
    """Linear -> SiLU -> Linear on the pooled input; its output drives the blocks' gates."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class RefinerMLP(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class RefinerBlock(nn.Module):
    """Pre-norm self-attention + MLP, each residual scaled by a gate computed from the context vector."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.self_attn_proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = RefinerMLP(hidden, int(hidden * mlp_ratio))
        # Index 0 is the SiLU so the Linear's name is `adaLN_modulation.1`, as in the checkpoint.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None,
                return_attention: bool = False) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)  # each [B, C]
        q, k, v = rearrange(self.self_attn_qkv(self.norm1(x)), "B L (K H D) -> K B H L D",
                            K=3, H=self.num_heads)
        weights = attention_weights(q, k, mask=mask).detach() if return_attention else None
        x = x + gate_msa[:, None] * self.self_attn_proj(attention(q, k, v, mask=mask))
        x = x + gate_mlp[:, None] * self.mlp(self.norm2(x))
        return x, weights, (gate_msa, gate_mlp)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """[B, L, C] -> [B, C] in float32: the mean over the real tokens (mask [B, L], True = real), so padding
    does not move it; all tokens when there is no mask."""
    if mask is None:
        return x.float().mean(dim=1)
    m = mask.to(torch.float32)[..., None]
    return (x.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class TokenRefiner(nn.Module):
    def __init__(self, cfg: RefinerConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"refiner hidden_size {cfg.hidden_size} not divisible by {cfg.num_heads} heads")
        if isinstance(cfg.depth, bool) or not isinstance(cfg.depth, int) or cfg.depth < 0:
            raise ValueError(f"refiner depth must be a whole number >= 0 (0: no blocks), got {cfg.depth!r}")
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.input_embedder = nn.Linear(cfg.in_dim, hidden)
        if cfg.depth:
            # The context vector only drives the blocks' gates and the CLS only exists to be refined, so a
            # refiner without blocks has neither (no untrained weights in its checkpoint).
            self.c_embedder = ContextEmbedder(cfg.in_dim, hidden)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(
            RefinerBlock(hidden, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth)
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # Xavier keeps activations at unit scale through the 4096 -> 1536 projections.
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cfg.depth:
            # A small random CLS (as ViT/DiT embeddings) so it is distinguishable from a zero padding token.
            nn.init.normal_(self.cls_token, std=0.02)
        for block in self.individual_token_refiner.blocks:
            # Zero gates: each block starts as the identity (adaLN-Zero), so an untrained refiner passes
            # the projected LLM tokens through unchanged.
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False) -> RefinerOutput:
        """x [B, L, in_dim] condition tokens; mask [B, L] bool, True = real token."""
        b = x.shape[0]
        if not self.cfg.depth:
            return self._without_blocks(x, mask, return_attention)
        # Context vector: mean of the raw condition over the real tokens only, so padding does not move it.
        c = self.c_embedder(masked_mean(x, mask).to(x.dtype))  # [B, C]

        h = self.input_embedder(x)  # [B, L, C]
        h = torch.cat([self.cls_token.to(h.dtype).expand(b, -1, -1), h], dim=1)  # [B, 1+L, C]
        # The CLS is always a real key.
        full_mask = None
        if mask is not None:
            cls_keep = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
            full_mask = torch.cat([cls_keep, mask.bool()], dim=1)  # [B, 1+L]

        attn_maps: list[Tensor] = []
        gates: list[tuple[Tensor, Tensor]] = []
        for block in self.individual_token_refiner.blocks:
            h, weights, block_gates = block(h, c, full_mask, return_attention)
            gates.append(block_gates)
            if weights is not None:
                attn_maps.append(weights)
        return RefinerOutput(tokens=h[:, 1:], cls=h[:, 0], mask=mask,
                             attention=attn_maps if return_attention else None, gates=gates)

    def _without_blocks(self, x: Tensor, mask: Tensor | None, return_attention: bool) -> RefinerOutput:
        """depth 0: the projected tokens, and their mean over the real tokens in place of the refined CLS."""
        h = self.input_embedder(x)  # [B, L, C]
        cls = masked_mean(h, mask).to(h.dtype)
        return RefinerOutput(tokens=h, cls=cls, mask=mask, attention=[] if return_attention else None, gates=[])
