"""Layers shared by the refiner and the visual decoder: norms, embedders, 3-axis RoPE, attention, adaLN.

Axes: B batch, L sequence, H heads, D head dim, P rotation pairs (D / 2), K q/k/v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMS norm with a learned gain named `scale` (the published QK-norm weight name)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32: bf16 squares lose too much precision for large activations.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    """Separate RMS norms for queries and keys over the head dimension (stabilises attention logits)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # Cast back to v's dtype so sdpa sees one dtype for q, k and v.
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; used for the timestep and the refiner's CLS vector."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of t in [0, 1]; FLUX convention: t * 1000, cos half first, then sin."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices for one position axis: pos [..., L] -> [..., L, dim/2, 2, 2].

    Pair p of the head dimension (channels 2p, 2p+1) is rotated by pos * theta^(-2p/dim).
    """
    if dim % 2:
        raise ValueError(f"RoPE axis dimension must be even, got {dim}")
    # float64 angles: positions up to a few hundred times high frequencies need the extra mantissa.
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.to(torch.float64)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    rot = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rearrange(rot, "... P (i j) -> ... P i j", i=2, j=2).float()


def _rotate(x: Tensor, freqs: Tensor) -> Tensor:
    # out = R x for each 2x2 rotation R = [[cos, -sin], [sin, cos]], written out: expanding R against x
    # and summing costs 4x the elementwise work (forward and backward), the largest cost of a small model.
    cos, sin = freqs[..., 0, 0], freqs[..., 1, 0]
    pairs = rearrange(x.float(), "... (P two) -> ... P two", two=2)
    even, odd = pairs.unbind(-1)
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rearrange(out, "... P two -> ... (P two)").type_as(x)


def apply_rope(xq: Tensor, xk: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q and k [B, H, L, D] with freqs [B, 1, L, D/2, 2, 2] (broadcast over heads)."""
    return _rotate(xq, freqs), _rotate(xk, freqs)


class EmbedND(nn.Module):
    """RoPE over several position axes: each axis gets its own slice of the head dimension."""

    def __init__(self, dim: int, theta: float, axes_dim: tuple[int, ...]):
        super().__init__()
        if sum(axes_dim) != dim:
            raise ValueError(f"RoPE axes {tuple(axes_dim)} must sum to the head dim {dim}")
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        """ids [B, L, n_axes] -> freqs [B, 1, L, D/2, 2, 2]."""
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"position ids have {ids.shape[-1]} axes, expected {len(self.axes_dim)}")
        freqs = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return freqs[:, None]


def _key_padding(mask: Tensor | None) -> Tensor | None:
    # [B, L] (True = keep) -> [B, 1, 1, L], broadcast over heads and query positions.
    return None if mask is None else rearrange(mask.bool(), "B L -> B 1 1 L")


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v on [..., L, D]; attn_mask is boolean (True = attend), broadcastable.

    bf16 on CPU (training under `precision: bf16`) takes the explicit matmul path with a float32 softmax:
    PyTorch's CPU flash kernel runs its bf16 backward ~3x slower than float32, while the two bf16 matmuls
    beat the float32 kernel (batch 32, 4 heads of 32, 88 / 152 tokens: 9.9 / 19.7 ms forward + backward
    against 11.8 / 30.5 ms in float32). Everywhere else it is PyTorch's fused kernel.
    """
    if q.dtype != torch.bfloat16 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention on [B, H, L, D]; mask is a key-padding mask [B, L]. Returns [B, L, H*D]."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    x = sdpa(q, k, v, attn_mask=_key_padding(mask))
    return rearrange(x, "B H L D -> B L (H D)")


def attention_weights(q: Tensor, k: Tensor, pe: Tensor | None = None,
                      mask: Tensor | None = None) -> Tensor:
    """Explicit softmax(q k^T / sqrt(D)) [B, H, Lq, Lk] for inspection tools (sdpa does not return it)."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    keep = _key_padding(mask)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=-1)


@dataclass
class ModulationOut:
    """One adaLN triple, each [B, 1, dim]."""

    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        # (1 + scale) so a zero-initialised modulation is the identity.
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    """adaLN: Linear(SiLU(vec)) split into n_chunks / 3 (shift, scale, gate) triples, in order."""

    def __init__(self, dim: int, n_chunks: int):
        super().__init__()
        if n_chunks % 3:
            raise ValueError(f"n_chunks must be a multiple of 3 (shift, scale, gate), got {n_chunks}")
        self.n_chunks = n_chunks
        self.lin = nn.Linear(dim, n_chunks * dim)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.n_chunks, dim=-1)
        return [ModulationOut(*chunks[i:i + 3]) for i in range(0, self.n_chunks, 3)]
