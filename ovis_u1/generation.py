"""Text-to-image and editing on top of the model's tensor-level building blocks.

`text_to_image` and `edit` read top to bottom: check the arguments, build each guidance branch's LLM
condition, run the refiner once, denoise, decode. Three sampling modes share that path:
- "exact" (default): the published recipe with no wasted work: the LLM condition and the refiner run
  once per request (the refiner has no timestep input), the unconditional condition is computed once and
  shared by every prompt, every prompt of a call shares each decoder forward, and guidance branches share
  one where that needs no attention mask (`branch_groups`: same text lengths, same view of the reference).
- "plain": what the published code does (each branch its own forward, one sample at a time, the refiner
  re-run at every step); kept as the reference that exact mode is tested and benchmarked against.
- "fast": exact plus first-block caching, guidance only inside a middle interval of t and fewer steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .decoder import latent_ids, pack_latents, unpack_latents
from .images import ImageInputError, blank_image, generation_image, load_image, smart_resize
from .prompts import UNCOND_TEXT, edit_prompt, generation_prompt, prepare_inputs, require_tokenizer, t2i_prompts
from .sampling import (
    DecoderInputs,
    FirstBlockCache,
    branch_groups,
    denoise,
    draw_noise,
    edit_guidance,
    get_schedule,
    t2i_guidance,
)

MODES = ("exact", "fast", "plain")
MAX_STEPS = 1000
MAX_IMAGES_PER_CALL = 64


# ---- argument checks (public, so other entry points such as refiner_insight validate the same way) ---
def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    return steps


def check_scale(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be finite and in [0, 100], got {value}")
    return value


def check_prompts(prompt, what: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError(f"no {what} given")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{what} must be a non-empty string, got {p!r}")
    return prompts


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; choose one of {MODES}")
    return mode


def check_output_type(output_type: str) -> str:
    if output_type not in ("pil", "latent"):
        raise ValueError(f"output_type {output_type!r}; choose 'pil' or 'latent'")
    return output_type


def check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES_PER_CALL:
        raise ValueError(f"num_images_per_prompt must be an integer in [1, {MAX_IMAGES_PER_CALL}], got {n!r}")
    return n


def requested_size(model, height, width) -> tuple[int, int]:
    """The caller's height and width (the model's defaults where None), checked against its bounds."""
    g = model.config.generation
    out = []
    for name, side, default in (("height", height, g.height), ("width", width, g.width)):
        side = default if side is None else side
        if isinstance(side, bool) or not isinstance(side, (int, float)) or not math.isfinite(side):
            raise ValueError(f"{name} must be a number of pixels, got {side!r}")
        if not g.min_side <= side <= g.max_side:
            raise ValueError(f"{name}={side} is outside [{g.min_side}, {g.max_side}] for this model")
        out.append(int(side))
    return out[0], out[1]


def resolve_size(model, height: int | None, width: int | None) -> tuple[int, int]:
    """The output size: the requested one floored to the model's size multiple, as the published
    generate_image floors to 16 (a warning says when that changes a side)."""
    g = model.config.generation
    out = []
    for name, side in zip(("height", "width"), requested_size(model, height, width)):
        floored = side // g.size_multiple * g.size_multiple
        if floored != side:
            warnings.warn(f"{name} {side} floored to {floored} (a multiple of {g.size_multiple})", stacklevel=3)
        out.append(floored)
    return out[0], out[1]


def check_latents(model, latents, batch: int, latent_hw: tuple[int, int]) -> Tensor:
    """`latents=` as sampling starts from it: [B, C, h, w] (or [C, h, w] for every image), finite floats."""
    c, (h, w) = model.config.vae.latent_channels, latent_hw
    if not isinstance(latents, Tensor):
        raise ValueError(f"latents must be a torch.Tensor of shape [{batch}, {c}, {h}, {w}], got "
                         f"{type(latents).__name__}")
    if latents.ndim == 3:
        latents = latents.unsqueeze(0).expand(batch, -1, -1, -1)
    if tuple(latents.shape) != (batch, c, h, w):
        raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs [{batch}, {c}, {h}, {w}] "
                         f"({batch} images of {c} latent channels at the {h}x{w} latent size of the output) "
                         f"or [{c}, {h}, {w}] for all of them")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be a floating-point tensor, got {latents.dtype}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents contain NaN or infinite values")
    return latents


def check_seed(seed, generator) -> int | None:
    """The call's seed: 42 when neither a seed nor a generator is given; an error when both are."""
    if generator is not None:
        if seed is not None:
            raise ValueError("give either seed or generator, not both")
        return None
    if seed is None:
        return 42
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


