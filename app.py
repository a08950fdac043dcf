"""Ovis-U1 web demo: chat about images, text-to-image, editing, and a look inside the token refiner.

    python app.py                                   # the shipped default model (ovis_u1/default_model)
    python app.py --checkpoint DIR                  # any checkpoint directory (own or published layout)
    python app.py --checkpoint AIDC-AI/Ovis-U1-3B   # a hub id, fetched with huggingface_hub
    OVIS_U1_CHECKPOINT=DIR python app.py            # the same, from the environment

The callbacks only call the package (`model.answer / text_to_image / edit`, `ovis_u1.refiner_insight`);
every default shown (sizes, steps, guidance) comes from the loaded model's `config.generation`. All model
calls share one queue slot (`concurrency_id="model"`): one model, one request at a time; per-user data
(chat and edit histories) lives in `gr.State`, so sessions never see each other's. On a ZeroGPU Space
(the `spaces` package importable) every model call runs under `@spaces.GPU`; elsewhere that is a no-op.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import binascii
import functools
import inspect
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pydantic
import torch
from PIL import Image, UnidentifiedImageError

from ovis_u1 import refiner_insight as insight
from ovis_u1.checkpoint import CHECKPOINT_ENV, DEFAULT_MODEL_DIR, CheckpointError, load_model, resolve_checkpoint
from ovis_u1.generation import EditSession
from ovis_u1.images import load_image
from ovis_u1.model import OvisU1
from ovis_u1.shapes import ShapesWorld

log = logging.getLogger("ovis_u1.app")
WORLD_PRESETS = ("shapes", "tiny")  # models trained on (or sized for) the synthetic shapes world
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
CUSTOM_SIZE = "custom"
MAX_SEED = 2**31 - 1
# Held-out shapes-world samples shown as examples, (category or kind, index[, seed]), picked so that the
# shipped default model gets them right at the app's defaults: `python tests/pick_examples.py` (the
# scene reader over 6 samples x 4 seeds per GenEval category, 10 samples per edit kind at seed 42, exact
# match over 6 questions per VQA kind). Re-pick when the default model is retrained.
EXAMPLE_PICKS = {
    "t2i": [("counting", 0, 0), ("two_object", 0, 0), ("colors", 0, 0)],
    "edit": [("recolor", 9, 42), ("remove", 6, 42), ("add", 1, 42)],
    "vqa": [("color", 0), ("shape", 0), ("count", 1), ("relation", 0), ("describe", 0)],
}
# Small images (the shapes world's are 64 px) are shown enlarged, with crisp pixels.
CSS = """.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#edit-source img, #edit-result img { width: 100%; height: 100%; object-fit: contain; }
#edit-history .caption-label { white-space: normal; max-width: 100%; overflow-wrap: anywhere; }
#create-size-note { color: var(--color-accent); }"""  # history captions wrap instead of '1. make the t...'
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])  # local fonts: no web font fetch


# ---- what one request may ask for -------------------------------------------------------------------
# Every bound a stranger's request meets before the model runs, in one place. Each check raises a
# `gr.Error` that names the field, says what was wrong and what is allowed.
MAX_FILES = 4  # images per chat message (the shapes world's questions use one or two)
MAX_IMAGE_PIXELS = 24_000_000  # a 6000x4000 photo; read from the file's header, before any decoding
REFINER_MAX_TOKENS = 32  # the refiner tab draws a token-by-token map per block, ~0.3 inch per token
CHARS_PER_TOKEN = 8  # a character bound checked before tokenizing: no prompt packs more into one token


def user_error(message: str) -> gr.Error:
    """A mistake in the request: shown to the user, no traceback in the server log."""
    return gr.Error(message, print_exception=False)


def prompt_token_limit(model: OvisU1) -> int:
    """Tokens a prompt, question or instruction may have: half the model's context window
    (`generation.multimodal_max_length`, 256 on the shipped model, 2,048 on the published one); the other
    half holds the chat template, the images' tokens and earlier turns."""
    return model.config.generation.multimodal_max_length // 2


def check_text(label: str, value, tokenizer, max_tokens: int) -> str:
    if not isinstance(value, str):
        raise user_error(f"{label} must be text, got {'nothing' if value is None else type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise user_error(f"{label} contains {value[e.start]!r} at position {e.start}, which is not a valid "
                         "Unicode character (a lone surrogate); remove it") from None
    value = value.strip()
    if not value:
        raise user_error(f"{label} is empty: it must be non-empty text")
    if len(value) > max_tokens * CHARS_PER_TOKEN:
        raise user_error(f"{label} is {len(value):,} characters long; at most {max_tokens * CHARS_PER_TOKEN:,} "
                         f"are accepted here ({max_tokens} tokens)")
    n = len(tokenizer(value, add_special_tokens=False)["input_ids"])
    if n > max_tokens:
        raise user_error(f"{label} is {n} tokens long; at most {max_tokens} tokens are accepted here: "
                         "shorten it")
    return value


