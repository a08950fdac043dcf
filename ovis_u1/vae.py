"""The frozen VAE: diffusers' AutoencoderKL, owning its latent shift/scale.

`encode` takes images in [-1, 1] and returns normalised latents ((z - shift) * scale), the space the
decoder is trained in; `decode` inverts that. Packing into 2x2 tokens is the decoder's business.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from .config import VAEConfig


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.block_out_channels)
        self.autoencoder = AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor,
            shift_factor=cfg.shift_factor, mid_block_add_attention=cfg.mid_block_add_attention,
            use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
        )

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f] normalised latents (the posterior mean by default)."""
        dist = self.autoencoder.encode(images.to(self.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.dtype) / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.autoencoder.decode(z).sample.clamp(-1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