# ---- conditions --------------------------------------------------------------------------------------
def encode_conditions(model, texts: Sequence[str], images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
    """Generation prompts (one image each) -> LLM condition [B, L, 2D] and its mask [B, L] (right padded)."""
    batch = prepare_inputs(require_tokenizer(model), list(texts), [[im] for im in images], model.config,
                           pad_side="right", max_length=model.config.generation.multimodal_max_length)
    cond = model.condition(batch.input_ids, batch.attention_mask, batch.pixel_patches, batch.grid_thws)
    return cond, batch.attention_mask.to(cond.device).bool()


def refine(model, cond: Tensor, mask: Tensor):
    out = model.refiner(cond, mask)
    return out.tokens, out.cls


@dataclass
class GenerationRequest:
    """Everything one text-to-image or edit call needs, before any sampling: conditions per branch."""

    conds: list[tuple[Tensor, Tensor]]  # per branch: LLM condition [B, L, 2D] and mask, one row per sample
    latent_hw: tuple[int, int]
    seeds: list[int]  # image k's seed (the call's seed + k); unused when `generator` or `latents` is set
    combine: object
    ref: Tensor | None = None  # [B, L_ref, C] packed reference latents (editing)
    ref_branches: tuple[bool, ...] = ()  # which branches see the reference
    generator: object = None  # a torch.Generator or one per image, in place of the seeds
    latents: Tensor | None = None  # [B, C, h, w] initial noise given by the caller


def _stack_padded(conds: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate branch conditions of different lengths along the batch, right-padding with a mask."""
    length = max(c.shape[1] for c, _ in conds)
    cs = [torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[1])) for c, _ in conds]
    ms = [torch.nn.functional.pad(m, (0, length - m.shape[1]), value=False) for _, m in conds]
    return torch.cat(cs), torch.cat(ms)


def decoder_inputs(model, req: GenerationRequest) -> DecoderInputs:
    """Refine every branch once (exact/fast modes) and lay the rows out branch-major."""
    cond, mask = _stack_padded(req.conds)
    refined = model.refiner(cond, mask)  # TokenRefiner.forward: the decoder's text stream and CLS
    txt, cls = refined.tokens, refined.cls
    n = len(req.conds)
    b = req.conds[0][0].shape[0]
    ref = ref_ids = ref_mask = None
    if req.ref is not None:
        h, w = req.latent_hw
        ref = req.ref.repeat(n, 1, 1)
        ref_ids = latent_ids(n * b, h, w, index=1, device=ref.device).to(ref.dtype)
        ref_mask = torch.tensor(req.ref_branches, device=ref.device).repeat_interleave(b)[:, None]
        ref_mask = ref_mask.expand(-1, ref.shape[1])
    return DecoderInputs(txt, mask, cls, n, ref, ref_ids, ref_mask)


def initial_noise(model, seeds: list[int], latent_hw: tuple[int, int], generator=None) -> Tensor:
    """Packed noise tokens [B, L, C] for images seeded seeds[0], seeds[0] + 1, ... (or drawn from
    `generator`), as the model's `generation.noise` says (see sampling.draw_noise)."""
    shape = (len(seeds), model.config.vae.latent_channels, *latent_hw)
    noise = draw_noise(shape, seed=None if generator is not None else seeds[0], generator=generator,
                       mode=model.config.generation.noise, device=model.device)
    return pack_latents(noise).to(model.device, model.dtype)


def sample(model, req: GenerationRequest, steps: int, mode: str = "exact", callback=None,
           progress: bool = True, shift: bool | None = None, inputs: DecoderInputs | None = None) -> Tensor:
    """Denoise from the request's noise; returns final packed latent tokens [B, L, C].

    `inputs` are the refined conditions (`decoder_inputs`), computed here when not given; plain mode
    re-runs the refiner at every step instead, as the published loop does.
    """
    g = model.config.generation
    h, w = req.latent_hw
    if req.latents is not None:
        x = pack_latents(req.latents).to(model.device, model.dtype)
    elif req.generator is not None:
        x = initial_noise(model, req.seeds, req.latent_hw, generator=req.generator)
    else:
        x = initial_noise(model, req.seeds, req.latent_hw)
    img_ids = latent_ids(x.shape[0], h, w, device=x.device).to(x.dtype)
    shift = g.use_time_shift if shift is None else shift
    timesteps = get_schedule(steps, x.shape[1], shift=shift, base_shift=g.base_shift, max_shift=g.max_shift)
    bar = _progress(steps, progress)
    cb = _chain(bar, callback)
    if mode == "plain":
        x = _denoise_plain(model, x, img_ids, req, timesteps, cb)
    else:
        fast = mode == "fast"
        inputs = decoder_inputs(model, req) if inputs is None else inputs
        x = denoise(model.decoder, x, img_ids, inputs, timesteps, req.combine,
                    guidance_interval=g.fast_guidance_interval if fast else None,
                    cache=FirstBlockCache(g.fast_cache_threshold) if fast else None, callback=cb,
                    branch_groups=branch_groups(inputs))
    if bar is not None:
        bar.close()
    return x


def _denoise_plain(model, x, img_ids, req: GenerationRequest, timesteps, callback) -> Tensor:
    """The published loop: per step, per sample, per branch one forward, refiner included.

    Steps are the outer loop so the callback sees the whole batch after every step, as in the other modes.
    """
    h, w = req.latent_hw
    total = len(timesteps) - 1
    for i in range(total):
        t, t_next = float(timesteps[i]), float(timesteps[i + 1])
        rows = []
        for s in range(x.shape[0]):
            xs = x[s:s + 1]
            vs = []
            for b, (cond, mask) in enumerate(req.conds):
                real = mask[s].sum()
                txt, cls = refine(model, cond[s:s + 1, :real], None)
                with_ref = req.ref is not None and req.ref_branches[b]
                ref = req.ref[s:s + 1] if with_ref else None
                ref_ids = latent_ids(1, h, w, index=1, device=x.device).to(x.dtype) if with_ref else None
                txt_ids = torch.zeros(1, txt.shape[1], 3, dtype=x.dtype, device=x.device)
                t_row = torch.full((1,), t, dtype=x.dtype, device=x.device)
                vs.append(model.decoder(xs, img_ids[s:s + 1], txt, txt_ids, t_row, cls, ref=ref,
                                        ref_ids=ref_ids).float())
            v = req.combine(torch.stack(vs))
            rows.append((xs.float() + (t_next - t) * v).to(x.dtype))
        x = torch.cat(rows)
        if callback is not None:
            callback(i + 1, total, x)
    return x


def pixels_to_images(pixels: Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images, as every decoded image reaches the user.

    Clamped, scaled and truncated to uint8 as the published code does (not rounded).
    """
    arr = (127.5 * (pixels.float().clamp(-1, 1) + 1)).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def decode_latents(model, tokens: Tensor, latent_hw: tuple[int, int]) -> list[Image.Image]:
    return pixels_to_images(model.vae.decode(unpack_latents(tokens, *latent_hw)))


# ---- text to image -----------------------------------------------------------------------------------
def vit_factor(model) -> int:
    """Pixels per visual token side: patch size x hidden stride (28 for the release)."""
    return model.config.vision.patch_size * model.config.adapter.hidden_stride


def t2i_request(model, prompts: list[str], height: int, width: int, guidance_scale: float, seed: int | None,
                num_images_per_prompt: int, blank_size: tuple[int, int] | None = None, generator=None,
                latents: Tensor | None = None) -> GenerationRequest:
    """Conditions for an output of height x width; the blank image is sized from `blank_size`, the size
    the caller asked for before flooring (as in the published pipeline), by default the output size."""
    g = model.config.generation
    blank = blank_image(*(blank_size or (height, width)), g.blank_image_max_pixels, vit_factor(model))
    texts = [t2i_prompts(p, g.t2i_prefix)[0] for p in prompts] + [t2i_prompts(prompts[0])[1]]
    cond, mask = encode_conditions(model, texts, [blank] * len(texts))
    n = num_images_per_prompt
    rows = torch.arange(len(prompts)).repeat_interleave(n)
    uncond = (cond[-1:].expand(len(rows), -1, -1), mask[-1:].expand(len(rows), -1))
    f = model.vae.downsample
    latent_hw = (height // f, width // f)
    if latents is not None:
        latents = check_latents(model, latents, len(rows), latent_hw)
    return GenerationRequest(conds=[(cond[rows], mask[rows]), uncond], latent_hw=latent_hw,
                             seeds=[(seed or 0) + k for k in range(len(rows))], combine=t2i_guidance(guidance_scale),
                             generator=generator, latents=latents)


@dataclass
class GenerationArgs:
    """One call's arguments, checked once and with the model's defaults filled in (`GenerationArgs.check`)."""

    prompts: list[str]  # prompts, or edit instructions
    count: int  # images per prompt
    steps: int
    guidance_scale: float  # text guidance
    image_guidance_scale: float | None  # editing only
    mode: str
    output_type: str
    seed: int | None  # None when a generator gives the noise
    generator: object
    latents: Tensor | None
    size: tuple[int, int] | None = None  # text-to-image: the output size, floored to the size multiple
    asked: tuple[int, int] | None = None  # text-to-image: the size asked for (it sizes the blank image)

    @classmethod
    def check(cls, model, prompt, steps, guidance_scale, count: int, mode: str, output_type: str, seed, generator,
              latents, task: str = "t2i", image_guidance_scale=None, height=None, width=None) -> GenerationArgs:
        g = model.config.generation
        check_mode(mode)
        default_steps = g.fast_num_inference_steps if mode == "fast" else g.num_inference_steps
        if task == "t2i":
            txt_default, img = g.guidance_scale, None
        else:
            txt_default = g.edit_guidance_scale
            img = check_scale("image_guidance_scale",
                              g.image_guidance_scale if image_guidance_scale is None else image_guidance_scale)
        args = cls(prompts=check_prompts(prompt, "prompt" if task == "t2i" else "instruction"),
                   count=check_count(count),
                   steps=check_steps(default_steps if steps is None else steps),
                   guidance_scale=check_scale("guidance_scale",
                                              txt_default if guidance_scale is None else guidance_scale),
                   image_guidance_scale=img, mode=mode, output_type=check_output_type(output_type),
                   seed=check_seed(seed, generator), generator=generator, latents=latents)
        if task == "t2i":
            args.asked = requested_size(model, height, width)
            args.size = resolve_size(model, *args.asked)
        return args


@torch.no_grad()
def text_to_image(model, prompt, height=None, width=None, num_inference_steps=None, guidance_scale=None,
                  seed: int | None = None, num_images_per_prompt: int = 1, mode: str = "exact", callback=None,
                  progress: bool = True, output_type: str = "pil", generator=None, latents: Tensor | None = None):
    """Images for one prompt or a list (prompt-major, num_images_per_prompt each).

    The initial noise comes from `latents` ([B, C, h, w] or [C, h, w], used as given), else from
    `generator` (one torch.Generator, or one per image), else from `seed` (42 by default; how a seed
    becomes noise is the model's `generation.noise`).
    """
    args = GenerationArgs.check(model, prompt, num_inference_steps, guidance_scale, num_images_per_prompt, mode,
                                output_type, seed, generator, latents, height=height, width=width)
    # The LLM condition of each guidance branch (prompt, and the unconditional prompt), one row per image.
    req = t2i_request(model, args.prompts, *args.size, args.guidance_scale, args.seed, args.count,
                      blank_size=args.asked, generator=args.generator, latents=args.latents)
    # The refiner runs once per request: it has no timestep input (plain mode re-runs it per step instead).
    inputs = None if args.mode == "plain" else decoder_inputs(model, req)
    tokens = sample(model, req, args.steps, mode=args.mode, callback=callback, progress=progress, inputs=inputs)
    return tokens if output_type == "latent" else decode_latents(model, tokens, req.latent_hw)


# ---- editing -----------------------------------------------------------------------------------------
def edit_size(model, image: Image.Image) -> tuple[int, int]:
    """The edit's output size: smart_resize of the input with the model's edit bounds (published: factor 32,
    at most 14*14*4*1280 pixels, so a 1024x1024 input gives 992x992)."""
    g = model.config.generation
    return smart_resize(image.height, image.width, factor=g.edit_size_multiple, min_pixels=g.edit_min_pixels,
                        max_pixels=g.edit_max_pixels)


def edit_request(model, image: Image.Image, instructions: list[str], txt_scale: float, img_scale: float,
                 seed: int | None, num_images_per_prompt: int, generator=None,
                 latents: Tensor | None = None) -> GenerationRequest:
    """Three branches: (instruction, image + reference), (unconditional text, image + reference) and
    (unconditional text, blank image, no reference). The image is first resized to the output size; the
    ViT reads it scaled down to at most `edit_image_max_pixels`, the VAE at the output size."""
    g = model.config.generation
    height, width = edit_size(model, image)
    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    seen = generation_image(resized, g.edit_image_max_pixels, vit_factor(model))
    blank = blank_image(height, width, g.blank_image_max_pixels, vit_factor(model))
    texts = [edit_prompt(t) for t in instructions] + [generation_prompt(UNCOND_TEXT)] * 2
    cond, mask = encode_conditions(model, texts, [seen] * (len(instructions) + 1) + [blank])
    rows = torch.arange(len(instructions)).repeat_interleave(num_images_per_prompt)
    b = len(rows)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1)
    ref = pack_latents(model.vae.encode(pixels.permute(2, 0, 1)[None].to(model.device)))
    ref = ref.to(model.dtype).expand(b, -1, -1)
    k = len(instructions)
    conds = [(cond[rows], mask[rows]),
             (cond[k:k + 1].expand(b, -1, -1), mask[k:k + 1].expand(b, -1)),
             (cond[k + 1:].expand(b, -1, -1), mask[k + 1:].expand(b, -1))]
    f = model.vae.downsample
    latent_hw = (height // f, width // f)
    if latents is not None:
        latents = check_latents(model, latents, b, latent_hw)
    return GenerationRequest(conds=conds, latent_hw=latent_hw, seeds=[(seed or 0) + i for i in range(b)],
                             combine=edit_guidance(txt_scale, img_scale), ref=ref,
                             ref_branches=(True, True, False), generator=generator, latents=latents)


@torch.no_grad()
def edit(model, image, instruction, num_inference_steps=None, guidance_scale=None, image_guidance_scale=None,
         seed: int | None = None, num_images_per_prompt: int = 1, mode: str = "exact", callback=None,
         progress: bool = True, output_type: str = "pil", generator=None, latents: Tensor | None = None):
    """Edited images of `image` for one instruction or a list; output size from smart_resize of the input.

    `latents`, `generator` and `seed` choose the initial noise as in `text_to_image`. The reference image
    is encoded to the VAE posterior's mean (the release samples it from the global RNG, unseeded).
    """
    source = load_image(image)
    args = GenerationArgs.check(model, instruction, num_inference_steps, guidance_scale, num_images_per_prompt, mode,
                                output_type, seed, generator, latents, task="edit",
                                image_guidance_scale=image_guidance_scale)
    # Three branches: (instruction, image + reference), (no text, image + reference), (no text, blank).
    req = edit_request(model, source, args.prompts, args.guidance_scale, args.image_guidance_scale, args.seed,
                       args.count, generator=args.generator, latents=args.latents)
    inputs = None if args.mode == "plain" else decoder_inputs(model, req)  # the refiner, once per request
    tokens = sample(model, req, args.steps, mode=args.mode, callback=callback, progress=progress, inputs=inputs)
    return tokens if output_type == "latent" else decode_latents(model, tokens, req.latent_hw)


class EditSession:
    """Multi-turn editing: each instruction edits the previous result; the history is kept here."""

    def __init__(self, model, image, **edit_kwargs):
        self._check_kwargs(edit_kwargs)
        self.model, self.kwargs = model, edit_kwargs
        self.history: list[tuple[str | None, Image.Image]] = [(None, load_image(image))]

    @classmethod
    def resume(cls, model, history, **edit_kwargs) -> EditSession:
        """A session that goes on from `history`, another session's: `[(None, original), (instruction,
        result), ...]`. For a history kept apart from the model, as the web app keeps each user's in
        Gradio state, which a ZeroGPU Space pickles into every GPU call and so must not hold the model.
        The session edits and undoes its own copy of the list."""
        turns = [tuple(t) if isinstance(t, (tuple, list)) else t for t in history]
        if not turns or not isinstance(turns[0], tuple) or len(turns[0]) != 2 or turns[0][0] is not None:
            raise ValueError("an edit history starts with (None, original image); got "
                             f"{'an empty one' if not turns else repr(turns[0])[:80]}")
        for k, turn in enumerate(turns[1:], 1):
            if not (isinstance(turn, tuple) and len(turn) == 2 and isinstance(turn[0], str)
                    and isinstance(turn[1], Image.Image)):
                raise ValueError(f"edit history entry {k} must be (instruction text, PIL image), got "
                                 f"{repr(turn)[:80]}")
        session = cls(model, turns[0][1], **edit_kwargs)
        session.history += turns[1:]
        return session

    @property
    def current(self) -> Image.Image:
        return self.history[-1][1]

    @staticmethod
    def _check_kwargs(kwargs: dict) -> None:
        # Each turn edits the previous result, so the history holds images; latents are for `edit` itself.
        if kwargs.get("output_type", "pil") != "pil":
            raise ValueError(f"EditSession keeps images, so output_type must be 'pil', got "
                             f"{kwargs['output_type']!r}; call edit(..., output_type='latent') for latents")

    def edit(self, instruction: str, **kwargs) -> Image.Image:
        self._check_kwargs(kwargs)
        result = edit(self.model, self.current, instruction, **{**self.kwargs, **kwargs})[0]
        self.history.append((instruction, result))
        return result

    def undo(self) -> Image.Image:
        if len(self.history) > 1:
            self.history.pop()
        return self.current


# ---- helpers -----------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="denoising", leave=False)


def _chain(bar, callback):
    if bar is None and callback is None:
        return None

    def cb(step, total, latents):
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(step, total, latents)
    return cb


__all__ = ["MODES", "EditSession", "ImageInputError", "edit", "text_to_image"]