def check_number(label: str, value, low: float, high: float, whole: bool):
    """`value` as an int (whole) or float within [low, high]; strings holding a number are accepted."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise user_error(f"{label} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise user_error(f"{label} must be a number, got {'nothing' if value is None else repr(value)}")
    if not math.isfinite(value):
        raise user_error(f"{label} must be a finite number, got {value}")
    if whole and value != int(value):
        raise user_error(f"{label} must be a whole number, got {value}")
    if not low <= value <= high:
        def shown(x):
            return f"{int(x)}" if whole else f"{x:g}"
        raise user_error(f"{label} must be between {shown(low)} and {shown(high)}, got {shown(value)}")
    return int(value) if whole else float(value)


def guarded(component, check):
    """Make `component` run `check` on the raw value each request sends, before Gradio converts it.

    Gradio's own conversion fails on NaN, text in a number or None in a text box with messages that
    name no field (or none at all). An override on the instance, as in `unopened_uploads`.
    """
    convert = component.preprocess
    component.preprocess = lambda payload: convert(check(payload))
    return component


def number_input(component, whole: bool = True):
    """Guard a Slider or Number with its own label and bounds."""
    low = -math.inf if component.minimum is None else component.minimum
    high = math.inf if component.maximum is None else component.maximum
    return guarded(component, lambda v: check_number(component.label, v, low, high, whole))


def text_input(component, tokenizer, max_tokens: int, label: str | None = None):
    name = label or component.label.lower()
    return guarded(component, lambda v: check_text(name, v, tokenizer, max_tokens))


def check_image_header(path, name: str) -> None:
    """Refuse an image over MAX_IMAGE_PIXELS from its header alone: PIL's open reads no pixels.

    Unreadable files pass here; decoding them (`load_upload`) then says what is wrong.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                w, h = image.size
    except Image.DecompressionBombError as e:
        raise user_error(f"image {name!r} is too large ({e}); images may have at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return
    if w * h > MAX_IMAGE_PIXELS:
        raise user_error(f"image {name!r} is {w}x{h} = {w * h:,} pixels; images may have at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels (a 6000x4000 photo): downscale it")


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The image in a `data:` URL (sent through the API instead of an upload), within the upload limit."""
    body = url.partition(",")[2]
    if len(body) > 4 * max_bytes // 3 + 4:
        raise user_error(f"the image sent inline (data: URL or base64 text) is over the {max_bytes / 2**20:g} MB "
                         "upload limit")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise user_error("the image sent inline is not valid base64 (expected 'data:image/png;base64,<data>' "
                         "or the base64 text alone)") from None


def load_upload(src, name: str | None = None) -> Image.Image:
    """An uploaded image (a path, or the bytes of a data: URL), decoded after its header passed the budget."""
    name = name or (Path(src).name if isinstance(src, (str, Path)) else "sent inline (data: URL or base64 text)")
    if isinstance(src, bytes):
        try:
            image = load_image(src, max_pixels=MAX_IMAGE_PIXELS)
        except ValueError as e:
            raise user_error(str(e).replace("image bytes", f"the image {name}", 1)) from None
        return image
    check_image_header(src, name)
    return load_image(src, max_pixels=MAX_IMAGE_PIXELS)


# ---- small pure helpers ------------------------------------------------------------------------------
def size_bounds(model: OvisU1) -> tuple[int, int]:
    """Smallest and largest side the size sliders offer.

    A shapes-world model learned to draw only at its default size (64 px): at 256 px the shipped one
    draws a blank page after a minute, so its sliders stop at twice the default; a warning covers the
    sizes in between (`size_note`). Other models get their config's full range.
    """
    g = model.config.generation
    if model.config.preset in WORLD_PRESETS:
        return g.min_side, min(g.max_side, 2 * max(g.height, g.width))
    return g.min_side, g.max_side


def size_presets(g, low: int | None = None, high: int | None = None) -> dict[str, tuple[int, int]]:
    """'4:3 · 64x48' -> (height, width): for each aspect ratio the allowed size nearest to it in shape,
    then nearest to the default pixel count. A size only near the ratio (the sides are multiples of
    `size_multiple`) is labelled '≈'."""
    low, high, m = low or g.min_side, high or g.max_side, g.size_multiple
    sides = range(math.ceil(low / m) * m, high + 1, m)
    area = g.height * g.width
    out: dict[str, tuple[int, int]] = {}
    for a, b in ASPECTS:
        def cost(hw, a=a, b=b):
            h, w = hw
            shape = abs(math.log((w / h) / (a / b)))
            return (round(shape, 3), abs(math.log(h * w / area)))
        # For each height only the two allowed widths around its exact width can be nearest in shape.
        pairs = [(h, w) for h in sides for w in (math.floor(h * a / b / m) * m, math.ceil(h * a / b / m) * m)
                 if low <= w <= high]
        h, w = min(pairs, key=cost)
        if (h, w) in out.values() or abs(math.log((w / h) / (a / b))) > 0.05:
            continue  # no allowed size has this shape (within 5%): leave it out rather than mislabel it
        exact = w * b == h * a
        out[f"{'' if exact else '≈'}{a}:{b} · {w}x{h}"] = (h, w)
    return out


def preset_for(presets: dict[str, tuple[int, int]], h, w) -> str:
    """The preset label matching the sliders, or 'custom' once they have moved off every preset."""
    return next((label for label, hw in presets.items() if hw == (int(h), int(w))), CUSTOM_SIZE)


def readable(fn):
    """Turn exceptions into a `gr.Error` the user can read; the server logs bugs and keeps serving."""
    def convert(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, ValueError):  # bad input; ImageInputError is one
            # Uploads sit in server temp folders: name the file the user sent, not where it landed.
            return gr.Error(re.sub(r"'[^']*/([^'/]+)'", r"'\1'", str(e)), print_exception=False)
        if isinstance(e, torch.OutOfMemoryError):
            return gr.Error("out of memory: try a smaller size, fewer images or fewer tokens")
        log.exception("unexpected error in %s", fn.__name__)
        return gr.Error(f"internal error ({type(e).__name__}); it has been logged on the server")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                raise convert(e) from None
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise convert(e) from None
    return call


def gpu_decorator(duration: int):
    """`spaces.GPU(duration=...)` where the `spaces` package is importable (ZeroGPU), else the identity."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    # Without the package, this repository's own `spaces/` folder imports as an empty namespace package.
    gpu = getattr(spaces, "GPU", None)
    return gpu(duration=duration) if gpu is not None else (lambda fn: fn)


def progress_callback(progress: gr.Progress):
    return lambda step, total, latents: progress((step, total), desc="denoising", unit="steps")


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


# ---- examples ----------------------------------------------------------------------------------------
@dataclass
class Examples:
    prompts: list[tuple[str, int]]  # (prompt, seed)
    edits: list[tuple[str, str, int]]  # (image path, instruction, seed)
    questions: list[tuple[list[str], str]]  # (image paths, question)


def make_examples(model: OvisU1, folder: str | Path, picks: dict | None = None) -> Examples:
    """Held-out shapes-world renders (drawn by the world, not the model) and prompts from its templates.

    A shapes-world model gets them at the world's 64 px; any other model gets them enlarged 7x (nearest)
    to its 448 px native resolution, and natural-image prompts. `picks` names the held-out samples
    (defaults: EXAMPLE_PICKS).
    """
    picks = picks or EXAMPLE_PICKS
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(size=64, split="heldout")
    in_world = model.config.preset in WORLD_PRESETS

    def save(image, name: str) -> str:
        if not in_world:
            image = image.resize((image.width * 7, image.height * 7), Image.Resampling.NEAREST)
        image.save(folder / f"{name}.png")
        return str(folder / f"{name}.png")

    edits = [(save(e.source, f"edit_{kind}_{i}"), e.instruction, seed)
             for kind, i, seed in picks["edit"] for e in [world.edit(i, kind)]]
    questions = [([save(im, f"vqa_{kind}_{i}_{k}") for k, im in enumerate(v.images)], v.question)
                 for kind, i in picks["vqa"] for v in [world.vqa(i, kind)]]
    if in_world:
        prompts = [(world.t2i(i, category).caption, seed) for category, i, seed in picks["t2i"]]
    else:
        prompts = [(p, 42) for p in ("a red fox curled up in fresh snow, golden hour light",
                                     "a lighthouse on a cliff under a starry sky, watercolor",
                                     "three blue cubes stacked on a wooden table",
                                     "a yellow triangle and a green circle on a white background")]
    return Examples(prompts, edits, questions)


# ---- what the model can do ---------------------------------------------------------------------------
# The shipped default model's measured figures (README "Measurements"; per kind: docs/eval_exact.json,
# the seed-0 draw of 10-12 per kind). Update them with the model: `python -m ovis_u1.shapes.evaluate`.
SHIPPED_MODEL_NOTE = """**What this model can do.** It is the small model shipped with the project, trained from scratch
on the synthetic *shapes world*: 64x64 pictures of coloured circles, squares and triangles on a plain
background. It knows nothing else: photos come back as shapes-world answers, and a fox or a lighthouse
as a coloured blob. Measured on 180 held-out shapes-world samples per task:

- **Understand**: **0.761** of questions answered exactly (follow-up questions **0.822**). Works:
  colour and shape (1.00), describe (0.90), count (0.80). At chance: left/right/above/below (0.50),
  which of two images (0.40).
- **Create**: **0.556** of prompts drawn right (mini-GenEval). Works: one object (1.00) in the asked
  colour (0.90). Weak: counting (0.50); two objects, position and colour binding (0.20).
- **Edit**: **0.306** of edits right. Best at add (0.50) and replace (0.42); recolour and move (0.17)
  and remove (0.00) mostly fail.

It draws at 64x64 only, and answers with a few words (at most {max_new_tokens} tokens). Try the
examples under each tab: they are held-out samples it gets right."""

WORLD_MODEL_NOTE = """**What this model can do.** A `{preset}` model of the synthetic *shapes world*: coloured circles,
squares and triangles at {height}x{width}. It knows nothing outside that world. Measure it with
`python -m ovis_u1.shapes.evaluate --checkpoint DIR`."""

GENERAL_NOTE = """**About this model.** Preset `{preset}`: a general model (the published Ovis-U1 weights, or a model
of that shape). Its images are drawn at {height}x{width} by default; prompts may have up to
{prompt_tokens} tokens."""


def capability_note(model: OvisU1, shipped: bool) -> str:
    """The honest note shown at the top of the page: what this model does and does not do."""
    g = model.config.generation
    fields = dict(preset=model.config.preset, height=g.height, width=g.width, max_new_tokens=g.max_new_tokens,
                  prompt_tokens=prompt_token_limit(model))
    if shipped and model.config.preset == "shapes":
        return SHIPPED_MODEL_NOTE.format(**fields)
    if model.config.preset in WORLD_PRESETS:
        return WORLD_MODEL_NOTE.format(**fields)
    return GENERAL_NOTE.format(**fields)


def size_note(model: OvisU1, h, w) -> str:
    """A warning under the size sliders when a shapes-world model is asked for a size it never drew."""
    g = model.config.generation
    if model.config.preset not in WORLD_PRESETS or (int(h), int(w)) == (g.height, g.width):
        return ""
    return (f"⚠ This model learned to draw at {g.width}x{g.height} only: at {int(w)}x{int(h)} expect "
            "fewer prompts drawn right, or an empty picture.")


def edit_note(model: OvisU1, source: Image.Image, result: Image.Image) -> str:
    """Say what size the result is and why, when it is not the input's size."""
    g = model.config.generation
    (sw, sh), (w, h) = source.size, result.size
    if (sw, sh) == (w, h):
        return f"Result {w}x{h}, the size of the input."
    why = "scaled down" if w * h < sw * sh else "scaled up"
    return (f"Result {w}x{h}: the {sw}x{sh} input was {why} to what this model edits ({g.edit_min_pixels:,} "
            f"to {g.edit_max_pixels:,} pixels, sides multiples of {g.edit_size_multiple}), keeping its shape as "
            "closely as those allow.")


# ---- the UI ------------------------------------------------------------------------------------------
def _steps(g, elem_id: str | None = None) -> gr.Slider:
    return number_input(gr.Slider(1, max(100, 2 * g.num_inference_steps), value=g.num_inference_steps, step=1,
                                  label="steps", elem_id=elem_id))


def _seed(value: int = 42, elem_id: str | None = None) -> gr.Number:
    return number_input(gr.Number(value, precision=0, minimum=0, maximum=MAX_SEED, label="seed", min_width=100,
                                  elem_id=elem_id))


def _scale(low: float, high: float, value: float, step: float, label: str) -> gr.Slider:
    return number_input(gr.Slider(low, high, value=value, step=step, label=label), whole=False)


def build_ui(model: OvisU1, examples_dir: str | Path | None = None, title: str = "Ovis-U1",
             note: str | None = None, max_upload_bytes: int = 10 * 2**20) -> gr.Blocks:
    """The four tabs around `model`; each model callback is one package call plus argument plumbing.

    `note` is the capability note shown first (default: `capability_note` for a model not known to be the
    shipped one); `max_upload_bytes` bounds images sent inline as data: URLs as uploads are bounded.
    """
    g = model.config.generation
    if examples_dir is None:  # removed at exit; `main` passes a folder it removes itself
        examples_dir = tempfile.mkdtemp(prefix="ovis_u1_examples_")
        atexit.register(shutil.rmtree, examples_dir, True)
    ex = make_examples(model, examples_dir)
    low, high = size_bounds(model)
    presets = size_presets(g, low, high)
    model_call = dict(concurrency_id="model", concurrency_limit=1)  # one model: one request at a time
    ui_only = dict(queue=False, api_visibility="private")
    pixelated = "pixelated"  # the shapes world's 64 px images stay crisp when shown larger
    n_params = model.num_parameters_by_component()["total"]
    tok, max_tokens_in = model.tokenizer, prompt_token_limit(model)
    # Every shapes-world question is about images: answered without one, it is a guess.
    needs_image = model.config.preset in WORLD_PRESETS

    with gr.Blocks(title=title, delete_cache=(900, 3600)) as demo:  # uploads and results: kept 1 h
        gr.Markdown(f"## {title}\nModel preset `{model.config.preset}`, {n_params / 1e6:,.1f}M parameters, "
                    f"on `{model.device}` in `{str(model.dtype).removeprefix('torch.')}`; images "
                    f"{g.height}x{g.width} by default (sides multiples of {g.size_multiple}, "
                    f"{low}-{high} px).")
        with gr.Accordion("What this model can do", open=True, elem_id="capabilities"):
            gr.Markdown(note if note is not None else capability_note(model, shipped=False))
        with gr.Tab("Understand", id="understand"):
            chat_state = gr.State({"images": [], "turns": []})
            chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat", elem_classes=pixelated)
            message = gr.MultimodalTextbox(
                placeholder="Ask about the images (attach one or several; later questions reuse them)",
                file_types=["image"], file_count="multiple", sources=["upload"], show_label=False,
                elem_id="chat-input")
            with gr.Row():
                stop = gr.Button("Stop", variant="stop", scale=0, elem_id="chat-stop")
                clear = gr.Button("Clear", scale=0, elem_id="chat-clear")
                chat_status = gr.Markdown("", elem_id="chat-status", min_height=40)
                max_tokens = number_input(gr.Slider(1, max(64, 2 * g.max_new_tokens), value=g.max_new_tokens,
                                                    step=1, label="max new tokens"))
            gr.Examples([{"text": q, "files": paths} for paths, q in ex.questions], [message],
                        label="Examples (held-out shapes-world images)", cache_examples=False)

        with gr.Tab("Create", id="create"):
            with gr.Row():
                with gr.Column():
                    prompt = text_input(gr.Textbox(label="Prompt", lines=2, value=ex.prompts[0][0],
                                                   elem_id="create-prompt"), tok, max_tokens_in)
                    preset = gr.Dropdown([*presets, CUSTOM_SIZE], value=next(iter(presets)), label="Size preset",
                                         elem_id="create-preset")
                    with gr.Row():
                        height = number_input(gr.Slider(low, high, value=g.height, step=g.size_multiple,
                                                        label="height", elem_id="create-height"))
                        width = number_input(gr.Slider(low, high, value=g.width, step=g.size_multiple,
                                                       label="width", elem_id="create-width"))
                    size_warning = gr.Markdown(size_note(model, g.height, g.width), elem_id="create-size-note")
                    with gr.Row():
                        steps = _steps(g, "create-steps")
                        guidance = _scale(0, 20, g.guidance_scale, 0.5, "guidance")
                    with gr.Row(equal_height=True):
                        seed = _seed(ex.prompts[0][1], "create-seed")
                        dice = gr.Button("Random seed", scale=0)
                        count = number_input(gr.Slider(1, 4, value=1, step=1, label="images"))
                    mode = gr.Radio(["exact", "fast"], value="exact", label="mode",
                                    info="fast: first-block cache, guidance mid-trajectory only, fewer steps")
                    create_btn = gr.Button("Generate", variant="primary", elem_id="create-run")
                    gr.Examples([list(p) for p in ex.prompts], [prompt, seed], cache_examples=False)
                # Fixed columns, natural height: one 64 px image must not be blown up to the full width.
                gallery = gr.Gallery(label="Images", format="png", columns=2, fit_columns=False,
                                     object_fit="contain", elem_id="create-gallery", elem_classes=pixelated)

        with gr.Tab("Edit", id="edit"):
            edit_state = gr.State([])  # this user's EditSession history: [(None, original), (instruction, result), ...]
            with gr.Row():
                with gr.Column():
                    source = unopened_uploads(gr.Image(ex.edits[0][0], label="Image to edit", height=260,
                                                       type="filepath", elem_id="edit-source",
                                                       elem_classes=pixelated))
                    instruction = text_input(gr.Textbox(label="Instruction", value=ex.edits[0][1],
                                                        elem_id="edit-instruction"), tok, max_tokens_in)
                    with gr.Row():
                        edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-run")
                        more_btn = gr.Button("Keep editing (apply to the last result)", elem_id="edit-more")
                        undo_btn = gr.Button("Undo", scale=0)
                    with gr.Accordion("Settings", open=False, elem_id="edit-settings"):
                        e_steps = _steps(g, "edit-steps")
                        e_txt = _scale(0, 20, g.edit_guidance_scale, 0.5, "text guidance")
                        e_img = _scale(0, 10, g.image_guidance_scale, 0.25, "image guidance")
                        with gr.Row(equal_height=True):
                            e_seed = _seed(ex.edits[0][2], "edit-seed")
                            e_dice = gr.Button("Random seed", scale=0)
                        e_mode = gr.Radio(["exact", "fast"], value="exact", label="mode")
                    gr.Examples([list(e) for e in ex.edits], [source, instruction, e_seed],
                                cache_examples=False)
                with gr.Column():
                    result = gr.Image(label="Result", format="png", height=260, interactive=False,
                                      elem_id="edit-result", elem_classes=pixelated)
                    result_note = gr.Markdown("", elem_id="edit-note")
                    history = gr.Gallery(label="Editing history", format="png", columns=3, fit_columns=False,
                                         object_fit="contain", elem_id="edit-history", elem_classes=pixelated)

        with gr.Tab("Inside the refiner", id="refiner"):
            gr.Markdown("The token refiner turns the LLM's hidden states into the decoder's text stream and "
                        "a CLS vector. Below: its attention per block (heads averaged; the CLS row outlined "
                        "in red), its adaLN gates, how far each prompt token moves, and where the decoder's "
                        f"image tokens look for one word. Prompts here have at most {REFINER_MAX_TOKENS} "
                        "tokens, so the plots stay readable.")
            with gr.Row():
                r_prompt = text_input(gr.Textbox(label="Prompt", value=ex.prompts[-1][0], scale=4,
                                                 elem_id="refiner-prompt"),
                                      tok, min(REFINER_MAX_TOKENS, max_tokens_in))
                analyse_btn = gr.Button("Analyse", variant="primary", scale=1, elem_id="refiner-run")
            gr.Examples([[p] for p, _ in ex.prompts], [r_prompt], cache_examples=False)
            tokens = gr.HighlightedText(label="Prompt tokens (shade: how far the refiner moved each)")
            attention_plot = gr.Plot(label="Refiner attention", format="png", elem_id="refiner-attention")
            with gr.Row():
                gates_plot = gr.Plot(label="adaLN gates", format="png")
                movement_plot = gr.Plot(label="Token movement", format="png")
            with gr.Row():
                # Values are token positions ("12" or "12,13,14" for a word of several pieces); custom values
                # let API callers name any position without analysing first.
                word = gr.Dropdown([], label="Word (analyse first)", allow_custom_value=True)
                w_steps = _steps(g, "refiner-steps")
                w_step = number_input(gr.Slider(1, w_steps.maximum, value=(g.num_inference_steps + 1) // 2,
                                                step=1, label="at step"))
                w_seed = _seed(ex.prompts[-1][1], "refiner-seed")
            word_btn = gr.Button("Show where the image attends to this word", elem_id="refiner-word-run")
            word_plot = gr.Plot(label="Decoder attention from image positions to the word", format="png",
                                elem_id="refiner-word")

        # ---- callbacks ----
        def chat_request(msg, state) -> tuple[str, list[str], list[Image.Image]]:
            """The question, its new files and the conversation's decoded images; refuses before any output
            changes, so a refused message stays in the box with its attachments and the chat is untouched."""
            if not isinstance(msg, dict):
                raise user_error("the chat message must be {'text': question, 'files': [images]}")
            text = check_text("question", msg.get("text"), tok, max_tokens_in)
            files = [f if isinstance(f, str) else f["path"] for f in msg.get("files") or []]
            if len(files) > MAX_FILES:
                raise user_error(f"{len(files)} images attached; at most {MAX_FILES} are accepted per message")
            for f in files:  # every header before any decoding
                check_image_header(f, Path(f).name)
            images = [load_upload(f) for f in files or state["images"]]
            if not images and needs_image:
                raise user_error("this model only answers questions about images: attach one (the paperclip "
                                 "in the message box) or pick an example below")
            return text, files, images

        @gpu_decorator(duration=60)
        @readable
        def chat(msg, state, max_new_tokens):
            text, files, images = chat_request(msg, state)
            turn = {"q": text, "images": files, "a": ""}
            history = [] if files else conversation_history(state["turns"])
            new = {"images": files or state["images"], "turns": [*state["turns"], turn]}
            # The session's state changes only once the model answers, so a failed turn leaves no trace.
            yield chat_messages(new), gr.skip(), None
            for piece in model.answer(text, images, max_new_tokens=max_new_tokens, stream=True,
                                      history=history):
                turn["a"] += piece
                yield chat_messages(new), new, gr.skip()
            turn["done"] = True
            yield chat_messages(new), new, gr.skip()

        @gpu_decorator(duration=120)
        @readable
        def create(text, h, w, n_steps, scale, s, n, m, progress=gr.Progress()):  # noqa: B008 (gradio idiom)
            images = model.text_to_image(text, height=h, width=w, num_inference_steps=n_steps,
                                         guidance_scale=scale, seed=s, num_images_per_prompt=n, mode=m,
                                         callback=progress_callback(progress), progress=False)
            return [(im, f"seed {s + k}") for k, im in enumerate(images)]

        # The chain lives in `edit_state` as EditSession's history: plain (instruction, image) pairs,
        # because a ZeroGPU Space pickles a callback's arguments into its GPU process (a session would
        # carry the model). Each call resumes a session around it and returns the new history, so a
        # failed call leaves the state, and the result and history shown, as they were.
        def edit_settings(n_steps, txt, img, s, m, progress) -> dict:
            return dict(num_inference_steps=n_steps, guidance_scale=txt, image_guidance_scale=img, seed=s,
                        mode=m, callback=progress_callback(progress), progress=False)

        @gpu_decorator(duration=120)
        @readable
        def edit_new(src, text, n_steps, txt, img, s, m, progress=gr.Progress()):  # noqa: B008
            if src is None:
                raise user_error("upload an image to edit first")
            if isinstance(src, str) and src.startswith("data:"):
                src = data_url_bytes(src, max_upload_bytes)
            original = load_upload(src)
            session = EditSession(model, original, **edit_settings(n_steps, txt, img, s, m, progress))
            out = session.edit(text)
            # The state keeps a display-sized copy of the original, not a 24-megapixel photo.
            shown = original.copy()
            shown.thumbnail((1024, 1024))
            chain = [(None, shown), *session.history[1:]]
            return out, edit_gallery(chain), chain, edit_note(model, original, out)

        @gpu_decorator(duration=120)
        @readable
        def edit_more(chain, text, n_steps, txt, img, s, m, progress=gr.Progress()):  # noqa: B008
            if not chain:
                raise user_error("nothing to keep editing yet: upload an image and press Edit first")
            session = EditSession.resume(model, chain, **edit_settings(n_steps, txt, img, s, m, progress))
            out = session.edit(text)
            return (out, edit_gallery(session.history), session.history,
                    f"Result {out.width}x{out.height}: step {len(session.history) - 1}.")

        def undo(chain):
            if not chain:
                return None, [], [], ""
            session = EditSession.resume(model, chain)
            return session.undo(), edit_gallery(session.history), session.history, ""

        @gpu_decorator(duration=30)
        @readable
        def analyse(text):
            report = insight.refiner_report(model, text)
            words = refiner_words(report)
            moved = [float(np.mean(report.movement[idx])) for _, idx in words]
            top = max(max(moved), 1e-12)
            return ([(w, m / top) for (w, _), m in zip(words, moved, strict=True)],
                    insight.plot_refiner_attention(report), insight.plot_gates(report),
                    insight.plot_token_movement(report),
                    gr.Dropdown(choices=[(f"{k + 1}: {w}", ",".join(map(str, idx)))
                                         for k, (w, idx) in enumerate(words)],
                                value=",".join(map(str, words[-1][1])), label="Word"))

        @gpu_decorator(duration=120)
        @readable
        def word_attention(text, index, n_steps, at_step, s, progress=gr.Progress()):  # noqa: B008
            report = insight.refiner_report(model, text)  # cheap next to sampling; names the word
            words = refiner_words(report)
            if index in (None, ""):
                name, keys = words[-1]
            else:
                keys = [int(k) for k in str(index).split(",") if k.strip().isdigit()]
                if not keys or len(keys) != len(str(index).split(",")):
                    raise user_error(f"word must be a token position or several, comma-separated (as the "
                                     f"dropdown gives them), got {index!r}")
                if max(keys) >= len(report.tokens):
                    raise user_error(f"word position {max(keys)} is past the condition's "
                                     f"{len(report.tokens)} tokens")
                name = next((w for w, idx in words if idx == keys), "".join(report.tokens[k] for k in keys))
            image, heat = insight.word_attention_map(model, text, keys[0] if len(keys) == 1 else keys,
                                                     step=at_step, num_inference_steps=n_steps, seed=s,
                                                     callback=progress_callback(progress))
            return insight.plot_word_heatmap(image, heat, word=name.strip(), step=at_step)

        # ---- wiring: model calls are queued in one slot and named for the API; UI helpers bypass it ----
        # Progress and errors show beside the buttons: an error pill over the chatbot would hide the chat.
        chat_event = message.submit(chat, [message, chat_state, max_tokens], [chatbot, chat_state, message],
                                    api_name="chat", show_progress_on=chat_status, **model_call)
        stop.click(None, None, None, cancels=[chat_event], **ui_only)
        clear.click(lambda: ([], {"images": [], "turns": []}), None, [chatbot, chat_state], **ui_only)
        chatbot.clear(lambda: {"images": [], "turns": []}, None, chat_state, **ui_only)  # its own bin icon

        # The preset sets the sliders; moving a slider by hand shows which preset (or 'custom') it is now.
        preset.change(lambda p: gr.skip() if p == CUSTOM_SIZE else presets[p], preset, [height, width],
                      **ui_only)
        for side in (height, width):
            side.input(lambda h, w: preset_for(presets, h, w), [height, width], preset, **ui_only)
            side.change(lambda h, w: size_note(model, h, w), [height, width], size_warning, **ui_only)
        mode.change(lambda m: g.fast_num_inference_steps if m == "fast" else g.num_inference_steps, mode,
                    steps, **ui_only)
        dice.click(random_seed, None, seed, **ui_only)
        e_dice.click(random_seed, None, e_seed, **ui_only)
        create_inputs = [prompt, height, width, steps, guidance, seed, count, mode]
        create_btn.click(create, create_inputs, gallery, api_name="text_to_image", **model_call)
        prompt.submit(create, create_inputs, gallery, api_visibility="private", **model_call)

        settings = [e_steps, e_txt, e_img, e_seed, e_mode]
        edit_outputs = [result, history, edit_state, result_note]
        # Progress and errors show on the note, so an error leaves the result and the history in view.
        edit_btn.click(edit_new, [source, instruction, *settings], edit_outputs, api_name="edit",
                       show_progress_on=result_note, **model_call)
        more_btn.click(edit_more, [edit_state, instruction, *settings], edit_outputs, api_name="keep_editing",
                       show_progress_on=result_note, **model_call)
        undo_btn.click(undo, edit_state, edit_outputs, api_name="undo_edit", queue=False)

        analyse_btn.click(analyse, r_prompt, [tokens, attention_plot, gates_plot, movement_plot, word],
                          api_name="refiner_report", **model_call)
        # "at step" can go up to "steps": in the page only (API sessions keep the wide bound, and the
        # package checks the pair).
        def step_bound(n, k):
            return gr.Slider(maximum=int(n), value=min(int(k), int(n)))
        w_steps.change(step_bound, [w_steps, w_step], w_step, **ui_only)
        demo.load(step_bound, [w_steps, w_step], w_step, **ui_only)
        word_btn.click(word_attention, [r_prompt, word, w_steps, w_step, w_seed], word_plot,
                       api_name="word_attention", **model_call)
    return demo


def unopened_uploads(image: gr.Image) -> gr.Image:
    """Make `image` hand each upload to the callback unopened: a file path, or a data: URL's text.

    gr.Image opens every upload with PIL before the callback runs (a data: URL is decoded in full, with
    no size check, and a corrupt one fails with no message); this way the callback checks the header
    against the pixel budget first and the package's `load_image` says what is wrong. An override on the
    instance rather than a subclass: Gradio writes a `.pyi` stub next to the source file of every
    component class it sees defined.
    """
    class InlineImageData(image.data_model):
        """Also accepts the image as a bare string through the API: a data: URL or base64 text (never a
        path: those must come through the upload route and its folder checks)."""

        @pydantic.model_validator(mode="before")
        @classmethod
        def inline(cls, value):
            if isinstance(value, str):
                return {"url": value if value.startswith("data:") else "data:;base64," + value}
            # Anything else becomes an empty payload that `preprocess` refuses with a message (an error
            # raised here would reach the user as pydantic's, or as none at all).
            return value if isinstance(value, dict) else {}

    def preprocess(payload):
        if payload is None:
            return None
        if (payload.url or "").startswith("data:"):
            return payload.url
        if payload.path is None:
            raise user_error("the image to edit must be an uploaded file, a data: URL or base64 text; got "
                             "neither a file path nor a URL")
        return str(payload.path)

    image.data_model = InlineImageData
    image.preprocess = preprocess
    return image


def refiner_words(report) -> list[tuple[str, list[int]]]:
    """The prompt's words and their token positions in `report.tokens`, for the refiner tab.

    refiner_insight groups a word's sub-word pieces ("th" "re" "e" -> "three") in `report.words`; a report
    without that grouping gives one entry per token.
    """
    words = getattr(report, "words", None)
    if words is not None:
        return [(w.text, list(w.indices)) for w in words]
    return [(report.labels[i], [i]) for i in report.prompt_indices]


def chat_messages(state: dict) -> list[dict]:
    out = []
    for turn in state["turns"]:
        out += [{"role": "user", "content": {"path": p}} for p in turn["images"]]
        shown = turn["a"] or ("*(empty answer)*" if turn.get("done") else "")
        out += [{"role": "user", "content": turn["q"]}, {"role": "assistant", "content": shown}]
    return out


def conversation_history(turns: list[dict]) -> list[tuple[str, str]]:
    """The answered turns since the images last changed: the conversation a new question continues."""
    start = max((k for k, t in enumerate(turns) if t["images"]), default=0)
    return [(t["q"], t["a"]) for t in turns[start:] if t.get("done")]


def edit_gallery(chain: list) -> list[tuple]:
    return [(im, "original" if text is None else f"{k}. {text}") for k, (text, im) in enumerate(chain)]


# ---- serving -----------------------------------------------------------------------------------------
def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           max_file_size: str = "10mb", max_queue: int = 64, **kwargs):
    """Queue (one model slot, bounded waiting line) and serve; errors reach users as messages only."""
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, max_file_size=max_file_size,
                       show_error=False, ssr_mode=False, theme=THEME, css=CSS, **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", metavar="DIR|ORG/NAME",
                   help=f"checkpoint directory or hub id (default: ${CHECKPOINT_ENV}, else the shipped one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--device", default=None, help="cuda / cpu / mps (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda, float32 elsewhere")
    p.add_argument("--max-file-size", default="10mb", help="largest upload accepted, e.g. 10mb")
    p.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait for the model")
    return p.parse_args(argv)


