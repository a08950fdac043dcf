"""MMDiT-X visual decoder (published prefix `visual_generator.backbone.`, minus `txt_in`: the refiner).

A FLUX-style double/single-stream DiT whose double blocks add SD3.5's image-only self-attention.
The latent token layout (2x2 packing, 3-axis position ids) lives here because it is the decoder's.

Axes: B batch, L sequence, H heads, D head dim, K q/k/v, C channels, h/w packed-token grid, p 2x2 patch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from .config import DecoderConfig
from .layers import EmbedND, MLPEmbedder, Modulation, QKNorm, attention, attention_weights, timestep_embedding

# ---------------------------------------------------------------------------------------------------
# Token layout
# ---------------------------------------------------------------------------------------------------

def _check_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for 2x2 packing, got {h}x{w}")


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] VAE latents -> [B, (H/2)(W/2), C*4] tokens, row-major over the packed grid."""
    _check_even(latents.shape[-2], latents.shape[-1])
    return rearrange(latents, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of pack_latents; h, w are the latent (unpacked) height and width."""
    _check_even(h, w)
    return rearrange(tokens, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def latent_ids(batch: int, h: int, w: int, index: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Position ids [B, (h/2)(w/2), 3] = (index, row, col) in packed-token units; index 1 marks a reference."""
    _check_even(h, w)
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return repeat(ids, "h w K -> B (h w) K", B=batch)


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------

def _layer_norm(dim: int) -> nn.LayerNorm:
    # No affine: adaLN supplies the shift and scale.
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, mlp_hidden: int) -> nn.Sequential:
    # Sequential so the checkpoint names are `.0` and `.2`.
    return nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, dim))


class SelfAttention(nn.Module):
    """qkv projection + QK RMSNorm + output projection; the attention itself is done by the caller."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class DoubleStreamBlock(nn.Module):
    """Separate weights per stream, joint attention over [txt, img], plus image-only self-attention."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        # SD3.5 MMDiT-X order: (joint attn, MLP, image self-attn) triples.
        self.img_mod = Modulation(hidden, 9)
        self.img_norm1 = _layer_norm(hidden)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.img_self_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.img_norm2 = _layer_norm(hidden)
        self.img_mlp = _mlp(hidden, mlp_hidden)

        self.txt_mod = Modulation(hidden, 6)
        self.txt_norm1 = _layer_norm(hidden)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.txt_norm2 = _layer_norm(hidden)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def joint_qkv(self, img: Tensor, txt: Tensor, vec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of the joint attention, text first, then image: each [B, H, L, D]."""
        img_attn_mod, _, _ = self.img_mod(vec)
        txt_attn_mod, _ = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_attn_mod.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_attn_mod.modulate(self.txt_norm1(txt)))
        return tuple(torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))

    def joint_attention_weights(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                                mask: Tensor | None = None) -> Tensor:
        """The joint attention's weights [B, L, L] averaged over heads, for the block's forward inputs (for
        inspection: a forward pre-hook hands them over; the forward itself never materialises them)."""
        q, k, _ = self.joint_qkv(img, txt, vec)
        return attention_weights(q, k, pe, mask).mean(dim=1)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        img_attn_mod, img_mlp_mod, img_self_mod = self.img_mod(vec)
        txt_attn_mod, txt_mlp_mod = self.txt_mod(vec)
        n_txt = txt.shape[1]

        img_normed = self.img_norm1(img)  # shared by both image attentions, as in MMDiT-X
        q, k, v = self.joint_qkv(img, txt, vec)  # joint attention: text first, then image, along L
        joint = attention(q, k, v, pe, mask)  # [B, L, C]
        txt_out, img_out = joint[:, :n_txt], joint[:, n_txt:]

        # Image-only self-attention with the image positions; only a hidden reference is ever masked here.
        sq, sk, sv = self.img_self_attn.qkv_heads(img_self_mod.modulate(img_normed))
        self_out = attention(sq, sk, sv, pe[:, :, n_txt:], None if mask is None else mask[:, n_txt:])

        img = img + img_attn_mod.gate * self.img_attn.proj(img_out)
        img = img + img_self_mod.gate * self.img_self_attn.proj(self_out)
        img = img + img_mlp_mod.gate * self.img_mlp(img_mlp_mod.modulate(self.img_norm2(img)))

        txt = txt + txt_attn_mod.gate * self.txt_attn.proj(txt_out)
        txt = txt + txt_mlp_mod.gate * self.txt_mlp(txt_mlp_mod.modulate(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """FLUX single block: one fused Linear for qkv + MLP-in, attention and MLP in parallel, one Linear out."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = _layer_norm(hidden)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, 3)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None) -> Tensor:
        (mod,) = self.modulation(vec)
        qkv, mlp_in = torch.split(self.linear1(mod.modulate(self.pre_norm(x))),
                                  [3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, pe, mask), self.mlp_act(mlp_in)], dim=-1))
        return x + mod.gate * out


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)  # each [B, 1, C]
        return self.linear((1 + scale) * self.norm_final(x) + shift)


# ---------------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------------

@dataclass
class DecoderState:
    """The decoder's activations between stages (see VisualDecoder.embed)."""

    x: Tensor  # [B, L_img(+L_ref), C] image stream
    txt: Tensor  # [B, L_txt, C] text stream
    vec: Tensor  # [B, C] timestep + CLS conditioning
    pe: Tensor  # rotary positions of [txt, image]
    mask: Tensor | None  # [B, L_txt + L_x] True = a key to attend to
    x_t: Tensor  # [B, L_img, in_channels] the noisy target tokens (for "sample" prediction)
    timesteps: Tensor  # [B]


class VisualDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"decoder hidden_size {cfg.hidden_size} not divisible by {cfg.num_heads} heads")
        if cfg.prediction not in ("velocity", "sample"):
            raise ValueError(f"decoder prediction must be 'velocity' or 'sample', got {cfg.prediction!r}")
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.pe_embedder = EmbedND(hidden // cfg.num_heads, cfg.theta, cfg.axes_dim)
        self.img_in = nn.Linear(cfg.in_channels, hidden)
        self.time_in = MLPEmbedder(cfg.time_embed_dim, hidden)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks)
        )
        self.final_layer = FinalLayer(hidden, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                # Xavier for every projection (DiT); zero biases so the only offsets come from adaLN.
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Timestep and CLS embedders: small normal weights (DiT) so vec starts near zero and grows in training.
        for embedder in (self.time_in, self.vector_in):
            nn.init.normal_(embedder.in_layer.weight, std=0.02)
            nn.init.normal_(embedder.out_layer.weight, std=0.02)
        # adaLN-Zero: zero modulation makes every block the identity at init (DiT's best-performing choice).
        for block in self.double_blocks:
            for mod in (block.img_mod, block.txt_mod):
                nn.init.zeros_(mod.lin.weight)
                nn.init.zeros_(mod.lin.bias)
        for block in self.single_blocks:
            nn.init.zeros_(block.modulation.lin.weight)
            nn.init.zeros_(block.modulation.lin.bias)
        # Zero final adaLN and output projection: the untrained decoder predicts zero velocity.
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, txt_mask: Tensor | None = None, ref: Tensor | None = None,
                ref_ids: Tensor | None = None, ref_mask: Tensor | None = None) -> Tensor:
        """Velocity for the target tokens [B, L_img, out_channels].

        img [B, L_img, in_channels], img_ids [B, L_img, 3]; txt [B, L_txt, hidden] (refiner tokens),
        txt_ids [B, L_txt, 3]; timesteps [B] in [0, 1]; y [B, vec_in_dim] (refiner CLS);
        txt_mask [B, L_txt] bool (True = real); ref/ref_ids: reference latents appended after the target;
        ref_mask [B, L_ref] bool hides the reference from some rows, so guidance branches with and without
        a reference can share one batched forward (masked keys contribute exactly nothing).
        """
        state = self.embed(img, img_ids, txt, txt_ids, timesteps, y, txt_mask, ref, ref_ids, ref_mask)
        state = self.double_stream(state, 0, len(self.double_blocks))
        return self.head(state, self.single_stream(state))

    # The forward in stages, for samplers that skip part of it (sampling.FirstBlockCache).
    def embed(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
              txt_mask: Tensor | None = None, ref: Tensor | None = None, ref_ids: Tensor | None = None,
              ref_mask: Tensor | None = None) -> DecoderState:
        """Input projections, the conditioning vector, rotary positions and the attention mask."""
        if (ref is None) != (ref_ids is None):
            raise ValueError("ref and ref_ids must be given together")
        n_img, n_txt = img.shape[1], txt.shape[1]
        x_t = img
        if ref is not None:
            img, img_ids = torch.cat([img, ref], dim=1), torch.cat([img_ids, ref_ids], dim=1)
        x = self.img_in(img)  # [B, L_img(+L_ref), C]
        vec = self.time_in(timestep_embedding(timesteps, self.cfg.time_embed_dim).to(x.dtype))
        vec = vec + self.vector_in(y)  # [B, C]
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids], dim=1))  # [B, 1, L_txt + L_x, D/2, 2, 2]
        mask = None
        if txt_mask is not None or ref_mask is not None:
            def keep(m, n):
                return torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device) if m is None else m.bool()
            mask = torch.cat([keep(txt_mask, n_txt), keep(None, n_img), keep(ref_mask, x.shape[1] - n_img)], dim=1)
        return DecoderState(x, txt, vec, pe, mask, x_t, timesteps)

    def double_stream(self, state: DecoderState, start: int, stop: int) -> DecoderState:
        """Double-stream blocks [start, stop) applied to both streams."""
        x, txt = state.x, state.txt
        for block in self.double_blocks[start:stop]:
            x, txt = block(x, txt, state.vec, state.pe, state.mask)
        return dataclasses.replace(state, x=x, txt=txt)

    def single_stream(self, state: DecoderState) -> Tensor:
        """The single-stream blocks over [txt, image]; returns the image stream [B, L_x, C]."""
        seq = torch.cat([state.txt, state.x], dim=1)  # [B, L_txt + L_x, C]
        for block in self.single_blocks:
            seq = block(seq, state.vec, state.pe, state.mask)
        return seq[:, state.txt.shape[1]:]

    def head(self, state: DecoderState, x: Tensor) -> Tensor:
        """Final layer on the image stream x, cut back to the target tokens, as a velocity."""
        n_img = state.x_t.shape[1]
        return self._velocity(self.final_layer(x, state.vec)[:, :n_img], state.x_t, state.timesteps)

    def _velocity(self, out: Tensor, x_t: Tensor, timesteps: Tensor) -> Tensor:
        """The final layer's output as a velocity: as is, or from a predicted clean latent (x_t - x0) / t."""
        if self.cfg.prediction == "velocity":
            return out
        return (x_t - out) / self._divisor(timesteps, out.dtype)

    def clean_latent(self, velocity: Tensor, x_t: Tensor, timesteps: Tensor) -> Tensor:
        """A "sample" decoder's predicted x0 back from the velocity it returned (the inverse of _velocity)."""
        return x_t - self._divisor(timesteps, velocity.dtype) * velocity

    def _divisor(self, timesteps: Tensor, dtype) -> Tensor:
        return timesteps.to(dtype).clamp_min(self.cfg.min_t)[:, None, None]
