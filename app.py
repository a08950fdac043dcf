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
import functools
import inspect
import logging
import math
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from ovis_u1 import refiner_insight as insight
from ovis_u1.checkpoint import CheckpointError
from ovis_u1.model import OvisU1
from ovis_u1.processing import load_image
from ovis_u1.shapes import ShapesWorld

log = logging.getLogger("ovis_u1.app")
CHECKPOINT_ENV = "OVIS_U1_CHECKPOINT"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WORLD_PRESETS = ("shapes", "tiny")  # models trained on (or sized for) the synthetic shapes world
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
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
#edit-source img, #edit-result img { width: 100%; height: 100%; object-fit: contain; }"""
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])  # local fonts: no web font fetch


# ---- loading -----------------------------------------------------------------------------------------
def resolve_checkpoint(spec: str | None) -> Path | None:
    """A directory, a hub id (`org/name`, fetched with snapshot_download), or None for the shipped model."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(spec):
        raise CheckpointError(f"checkpoint {spec!r} is neither an existing directory nor a hub id like "
                              "'AIDC-AI/Ovis-U1-3B'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(spec))
    except Exception as e:  # offline, unknown repo, gated, ...: all mean "not available here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{spec!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {reason[:300]}). Where no hub is reachable, download it elsewhere "
            f"(`hf download {spec} --local-dir DIR`), copy it here and pass --checkpoint DIR.") from None


def load_model(spec: str | None = None, device: str | None = None,
               dtype: torch.dtype | None = None) -> OvisU1:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return OvisU1.from_pretrained(resolve_checkpoint(spec), device=device, dtype=dtype).eval()


# ---- small pure helpers ------------------------------------------------------------------------------
def size_presets(g) -> dict[str, tuple[int, int]]:
    """'4:3 · 80x64' -> (height, width): the default pixel count at each aspect ratio, snapped and bounded."""
    area, m = g.height * g.width, g.size_multiple
    out: dict[str, tuple[int, int]] = {}
    for a, b in ASPECTS:
        h = math.sqrt(area * b / a)
        sides = [min(g.max_side, max(g.min_side, round(s / m) * m)) for s in (h, h * a / b)]
        if tuple(sides) not in out.values():
            out[f"{a}:{b} · {sides[1]}x{sides[0]}"] = (sides[0], sides[1])
    return out


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


# ---- the UI ------------------------------------------------------------------------------------------
def _steps(g, elem_id: str | None = None) -> gr.Slider:
    return gr.Slider(1, max(100, 2 * g.num_inference_steps), value=g.num_inference_steps, step=1,
                     label="steps", elem_id=elem_id)


def _seed(value: int = 42, elem_id: str | None = None) -> gr.Number:
    return gr.Number(value, precision=0, minimum=0, maximum=MAX_SEED, label="seed", min_width=100,
                     elem_id=elem_id)


def build_ui(model: OvisU1, examples_dir: str | Path | None = None, title: str = "Ovis-U1") -> gr.Blocks:
    """The four tabs around `model`; each model callback is one package call plus argument plumbing."""
    g = model.config.generation
    ex = make_examples(model, examples_dir or tempfile.mkdtemp(prefix="ovis_u1_examples_"))
    presets = size_presets(g)
    model_call = dict(concurrency_id="model", concurrency_limit=1)  # one model: one request at a time
    ui_only = dict(queue=False, api_visibility="private")
    pixelated = "pixelated"  # the shapes world's 64 px images stay crisp when shown larger
    n_params = model.num_parameters_by_component()["total"]

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}\nModel preset `{model.config.preset}`, {n_params / 1e6:,.1f}M parameters, "
                    f"on `{model.device}` in `{str(model.dtype).removeprefix('torch.')}`; images "
                    f"{g.height}x{g.width} by default (sides multiples of {g.size_multiple}, "
                    f"{g.min_side}-{g.max_side} px).")
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
                max_tokens = gr.Slider(1, max(64, 2 * g.max_new_tokens), value=g.max_new_tokens, step=1,
                                       label="max new tokens")
            gr.Examples([{"text": q, "files": paths} for paths, q in ex.questions], [message],
                        label="Examples (held-out shapes-world images)", cache_examples=False)

        with gr.Tab("Create", id="create"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=2, value=ex.prompts[0][0],
                                        elem_id="create-prompt")
                    preset = gr.Dropdown(list(presets), value=next(iter(presets)), label="Size preset")
                    with gr.Row():
                        height = gr.Slider(g.min_side, g.max_side, value=g.height, step=g.size_multiple,
                                           label="height")
                        width = gr.Slider(g.min_side, g.max_side, value=g.width, step=g.size_multiple,
                                          label="width")
                    with gr.Row():
                        steps = _steps(g, "create-steps")
                        guidance = gr.Slider(0, 20, value=g.guidance_scale, step=0.5, label="guidance")
                    with gr.Row(equal_height=True):
                        seed = _seed(ex.prompts[0][1], "create-seed")
                        dice = gr.Button("Random seed", scale=0)
                        count = gr.Slider(1, 4, value=1, step=1, label="images")
                    mode = gr.Radio(["exact", "fast"], value="exact", label="mode",
                                    info="fast: first-block cache, guidance mid-trajectory only, fewer steps")
                    create_btn = gr.Button("Generate", variant="primary", elem_id="create-run")
                    gr.Examples([list(p) for p in ex.prompts], [prompt, seed], cache_examples=False)
                # Fixed columns, natural height: one 64 px image must not be blown up to the full width.
                gallery = gr.Gallery(label="Images", format="png", columns=2, fit_columns=False,
                                     object_fit="contain", elem_id="create-gallery", elem_classes=pixelated)

        with gr.Tab("Edit", id="edit"):
            edit_state = gr.State([])  # [(instruction or None, PIL image)]: this session's editing chain
            with gr.Row():
                with gr.Column():
                    source = unopened_uploads(gr.Image(ex.edits[0][0], label="Image to edit", height=260,
                                                       type="filepath", elem_id="edit-source",
                                                       elem_classes=pixelated))
                    instruction = gr.Textbox(label="Instruction", value=ex.edits[0][1],
                                             elem_id="edit-instruction")
                    with gr.Row():
                        edit_btn = gr.Button("Edit", variant="primary", elem_id="edit-run")
                        more_btn = gr.Button("Keep editing (apply to the last result)", elem_id="edit-more")
                        undo_btn = gr.Button("Undo", scale=0)
                    with gr.Accordion("Settings", open=False, elem_id="edit-settings"):
                        e_steps = _steps(g, "edit-steps")
                        e_txt = gr.Slider(0, 20, value=g.edit_guidance_scale, step=0.5, label="text guidance")
                        e_img = gr.Slider(0, 10, value=g.image_guidance_scale, step=0.25,
                                          label="image guidance")
                        with gr.Row(equal_height=True):
                            e_seed = _seed(ex.edits[0][2], "edit-seed")
                            e_dice = gr.Button("Random seed", scale=0)
                        e_mode = gr.Radio(["exact", "fast"], value="exact", label="mode")
                    gr.Examples([list(e) for e in ex.edits], [source, instruction, e_seed],
                                cache_examples=False)
                with gr.Column():
                    result = gr.Image(label="Result", format="png", height=260, interactive=False,
                                      elem_id="edit-result", elem_classes=pixelated)
                    history = gr.Gallery(label="Editing history", format="png", columns=4, fit_columns=False,
                                         object_fit="contain", elem_id="edit-history", elem_classes=pixelated)

        with gr.Tab("Inside the refiner", id="refiner"):
            gr.Markdown("The token refiner turns the LLM's hidden states into the decoder's text stream and "
                        "a CLS vector. Below: its attention per block (heads averaged; the CLS row outlined "
                        "in red), its adaLN gates, how far each prompt token moves, and where the decoder's "
                        "image tokens look for one word.")
            with gr.Row():
                r_prompt = gr.Textbox(label="Prompt", value=ex.prompts[-1][0], scale=4,
                                      elem_id="refiner-prompt")
                analyse_btn = gr.Button("Analyse", variant="primary", scale=1, elem_id="refiner-run")
            gr.Examples([[p] for p, _ in ex.prompts], [r_prompt], cache_examples=False)
            tokens = gr.HighlightedText(label="Prompt tokens (shade: how far the refiner moved each)")
            attention_plot = gr.Plot(label="Refiner attention", format="png", elem_id="refiner-attention")
            with gr.Row():
                gates_plot = gr.Plot(label="adaLN gates", format="png")
                movement_plot = gr.Plot(label="Token movement", format="png")
            with gr.Row():
                # Custom values let API callers name any token index without analysing first.
                word = gr.Dropdown([], label="Word (analyse first)", allow_custom_value=True)
                w_steps = _steps(g, "refiner-steps")
                w_step = gr.Slider(1, w_steps.maximum, value=(g.num_inference_steps + 1) // 2, step=1,
                                   label="at step")
                w_seed = _seed(ex.prompts[-1][1], "refiner-seed")
            word_btn = gr.Button("Show where the image attends to this word", elem_id="refiner-word-run")
            word_plot = gr.Plot(label="Decoder attention from image positions to the word", format="png",
                                elem_id="refiner-word")

        # ---- callbacks ----
        @gpu_decorator(duration=60)
        @readable
        def chat(msg, state, max_new_tokens):
            text = ((msg or {}).get("text") or "").strip()
            if not text:
                raise gr.Error("type a question first")
            files = [f if isinstance(f, str) else f["path"] for f in (msg or {}).get("files") or []]
            turn = {"q": text, "images": files, "a": ""}
            history = [] if files else conversation_history(state["turns"])
            new = {"images": files or state["images"], "turns": [*state["turns"], turn]}
            # The session's state changes only once the model answers, so a failed turn leaves no trace.
            yield chat_messages(new), gr.skip(), None
            for piece in model.answer(text, new["images"], max_new_tokens=int(max_new_tokens), stream=True,
                                      history=history):
                turn["a"] += piece
                yield chat_messages(new), new, gr.skip()
            turn["done"] = True
            yield chat_messages(new), new, gr.skip()

        @gpu_decorator(duration=120)
        @readable
        def create(text, h, w, n_steps, scale, s, n, m, progress=gr.Progress()):  # noqa: B008 (gradio idiom)
            images = model.text_to_image(text, height=int(h), width=int(w), num_inference_steps=int(n_steps),
                                         guidance_scale=float(scale), seed=int(s),
                                         num_images_per_prompt=int(n), mode=m,
                                         callback=progress_callback(progress), progress=False)
            return [(im, f"seed {int(s) + k}") for k, im in enumerate(images)]

        def edit_step(chain, text, n_steps, txt, img, s, m, progress):
            out = model.edit(chain[-1][1], text, num_inference_steps=int(n_steps), guidance_scale=float(txt),
                             image_guidance_scale=float(img), seed=int(s), mode=m,
                             callback=progress_callback(progress), progress=False)[0]
            chain = [*chain, (text, out)]
            return out, edit_gallery(chain), chain

        @gpu_decorator(duration=120)
        @readable
        def edit_new(src, text, n_steps, txt, img, s, m, progress=gr.Progress()):  # noqa: B008
            if src is None:
                raise gr.Error("upload an image to edit first")
            return edit_step([(None, load_image(src))], text, n_steps, txt, img, s, m, progress)

        @gpu_decorator(duration=120)
        @readable
        def edit_more(chain, text, n_steps, txt, img, s, m, progress=gr.Progress()):  # noqa: B008
            if not chain:
                raise gr.Error("nothing to keep editing yet: upload an image and press Edit first")
            return edit_step(chain, text, n_steps, txt, img, s, m, progress)

        def undo(chain):
            chain = chain[:-1] if len(chain) > 1 else chain
            return (chain[-1][1] if chain else None), edit_gallery(chain), chain

        @gpu_decorator(duration=30)
        @readable
        def analyse(text):
            report = insight.refiner_report(model, text)
            shown = report.prompt_indices
            top = max(float(report.movement[shown].max()), 1e-12)
            return ([(report.tokens[i], float(report.movement[i]) / top) for i in shown],
                    insight.plot_refiner_attention(report), insight.plot_gates(report),
                    insight.plot_token_movement(report),
                    gr.Dropdown(choices=[(f"{i}: {report.labels[i]}", i) for i in shown], value=shown[-1],
                                label="Word"))

        @gpu_decorator(duration=120)
        @readable
        def word_attention(text, index, n_steps, at_step, s, progress=gr.Progress()):  # noqa: B008
            report = insight.refiner_report(model, text)  # cheap next to sampling; names the word
            if index in (None, ""):
                index = report.prompt_indices[-1]
            elif not str(index).isdigit():
                raise gr.Error(f"word must be a token index (a whole number), got {index!r}")
            index = int(index)
            if index >= len(report.tokens):
                raise gr.Error(f"word index {index} is past the condition's {len(report.tokens)} tokens")
            image, heat = insight.word_attention_map(model, text, index, step=int(at_step),
                                                     num_inference_steps=int(n_steps), seed=int(s),
                                                     callback=progress_callback(progress))
            return insight.plot_word_heatmap(image, heat, word=report.tokens[index], step=int(at_step))

        # ---- wiring: model calls are queued in one slot and named for the API; UI helpers bypass it ----
        chat_event = message.submit(chat, [message, chat_state, max_tokens], [chatbot, chat_state, message],
                                    api_name="chat", show_progress_on=chatbot, **model_call)
        stop.click(None, None, None, cancels=[chat_event], **ui_only)
        clear.click(lambda: ([], {"images": [], "turns": []}), None, [chatbot, chat_state], **ui_only)
        chatbot.clear(lambda: {"images": [], "turns": []}, None, chat_state, **ui_only)  # its own bin icon

        preset.change(lambda p: presets[p], preset, [height, width], **ui_only)
        mode.change(lambda m: g.fast_num_inference_steps if m == "fast" else g.num_inference_steps, mode,
                    steps, **ui_only)
        dice.click(random_seed, None, seed, **ui_only)
        e_dice.click(random_seed, None, e_seed, **ui_only)
        create_inputs = [prompt, height, width, steps, guidance, seed, count, mode]
        create_btn.click(create, create_inputs, gallery, api_name="text_to_image", **model_call)
        prompt.submit(create, create_inputs, gallery, api_visibility="private", **model_call)

        settings = [e_steps, e_txt, e_img, e_seed, e_mode]
        edit_outputs = [result, history, edit_state]
        edit_btn.click(edit_new, [source, instruction, *settings], edit_outputs, api_name="edit",
                       **model_call)
        more_btn.click(edit_more, [edit_state, instruction, *settings], edit_outputs, api_name="keep_editing",
                       **model_call)
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
    """Make `image` hand each upload to the callback as an unopened file path.

    gr.Image opens every upload with PIL before the callback runs, so a corrupt file would fail inside
    Gradio with an unreadable error; this way the package's `load_image` opens it and says what is wrong.
    An override on the instance rather than a subclass: Gradio writes a `.pyi` stub next to the source file
    of every component class it sees defined.
    """
    opened = image.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None or (payload.url or "").startswith("data:"):
            return opened(payload)
        return str(payload.path)

    image.preprocess = preprocess
    return image


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
    p.add_argument("--checkpoint", default=os.environ.get(CHECKPOINT_ENV),
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


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        model = load_model(args.checkpoint, args.device, getattr(torch, args.dtype) if args.dtype else None)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"app.py: cannot load the model: {e}")
    launch(build_ui(model), host=args.host, port=args.port, share=args.share,
           max_file_size=args.max_file_size, max_queue=args.max_queue)


if __name__ == "__main__":
    main()
