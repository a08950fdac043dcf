"""Typed configs for every Ovis-U1 component, composed into one model config, plus named presets.

Presets are data: a preset name maps to a full `OvisU1Config`; nothing is ever inferred from tensor
shapes. Values the facts sheet marks *unverified* are ordinary fields so a checkpoint can override them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The published text-to-image prefix (the conditional prompt is prefix + the user's prompt, as written).
PUBLISHED_T2I_PREFIX = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """AIMv2-style ViT at native resolution (visual_tokenizer.backbone)."""

    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 8
    intermediate_size: int = 2816
    pos_grid: int = 32  # learned position table is pos_grid x pos_grid (448 px / 14)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    use_bias: bool = False  # bias of attention proj and MLP linears
    window_size: int = 112  # pixels; only used when use_window_attention
    use_window_attention: bool = False  # published: fullatt_block_indexes is a list (null = off)
    fullatt_blocks: tuple[int, ...] = ()  # blocks that attend fully when windows are on
    # The learned position table (published `preserve_original_pe`), resized to each image's grid
    # bicubically ("two_dim") or along the flattened sequence ("one_dim", `interpolate_pe_method`).
    preserve_original_pe: bool = True
    interpolate_pe_method: str = "two_dim"
    use_rope: bool = True  # published `disable_rope` = not use_rope


@dataclass
class AdapterConfig:
    """Visual tokenizer head: 2x2 merge -> Linear -> LayerNorm -> softmax over V visual words."""

    vocab_size: int = 65536  # V (*unverified*: class default 16384, published totals need 65536)
    hidden_stride: int = 2
    tokenize_function: str = "softmax"
    num_indicators: int = 4  # reserved zero-probability columns for the image indicator ids
    # Image processing bounds (smart_resize) and normalisation belong to the visual tokenizer.
    min_pixels: int = 448 * 448
    max_pixels: int = 1792 * 1792
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


@dataclass
class LLMConfig:
    """Qwen3 decoder; field names are those of transformers' Qwen3Config."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False


@dataclass
class RefinerConfig:
    """Bidirectional token refiner (visual_generator.backbone.txt_in)."""

    in_dim: int = 4096  # = 2 x LLM hidden (last two hidden layers concatenated)
    hidden_size: int = 1536
    num_heads: int = 24
    depth: int = 2  # 0: no blocks, the decoder gets the projected condition and its mean (an ablation)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True


@dataclass
class DecoderConfig:
    """MMDiT-X visual decoder (visual_generator.backbone); names follow the published 'yak' config."""

    in_channels: int = 64  # 16 latent channels packed 2x2
    out_channels: int = 64
    hidden_size: int = 1536
    num_heads: int = 12
    depth: int = 6  # double-stream blocks
    depth_single_blocks: int = 12
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    vec_in_dim: int = 1536  # the refiner's CLS output width
    context_in_dim: int = 4096
    time_embed_dim: int = 256
    # What the final layer predicts. The release predicts the velocity (noise - x0). "sample" predicts the
    # clean latent x0 and turns it into the velocity (x_t - x0) / t inside forward, so sampling, guidance
    # and the cache are the same for both; small models learn prompt-following much faster this way.
    prediction: str = "velocity"
    min_t: float = 0.02  # "sample" divides by max(t, min_t)