def parse_size(text: str) -> int:
    """'10mb' -> bytes (units b, kb, mb, gb: powers of 1024, as Gradio reads max_file_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"--max-file-size must look like 10mb or 512kb, got {text!r}")
    return int(float(m[1]) * 1024 ** ("b", "kb", "mb", "gb").index(m[2] or "b"))


def stop_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`) closes the server as Ctrl-C does, so Gradio's shutdown
    deletes the uploads and results it cached (`delete_cache`) instead of leaving them in its temp folder."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        max_upload = parse_size(args.max_file_size)
    except ValueError as e:
        sys.exit(f"app.py: {e}")
    try:
        path = resolve_checkpoint(args.checkpoint)
        model = load_model(path, args.device, getattr(torch, args.dtype) if args.dtype else None)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"app.py: cannot load the model: {e}")
    stop_on_sigterm()
    shipped = path.resolve() == DEFAULT_MODEL_DIR.resolve()  # its measured figures are shown
    with tempfile.TemporaryDirectory(prefix="ovis_u1_examples_") as examples:
        demo = build_ui(model, examples, note=capability_note(model, shipped=shipped),
                        max_upload_bytes=max_upload)
        launch(demo, host=args.host, port=args.port, share=args.share, max_file_size=args.max_file_size,
               max_queue=args.max_queue)


if __name__ == "__main__":
    main()
