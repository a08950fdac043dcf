"""Visual encoder (AIMv2-style ViT at native resolution) and the visual tokenizer head (the adapter).

Axis letters: N patches of all images packed together, P pixels per patch side, D width, H heads,
V visual vocabulary, G merge group (hidden_stride^2 neighbouring patches).

Patches arrive in merge-group order (the processor's layout): the G patches of each 2x2 group are
consecutive, groups row-major. Everything here stays in that order, so the adapter can merge a group by
a plain reshape. Module and parameter names follow the published checkpoint (`visual_tokenizer.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import AdapterConfig, VisionConfig
from .images import merge_group_order
from .layers import sdpa


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Patchifier(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p = cfg.patch_size
        # A conv with kernel = stride = patch over one pre-cut patch is a linear map of its pixels;
        # kept as Conv2d so the published weight [D, 3, P, P] loads as is.
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=p, stride=p)
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, patches: Tensor) -> Tensor:  # [N, 3, P, P] -> [N, D]
        return self.norm(self.proj(patches).flatten(1))


class Preprocessor(nn.Module):
    def __init__(self, cfg: VisionConfig, hidden_stride: int):
        super().__init__()
        self.cfg, self.stride = cfg, hidden_stride
        self.patchifier = Patchifier(cfg)
        if cfg.interpolate_pe_method not in ("two_dim", "one_dim"):
            raise ValueError(f"interpolate_pe_method {cfg.interpolate_pe_method!r}; choose 'two_dim' or 'one_dim'")
        # The published `preserve_original_pe`: without it the encoder has no position table at all.
        self.pos_embed = (nn.Parameter(torch.zeros(1, cfg.pos_grid**2, cfg.hidden_size))
                          if cfg.preserve_original_pe else None)

    def position_embedding(self, h: int, w: int) -> Tensor:
        """The learned table resized to an (h, w) grid, in merge-group order: [h*w, D]. "two_dim" resizes
        the g x g table bicubically; "one_dim" resizes the flattened sequence linearly to h*w entries."""
        g = self.cfg.pos_grid
        if self.cfg.interpolate_pe_method == "one_dim":
            table = rearrange(self.pos_embed, "1 n d -> 1 d n")
            if h * w != g * g:
                table = F.interpolate(table.float(), size=h * w, mode="linear", align_corners=False)
            table = rearrange(table, "1 d n -> n d").to(self.pos_embed.dtype)
        else:
            table = rearrange(self.pos_embed, "1 (gh gw) d -> 1 d gh gw", gh=g, gw=g)
            if (h, w) != (g, g):
                table = F.interpolate(table.float(), size=(h, w), mode="bicubic", align_corners=False)
            table = rearrange(table, "1 d h w -> (h w) d").to(self.pos_embed.dtype)
        return table[merge_group_order(h, w, self.stride).to(table.device)]

    def forward(self, patches: Tensor, grid_thws: list[tuple[int, int, int]]) -> Tensor:
        x = self.patchifier(patches)
        if self.pos_embed is None:
            return x
        pos = torch.cat([self.position_embedding(h, w) for _, h, w in grid_thws])
        return x + pos


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, images: int = 1) -> Tensor:
        """`images` > 1: x packs that many equal-length images, attended as a batch (no mask needed)."""
        q, k, v = rearrange(self.qkv(x), "(b n) (k h d) -> k b h n d", k=3, h=self.num_heads, b=images)
        cos, sin = (rearrange(c, "(b n) d -> b 1 n d", b=images) for c in (cos, sin))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = sdpa(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h n d -> (b n) (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.use_bias)
        self.fc3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm_1 = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_2 = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, images: int = 1) -> Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin, mask, images)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.post_trunk_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


class VisualEncoder(nn.Module):
    """ViT over all images of a call packed into one sequence; attention never crosses images."""

    def __init__(self, cfg: VisionConfig, hidden_stride: int = 2):
        super().__init__()
        self.cfg, self.stride = cfg, hidden_stride
        self.preprocessor = Preprocessor(cfg, hidden_stride)
        self.trunk = Trunk(cfg)

    def _rope(self, grid_thws, device) -> tuple[Tensor, Tensor]:
        """2D RoPE (Qwen2.5-VL vision style): a quarter of head_dim frequencies each for rows, columns."""
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        quarter = head_dim // 4
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(quarter, device=device).float() / quarter))
        rows, cols = self._row_col_ids(grid_thws, device)
        if not self.cfg.use_rope:  # published `disable_rope`: angle 0 leaves q and k as they are
            rows, cols = torch.zeros_like(rows), torch.zeros_like(cols)
        freqs = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # [N, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half pairs dim i with i + d/2
        return emb.cos(), emb.sin()

    def _row_col_ids(self, grid_thws, device) -> tuple[Tensor, Tensor]:
        rows, cols = [], []
        for _, h, w in grid_thws:
            order = merge_group_order(h, w, self.stride).to(device)
            rows.append((order // w).float())
            cols.append((order % w).float())
        return torch.cat(rows), torch.cat(cols)

    def _mask(self, grid_thws, device, windowed: bool) -> Tensor | None:
        """Boolean [N, N] mask: same image (and same window when windowed); None when unrestricted."""
        if len(grid_thws) == 1 and not windowed:
            return None
        image_id = torch.cat([torch.full((h * w,), i, device=device) for i, (_, h, w) in enumerate(grid_thws)])
        keep = image_id[:, None] == image_id[None, :]
        if windowed:
            win = self.cfg.window_size // self.cfg.patch_size
            rows, cols = self._row_col_ids(grid_thws, device)
            window_id = (rows // win) * 100_000 + cols // win
            keep &= window_id[:, None] == window_id[None, :]
        return keep

    def forward(self, patches: Tensor, grid_thws: list[tuple[int, int, int]]) -> Tensor:
        """[N, 3, P, P] patches -> [N, D] features of the last block, before post_trunk_norm."""
        for t, h, w in grid_thws:
            if t != 1 or h % self.stride or w % self.stride:
                raise ValueError(f"grid {(t, h, w)} must have t=1 and h, w divisible by {self.stride}")
        x = self.preprocessor(patches, grid_thws)
        cos, sin = (c.to(x.dtype) for c in self._rope(grid_thws, x.device))
        images, full, windowed = 1, None, None
        if not self.cfg.use_window_attention and len(set(grid_thws)) == 1:
            # Images of one size attend as a batch: the same result as the block-diagonal mask over the
            # packed sequence, without its N^2 cost (38x less attention work for a VQA batch of 38 images).
            images = len(grid_thws)
        else:
            full = self._mask(grid_thws, x.device, windowed=False)
            if self.cfg.use_window_attention:
                windowed = self._mask(grid_thws, x.device, windowed=True)
        for i, block in enumerate(self.trunk.blocks):
            use_window = windowed is not None and i not in self.cfg.fullatt_blocks
            x = block(x, cos, sin, windowed if use_window else full, images)
        return x


class VisualTokenizer(nn.Module):
    """Encoder + head: patches -> probabilistic visual tokens [n, V] (one per merge group)."""

    def __init__(self, vision: VisionConfig, adapter: AdapterConfig):
        super().__init__()
        self.adapter_cfg = adapter
        self.backbone = VisualEncoder(vision, adapter.hidden_stride)
        merged = vision.hidden_size * adapter.hidden_stride**2
        real_words = adapter.vocab_size - adapter.num_indicators
        self.head = nn.Sequential(nn.Linear(merged, real_words, bias=False), nn.LayerNorm(real_words))

    def forward(self, patches: Tensor, grid_thws: list[tuple[int, int, int]]) -> Tensor:
        features = self.backbone(patches, grid_thws)
        merged = rearrange(features, "(n g) d -> n (g d)", g=self.adapter_cfg.hidden_stride**2)
        logits = self.head(merged)
        if self.adapter_cfg.tokenize_function != "softmax":
            raise ValueError(f"tokenize_function {self.adapter_cfg.tokenize_function!r}; supported: softmax")
        probs = logits.softmax(dim=-1)
        # The indicator ids own the last columns of the VTE; visual tokens never put mass there.
        return F.pad(probs, (0, self.adapter_cfg.num_indicators))

    @staticmethod
    def tokens_per_image(grid_thws, hidden_stride: int) -> list[int]:
        return [t * h * w // hidden_stride**2 for t, h, w in grid_thws]