@dataclass
class VAEConfig:
    """diffusers AutoencoderKL (frozen). Owns its latent shift/scale."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611  # *unverified* which VAE: FLUX-style 16-channel values
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True  # FLUX-style 16-channel VAEs have neither quant conv
    use_post_quant_conv: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class GenerationConfig:
    """Sampling and decoding defaults the API falls back on when the caller leaves them out."""

    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float = 5.0  # text-to-image txt_cfg
    edit_guidance_scale: float = 6.0  # editing txt_cfg
    image_guidance_scale: float = 1.5  # editing img_cfg
    # FLUX resolution-dependent shift; the published decoder config's timestep_shift / base_shift /
    # max_shift (its config class defaults to no shift; the release's value is unknown).
    use_time_shift: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    # Text-to-image sizes are floored to this multiple (the published generate_image floors to 16 = the
    # VAE's 8x times the 2x2 packing) and must lie in [min_side, max_side].
    size_multiple: int = 16
    min_side: int = 16
    max_side: int = 4096
    # Edit output size: smart_resize(H, W, factor, min, max) of the input, the published defaults.
    edit_size_multiple: int = 32
    edit_min_pixels: int = 56 * 56
    edit_max_pixels: int = 14 * 14 * 4 * 1280
    # What the ViT sees of a generation prompt's image: the T2I blank and the edit image are first
    # smart-resized to at most this many pixels (the published code uses the processor's min_pixels).
    blank_image_max_pixels: int = 448 * 448
    edit_image_max_pixels: int = 448 * 448
    # How a seed becomes initial noise: "published" draws the whole call's noise at once in bfloat16 on
    # the model's device from one generator seeded with `seed` (the release's get_noise, so a seed gives
    # the release's image on the same device); "per_sample" gives image k a float32 CPU generator seeded
    # with seed + k (the same image on every device, whatever the batch it is drawn in).
    noise: str = "per_sample"
    t2i_prefix: str = PUBLISHED_T2I_PREFIX  # "" puts the user's prompt alone in the conditional prompt
    max_new_tokens: int = 512
    # Answers never repeat a run of this many tokens (0: off, as the release generates). It cuts the loops a
    # small model falls into on images outside its training ("purple purple purple ...") short.
    no_repeat_ngram_size: int = 0
    multimodal_max_length: int = 2048  # prompt tokens before truncation (with a warning)
    # Fast-mode settings (opt-in): first-block cache threshold, guidance interval, steps. 20 = 0.4 of the
    # 50 steps: with the interval that is ~0.35x the decoder work of plain mode before any cache hit
    # (`python -m ovis_u1.bench`; random weights never hit the cache, so that figure holds without it).
    fast_cache_threshold: float = 0.08
    fast_guidance_interval: tuple[float, float] = (0.1, 0.9)
    fast_num_inference_steps: int = 20


@dataclass
class OvisU1Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    refiner: RefinerConfig = field(default_factory=RefinerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OvisU1Config:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            if f.name == "preset":
                kwargs[f.name] = d[f.name]
                continue
            sub_cls = type(f.default_factory())  # type: ignore[misc]
            kwargs[f.name] = _build(sub_cls, d[f.name], f.name)
        return cls(**kwargs)


def _build(sub_cls: type, values: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(sub_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} config fields {unknown}; known: {sorted(known)}")
    out = {}
    for k, v in values.items():
        default = known[k].default
        out[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
    return sub_cls(**out)


def _tiny() -> OvisU1Config:
    return OvisU1Config(
        vision=VisionConfig(patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                            intermediate_size=128, pos_grid=8),
        adapter=AdapterConfig(vocab_size=256, min_pixels=32 * 32, max_pixels=128 * 128),
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024, rope_theta=10000.0),
        refiner=RefinerConfig(in_dim=128, hidden_size=64, num_heads=8, depth=2),  # published rule: 2 x decoder heads
        decoder=DecoderConfig(in_channels=16, out_channels=16, hidden_size=64, num_heads=4, depth=1,
                              depth_single_blocks=1, axes_dim=(4, 6, 6), vec_in_dim=64,
                              context_in_dim=128),
        vae=VAEConfig(latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                      norm_num_groups=8, scaling_factor=1.0, shift_factor=0.0,
                      mid_block_add_attention=False),
        generation=GenerationConfig(height=64, width=64, num_inference_steps=4, min_side=32,
                                    max_side=256, edit_size_multiple=16, edit_min_pixels=32 * 32,
                                    edit_max_pixels=128 * 128, blank_image_max_pixels=64 * 64,
                                    edit_image_max_pixels=128 * 128, max_new_tokens=16,
                                    multimodal_max_length=256, size_multiple=16,
                                    fast_num_inference_steps=2),
        preset="tiny",
    )


def _shapes() -> OvisU1Config:
    """The shipped default model: 64x64 shapes-world images, every component small (~7M parameters).

    A 4x VAE with 4 latent channels gives 16x16 latents = 64 decoder tokens of 16 values, few enough
    that velocity prediction is easy for a 128-wide decoder; 8 px ViT patches give 16 visual tokens.
    """
    return OvisU1Config(
        vision=VisionConfig(patch_size=8, hidden_size=128, num_layers=3, num_heads=4,
                            intermediate_size=256, pos_grid=8),
        adapter=AdapterConfig(vocab_size=512, min_pixels=32 * 32, max_pixels=128 * 128),
        llm=LLMConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=1024, rope_theta=10000.0),
        refiner=RefinerConfig(in_dim=256, hidden_size=128, num_heads=4, depth=2),
        decoder=DecoderConfig(in_channels=16, out_channels=16, hidden_size=128, num_heads=4, depth=2,
                              depth_single_blocks=3, axes_dim=(8, 12, 12), vec_in_dim=128,
                              context_in_dim=256, prediction="sample"),
        vae=VAEConfig(latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
                      norm_num_groups=8, scaling_factor=1.0, shift_factor=0.0,
                      mid_block_add_attention=False),
        generation=GenerationConfig(height=64, width=64, num_inference_steps=30, guidance_scale=3.0,
                                    edit_guidance_scale=3.0, image_guidance_scale=1.5, use_time_shift=False,
                                    size_multiple=16, min_side=32, max_side=256, edit_size_multiple=16,
                                    edit_min_pixels=32 * 32, edit_max_pixels=64 * 64,
                                    blank_image_max_pixels=32 * 32, edit_image_max_pixels=64 * 64,
                                    max_new_tokens=24, t2i_prefix="",
                                    multimodal_max_length=256, fast_num_inference_steps=12,
                                    no_repeat_ngram_size=4),
        preset="shapes",
    )


def _small() -> OvisU1Config:
    """Between tiny and full size, so matrix work dominates a CPU benchmark (~90M parameters)."""
    c = OvisU1Config(
        vision=VisionConfig(patch_size=14, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704),
        adapter=AdapterConfig(vocab_size=4096, min_pixels=224 * 224, max_pixels=448 * 448),
        llm=LLMConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                      max_position_embeddings=4096),
        refiner=RefinerConfig(in_dim=1024, hidden_size=512, num_heads=8, depth=2),
        decoder=DecoderConfig(hidden_size=512, num_heads=4, depth=2, depth_single_blocks=4,
                              axes_dim=(16, 56, 56), vec_in_dim=512, context_in_dim=1024),
        vae=VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16),
        generation=GenerationConfig(height=256, width=256, num_inference_steps=20, min_side=128, max_side=512,
                                    edit_min_pixels=128 * 128, edit_max_pixels=256 * 256,
                                    blank_image_max_pixels=224 * 224, edit_image_max_pixels=224 * 224,
                                    fast_num_inference_steps=8),
        preset="small",
    )
    return c


PRESETS = {
    # *unverified* which VAE the release uses: a FLUX-style one (no quant convs) is assumed.
    "ovis-u1-3b": lambda: OvisU1Config(vae=VAEConfig(use_quant_conv=False, use_post_quant_conv=False),
                                       generation=GenerationConfig(noise="published"), preset="ovis-u1-3b"),
    "small": _small,
    "shapes": _shapes,
    "tiny": _tiny,
}


def get_preset(name: str) -> OvisU1Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())
