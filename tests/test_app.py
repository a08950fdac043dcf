"""The web demo end to end: `python app.py` in a subprocess, driven with gradio_client.

What is the app's own: each named endpoint passes its arguments to the package (its output equals the
package's, called directly on the same model), progress and streaming reach the client, sessions keep their
own state and never mix, bad input comes back as a readable message naming the field while the server keeps
serving, uploads are bounded and cleaned up. What the images or answers are is the package's to test
(test_generation.py, test_chat.py). Plus the parts that need no server: the edit chain's state across a ZeroGPU
call, size presets, error conversion, the loader shared with the CLI, and the hosted-Space entry point
built around a tiny injected model.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import math
import os
import pickle
import re
import sys
import time
import types
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
import yaml
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from ovis_u1 import checkpoint
from ovis_u1.__main__ import main as cli
from ovis_u1.checkpoint import CheckpointError, load_model
from ovis_u1.generation import edit_size
from ovis_u1.model import OvisU1
from ovis_u1.shapes import ShapesWorld
from tests._app_server import REPO, shared_app, start_app
from tests.web_battery import data_url, one_colour_png, png_header_only, raw_call, upload

STEPS = 3
ENDPOINTS = {"/chat", "/text_to_image", "/edit", "/keep_editing", "/undo_edit", "/refiner_report",
             "/word_attention"}


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    return shared_app()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False, analytics_enabled=False)


def new_client(server) -> Client:
    """A separate browser-like session (its own gr.State)."""
    return Client(server.url, verbose=False, analytics_enabled=False)


@pytest.fixture(scope="module")
def reference():
    """The server's model, loaded the same way in this process, to compare outputs with."""
    return load_model(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Held-out shapes-world renders saved as files, as a user would upload them."""
    folder = tmp_path_factory.mktemp("shapes")
    world = ShapesWorld(split="heldout")
    out = {}
    for name, image in {"edit": world.edit(0, "recolor").source, "vqa": world.vqa(0, "color").images[0],
                        "other": world.vqa(1, "count").images[0]}.items():
        out[name] = folder / f"{name}.png"
        image.save(out[name])
    out["broken"] = folder / "broken.png"
    out["broken"].write_bytes(b"this is not an image")
    return out


def image_at(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def assert_close(path, image: Image.Image) -> None:
    """Same picture up to float noise (the server may sum in another order than this process)."""
    got, want = image_at(path), np.asarray(image, dtype=np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 1.0


def plot_png(plot) -> Image.Image:
    assert plot["type"] == "matplotlib"
    header, data = plot["plot"].split(",", 1)
    assert header.startswith("data:image/png")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def last_answer(chat) -> str:
    """The assistant's last message in a chatbot value (content parts joined)."""
    message = [m for m in chat if m["role"] == "assistant"][-1]
    return "".join(part.get("text", "") for part in message["content"])


def user_texts(chat) -> list[str]:
    return ["".join(p.get("text", "") for p in m["content"]) for m in chat
            if m["role"] == "user" and any(p.get("type") == "text" for p in m["content"])]


def shown_answer(text: str) -> str:
    return text or "*(empty answer)*"


# ---- the endpoints -----------------------------------------------------------------------------------
def test_every_tab_has_a_named_endpoint_and_uploads_are_capped(client):
    assert ENDPOINTS <= set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert client.config["max_file_size"] == 10 * 2**20 and client.config["enable_queue"]


def test_an_oversized_upload_is_refused_and_the_server_keeps_serving(server):
    """gradio_client checks the cap before sending; the server enforces it on a raw upload too."""
    upload = server.url + "gradio_api/upload"
    big = httpx.post(upload, files={"files": ("big.png", bytes(11 * 2**20), "image/png")}, timeout=60)
    assert big.status_code == 413 and "maximum allowed size" in big.text
    small = httpx.post(upload, files={"files": ("ok.png", b"small", "image/png")}, timeout=60)
    assert small.status_code == 200
    assert server.alive()


def test_text_to_image_endpoint_matches_the_package(client, reference):
    out = client.predict("a red circle", 48, 80, STEPS, 3.0, 7, 2, "exact", api_name="/text_to_image")
    assert [item["caption"] for item in out] == ["seed 7", "seed 8"]
    want = reference.text_to_image("a red circle", height=48, width=80, num_inference_steps=STEPS,
                                   guidance_scale=3.0, seed=7, num_images_per_prompt=2, progress=False)
    for item, image in zip(out, want, strict=True):
        assert Image.open(item["image"]).size == (80, 48)
        assert_close(item["image"], image)


def test_text_to_image_reports_progress_per_denoising_step(client):
    job = client.submit("a red circle", 128, 128, 40, 3.0, 1, 1, "exact", api_name="/text_to_image")
    seen = set()
    while not job.done():
        for p in job.status().progress_data or []:
            seen.add((p.index, p.length, p.desc))
        time.sleep(0.01)
    job.result()
    assert len(seen) >= 2 and {(length, desc) for _, length, desc in seen} == {(40, "denoising")}


def test_chat_streams_and_keeps_the_images_across_turns(server, reference, shapes):
    c = new_client(server)
    job = c.submit({"text": "What color is the triangle?", "files": [handle_file(shapes["vqa"])]}, 8,
                   api_name="/chat")
    chat, _ = job.result(timeout=120)
    assert len(job.outputs()) >= 2  # the question at once, then the answer as it streams
    first = reference.answer("What color is the triangle?", [shapes["vqa"]], max_new_tokens=8)
    assert last_answer(chat) == shown_answer(first)
    # A follow-up without files continues the conversation about the same image; both turns are shown.
    chat, _ = c.predict({"text": "How many objects are there?", "files": []}, 8, api_name="/chat")
    second = reference.answer("How many objects are there?", [shapes["vqa"]], max_new_tokens=8,
                              history=[("What color is the triangle?", first)])
    assert user_texts(chat) == ["What color is the triangle?", "How many objects are there?"]
    assert last_answer(chat) == shown_answer(second)
    # New files start a new conversation about them (the earlier turns stay on screen).
    chat, _ = c.predict({"text": "How many objects are there?", "files": [handle_file(shapes["edit"])]}, 8,
                        api_name="/chat")
    third = reference.answer("How many objects are there?", [shapes["edit"]], max_new_tokens=8)
    assert len(user_texts(chat)) == 3 and last_answer(chat) == shown_answer(third)


def test_edit_then_keep_editing_then_undo(server, reference, shapes):
    c = new_client(server)
    source = Image.open(shapes["edit"]).convert("RGB")
    instruction = ShapesWorld(split="heldout").edit(0, "recolor").instruction
    result, history, note = c.predict(handle_file(shapes["edit"]), instruction, STEPS, 3.0, 1.5, 5, "exact",
                                      api_name="/edit")
    h, w = edit_size(reference, source)
    assert Image.open(result).size == (w, h)
    want = reference.edit(source, instruction, num_inference_steps=STEPS, guidance_scale=3.0,
                          image_guidance_scale=1.5, seed=5, progress=False)[0]
    assert_close(result, want)
    assert [x["caption"] for x in history] == ["original", f"1. {instruction}"]

    assert note == "Result 64x64, the size of the input."
    result2, history, _ = c.predict("remove the circle", STEPS, 3.0, 1.5, 5, "exact", api_name="/keep_editing")
    assert [x["caption"] for x in history] == ["original", f"1. {instruction}", "2. remove the circle"]
    want2 = reference.edit(want, "remove the circle", num_inference_steps=STEPS, guidance_scale=3.0,
                           image_guidance_scale=1.5, seed=5, progress=False)[0]
    assert_close(result2, want2)

    result3, history, _ = c.predict(api_name="/undo_edit")
    assert len(history) == 2
    assert np.array_equal(image_at(result3), image_at(result))


def test_refiner_endpoints_return_plots(client, reference):
    prompt = "a red circle to the left of a blue square"
    tokens, attention, gates, movement, word = client.predict(prompt, api_name="/refiner_report")
    report = app.insight.refiner_report(reference, prompt)
    words = app.refiner_words(report)
    assert [t["token"] for t in tokens] == [w for w, _ in words]
    assert "".join(w for w, _ in words).replace(" ", "") == prompt.replace(" ", "")
    for plot in (attention, gates, movement):
        assert plot_png(plot).size[0] > 100
    assert word["value"] == ",".join(map(str, words[-1][1]))
    heat = client.predict(prompt, ",".join(map(str, words[2][1])), STEPS, 2, 1, api_name="/word_attention")
    assert plot_png(heat).size[0] > 100
    with pytest.raises(AppError, match="word must be a token position"):
        client.predict(prompt, "red", STEPS, 2, 1, api_name="/word_attention")


def test_eight_concurrent_requests_from_separate_sessions(server, client, reference, shapes):
    seeds = [11, 12, 13, 14]
    jobs = [client.submit("a blue square", 64, 64, STEPS, 3.0, s, 1, "exact", api_name="/text_to_image")
            for s in seeds]
    chats = {}
    for name, question in (("vqa", "What color is the triangle?"), ("other", "How many squares are there?")):
        message = {"text": question, "files": [handle_file(shapes[name])]}
        chats[name] = (question, new_client(server).submit(message, 8, api_name="/chat"))
    instructions = ("make the circle blue", "add a red square")
    edits = [new_client(server).submit(handle_file(shapes["edit"]), text, STEPS, 3.0, 1.5, 3, "exact",
                                       api_name="/edit") for text in instructions]
    for s, job in zip(seeds, jobs):
        (item,) = job.result(timeout=180)
        want = reference.text_to_image("a blue square", height=64, width=64, num_inference_steps=STEPS,
                                       guidance_scale=3.0, seed=s, progress=False)[0]
        assert_close(item["image"], want)
    for name, (question, job) in chats.items():
        chat, _ = job.result(timeout=180)
        assert user_texts(chat) == [question]  # no turn from the other session
        assert last_answer(chat) == shown_answer(reference.answer(question, [shapes[name]], max_new_tokens=8))
    for text, job in zip(instructions, edits):
        _, history, _ = job.result(timeout=180)
        assert [x["caption"] for x in history] == ["original", f"1. {text}"]
    assert server.alive()


def test_a_broken_upload_gives_a_readable_error_and_the_server_keeps_serving(server, shapes):
    """Through gradio_client as a user's script would call it; every other refusal is checked below, raw."""
    c = new_client(server)
    with pytest.raises(AppError) as err:
        c.predict(handle_file(shapes["broken"]), "make the circle blue", STEPS, 3.0, 1.5, 1, "exact",
                  api_name="/edit")
    message = str(err.value)
    assert "'broken.png' is not a readable image" in message
    assert "Traceback" not in message and "/tmp/" not in message
    (item,) = c.predict("a red circle", 64, 64, 1, 3.0, 1, 1, "exact", api_name="/text_to_image")
    assert Image.open(item["image"]).size == (64, 64)
    assert server.alive()


# ---- hostile input (issue #32): every class through gradio_client and raw HTTP --------------------------
LONG = "a green triangle " * 80  # 1,360 characters, ~246 tokens: far past every prompt bound here


def raw(server, api: str, data: list) -> str:
    """A hand-written client's call (NaN and lone surrogates allowed in the JSON): 'complete: ...' or
    'error: ...' with the payload the server streamed back."""
    kind, payload = raw_call(server.url, api, data)
    return f"{kind}: {payload}"


def refused(message: str, needle: str) -> None:
    assert message.startswith("error") or "AppError" in message, message
    assert needle in message, message
    assert '"error": null' not in message and "internal error" not in message, message


def app_error(call) -> str:
    with pytest.raises(AppError) as err:
        call()
    return f"AppError: {err.value}"


def test_long_prompts_are_refused_on_every_endpoint_with_the_bound_named(client):
    refused(app_error(lambda: client.predict(LONG, api_name="/refiner_report")), "at most 256 are accepted")
    # Short words, many tokens: the refiner tab's bound is in tokens (its attention plot grows with them).
    refused(app_error(lambda: client.predict("red " * 40, api_name="/refiner_report")),
            "tokens long; at most 32 tokens")
    refused(app_error(lambda: client.predict(LONG, 0, STEPS, 1, 1, api_name="/word_attention")), "at most 256")
    refused(app_error(lambda: client.predict(LONG, 64, 64, STEPS, 3.0, 1, 1, "exact", api_name="/text_to_image")),
            "prompt is 1,359 characters long; at most 1,024")
    refused(app_error(lambda: client.predict({"text": LONG, "files": []}, 8, api_name="/chat")),
            "question is 1,359 characters long")
    refused(app_error(lambda: client.predict(LONG, STEPS, 3.0, 1.5, 1, "exact", api_name="/keep_editing")),
            "instruction is 1,359 characters long")


def test_too_many_files_and_huge_images_are_refused_from_their_header(server):
    small = one_colour_png(64, 64)
    files = [upload(server.url, f"s{k}.png", small) for k in range(app.MAX_FILES + 1)]
    refused(raw(server, "chat", [{"text": "What is this?", "files": files}, 8]),
            f"5 images attached; at most {app.MAX_FILES}")
    big = one_colour_png(8000, 8000)  # 76 KB, 64 megapixels
    refused(raw(server, "chat", [{"text": "What is this?", "files": [upload(server.url, "big.png", big)]}, 8]),
            "'big.png' is 8000x8000 = 64,000,000 pixels; images may have at most 24,000,000")
    refused(raw(server, "edit", [upload(server.url, "big.png", big), "make it red", STEPS, 3.0, 1.5, 1, "exact"]),
            "8000x8000")
    # A header with no pixel data behind it: only a header check can refuse it by its size.
    bomb = upload(server.url, "bomb.png", png_header_only(30000, 30000))
    refused(raw(server, "chat", [{"text": "What is this?", "files": [bomb]}, 8]), "'bomb.png' is too large")


def test_images_sent_inline_through_the_api(server, reference):
    settings = ["make it red", STEPS, 3.0, 1.5, 1, "exact"]
    meta = {"meta": {"_type": "gradio.FileData"}}
    refused(raw(server, "edit", [{"url": data_url(png_header_only(13000, 13000)), **meta}, *settings]),
            "the image sent inline (data: URL or base64 text) is a suspected decompression bomb")
    refused(raw(server, "edit", [{"url": data_url(png_header_only(30000, 30000))}, *settings]), "decompression bomb")
    refused(raw(server, "edit", [{"url": data_url(b"not an image"), **meta}, *settings]), "not a readable image")
    refused(raw(server, "edit", [{"url": "data:image/png;base64,@@@@", **meta}, *settings]), "not valid base64")
    refused(raw(server, "edit", [base64.b64encode(b"hello").decode(), *settings]), "not a readable image")
    refused(raw(server, "edit", [12, *settings]), "must be an uploaded file, a data: URL or base64 text")
    # A valid image as bare base64 is edited like an upload.
    png = io.BytesIO()
    ShapesWorld(split="heldout").edit(0, "recolor").source.save(png, format="PNG")
    kind, payload = raw_call(server.url, "edit", [base64.b64encode(png.getvalue()).decode(), *settings])
    assert kind == "complete", payload
    assert Image.open(json.loads(payload)[0]["path"]).size == (64, 64)


NAN = float("nan")
T2I = ["a red circle", 64, 64, STEPS, 3.0, 1, 1, "exact"]


def with_value(args: list, k: int, value) -> list:
    return [*args[:k], value, *args[k + 1:]]


@pytest.mark.parametrize("api, data, needle", [
    ("text_to_image", with_value(T2I, 5, "abc"), "seed must be a number, got 'abc'"),
    ("text_to_image", with_value(T2I, 5, NAN), "seed must be a finite number"),
    ("text_to_image", with_value(T2I, 1, NAN), "height must be a finite number"),
    ("text_to_image", with_value(T2I, 3, NAN), "steps must be a finite number"),
    ("text_to_image", with_value(T2I, 6, NAN), "images must be a finite number"),
    ("text_to_image", with_value(T2I, 3, 2.5), "steps must be a whole number"),
    ("text_to_image", with_value(T2I, 1, 256), "height must be between 32 and 128, got 256"),
    ("text_to_image", with_value(T2I, 0, None), "prompt must be text, got nothing"),
    ("text_to_image", with_value(T2I, 0, "a red \ud800"), "prompt contains '\\\\ud800' at position 6"),
    ("chat", [{"text": "What color?", "files": []}, NAN], "max new tokens must be a finite number"),
    ("chat", [{"text": "\ud800", "files": []}, 8], "question contains"),
    ("refiner_report", [None], "prompt must be text"),
    ("keep_editing", [None, STEPS, 3.0, 1.5, 1, "exact"], "instruction must be text"),
    ("keep_editing", ["make it red", STEPS, 3.0, 1.5, NAN, "exact"], "seed must be a finite number"),
])
def test_bad_values_name_their_field(server, api, data, needle):
    refused(raw(server, api, data), needle)


def test_user_errors_print_no_traceback_in_the_server_log(server):
    start = len(server.log.read_text(errors="replace"))
    refused(raw(server, "text_to_image", with_value(T2I, 5, "abc")), "seed")
    refused(raw(server, "chat", [{"text": "What color is the triangle?", "files": []}, 8]), "attach one")
    refused(raw(server, "keep_editing", ["make it red", STEPS, 3.0, 1.5, 1, "exact"]), "nothing to keep editing")
    time.sleep(1)
    assert "Traceback" not in server.log.read_text(errors="replace")[start:]


def test_a_refused_message_keeps_the_chat(server, reference, shapes):
    """A question without an image is refused; a bad upload leaves the earlier turns and images in place."""
    c = new_client(server)
    with pytest.raises(AppError, match="only answers questions about images: attach one"):
        c.predict({"text": "What color is the triangle?", "files": []}, 8, api_name="/chat")
    first = "What color is the triangle?"
    c.predict({"text": first, "files": [handle_file(shapes["vqa"])]}, 8, api_name="/chat")
    with pytest.raises(AppError, match=r"'broken\.png' is not a readable image"):
        c.predict({"text": "And this one?", "files": [handle_file(shapes["broken"])]}, 8, api_name="/chat")
    chat, _ = c.predict({"text": "How many objects are there?", "files": []}, 8, api_name="/chat")
    assert user_texts(chat) == [first, "How many objects are there?"]  # the refused turn left no trace
    want = reference.answer("How many objects are there?", [shapes["vqa"]], max_new_tokens=8,
                            history=[(first, reference.answer(first, [shapes["vqa"]], max_new_tokens=8))])
    assert last_answer(chat) == shown_answer(want)


def test_an_edit_error_keeps_the_result_and_history_and_a_large_input_says_why_it_shrank(server, tmp_path):
    c = new_client(server)
    photo = tmp_path / "photo.png"
    photo.write_bytes(one_colour_png(4000, 3000))
    result, history, note = c.predict(handle_file(photo), "make it red", STEPS, 3.0, 1.5, 1, "exact",
                                      api_name="/edit")
    assert Image.open(result).size == (64, 48)
    assert note.startswith("Result 64x48: the 4000x3000 input was scaled down") and "4,096 pixels" in note
    with pytest.raises(AppError, match="instruction is empty"):
        c.predict("  ", STEPS, 3.0, 1.5, 1, "exact", api_name="/keep_editing")
    _, history, _ = c.predict("add a red square", STEPS, 3.0, 1.5, 1, "exact", api_name="/keep_editing")
    assert [x["caption"] for x in history] == ["original", "1. make it red", "2. add a red square"]


def test_the_page_says_what_the_model_can_do(client):
    texts = [c.get("props", {}).get("value") for c in client.config["components"]]
    note = next(t for t in texts if isinstance(t, str) and "What this model can do" in t)
    for figure in ("0.761", "0.822", "0.556", "0.306", "64x64", "chance"):
        assert figure in note


def test_uploads_and_examples_are_deleted_when_the_server_stops(tmp_path, monkeypatch):
    """SIGTERM closes the server like Ctrl-C, and Gradio's shutdown deletes what the app cached."""
    cache, temp = tmp_path / "gradio", tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    monkeypatch.setenv("TMPDIR", str(temp))
    own = start_app()
    try:
        paths = [upload(own.url, f"u{k}.png", one_colour_png(64, 64))["path"] for k in range(3)]
        assert all(Path(p).is_file() for p in paths)
        assert any(temp.glob("ovis_u1_examples_*"))
    finally:
        own.stop()
    assert own.proc.returncode is not None
    assert not [p for p in paths if Path(p).exists()]
    # Left: Gradio's copies of the example images, which it keeps by design (content-addressed, so the
    # same files at every start rather than one more set per start).
    examples = re.compile(r"(edit|vqa)_\w+\.png")
    assert [f.name for f in cache.rglob("*") if f.is_file() and not examples.fullmatch(f.name)] == []
    assert not any(temp.glob("ovis_u1_examples_*"))


# ---- no server needed --------------------------------------------------------------------------------
def test_size_presets_respect_the_model_bounds_and_say_their_true_shape(reference):
    g = reference.config.generation
    low, high = app.size_bounds(reference)
    assert (low, high) == (g.min_side, 2 * g.height)  # a shapes-world model: up to twice what it drew
    presets = app.size_presets(g, low, high)
    assert next(iter(presets.values())) == (g.height, g.width)
    assert {label.split(" ")[0].lstrip("≈") for label in presets} == {"1:1", "4:3", "3:4", "16:9", "9:16"}
    for label, (h, w) in presets.items():
        assert h % g.size_multiple == 0 and w % g.size_multiple == 0
        assert low <= min(h, w) and max(h, w) <= high
        ratio, size = label.lstrip("≈").split(" · ")
        a, b = map(int, ratio.split(":"))
        assert size == f"{w}x{h}"
        if label.startswith("≈"):
            assert abs(math.log((w / h) / (a / b))) <= 0.05
        else:
            assert w * b == h * a
    assert app.preset_for(presets, g.height, g.width) == next(iter(presets))
    assert app.preset_for(presets, g.height + g.size_multiple, g.width) == app.CUSTOM_SIZE


def test_the_published_models_bounds_follow_its_config():
    from ovis_u1.config import PRESETS
    published = types.SimpleNamespace(config=PRESETS["ovis-u1-3b"]())
    assert app.prompt_token_limit(published) == 1024  # half its 2,048-token context
    g = published.config.generation
    assert app.size_bounds(published) == (g.min_side, g.max_side)
    presets = app.size_presets(g, g.min_side, g.max_side)
    assert len(presets) == 5 and next(iter(presets.values())) == (g.height, g.width)


def test_checks_name_the_field_and_what_is_allowed(tiny_tokenizer):
    assert app.check_number("seed", "12", 0, 100, whole=True) == 12
    for value, needle in [("abc", "seed must be a number, got 'abc'"), (None, "got nothing"), (True, "number"),
                          (math.nan, "finite"), (math.inf, "finite"), (1.5, "whole number"),
                          (101, "between 0 and 100, got 101")]:
        with pytest.raises(gr.Error, match=re.escape(needle)):
            app.check_number("seed", value, 0, 100, whole=True)
    assert app.check_text("prompt", "  a red circle ", tiny_tokenizer, 16) == "a red circle"
    for value, needle in [(None, "prompt must be text, got nothing"), (3, "got int"), ("  ", "empty"),
                          ("ok \ud800", "at position 3, which is not a valid Unicode character"),
                          ("x" * 200, "200 characters long"),
                          ("red " * 20, "tokens long; at most 16")]:
        with pytest.raises(gr.Error, match=re.escape(needle)):
            app.check_text("prompt", value, tiny_tokenizer, 16)
    assert app.parse_size("10mb") == 10 * 2**20 and app.parse_size("512kb") == 512 * 1024
    with pytest.raises(ValueError, match="--max-file-size"):
        app.parse_size("ten")


def test_images_are_refused_by_their_header_before_any_decoding(tmp_path):
    # These files hold a header and no pixels: refusing them by size is the header check's work alone.
    for side, needle in [(6000, "is 6000x6000 = 36,000,000 pixels"), (30000, "is too large")]:
        path = tmp_path / f"h{side}.png"
        path.write_bytes(png_header_only(side, side))
        with pytest.raises(gr.Error, match=re.escape(f"image 'h{side}.png' {needle}")):
            app.load_upload(str(path))
    with pytest.raises(gr.Error, match="sent inline is not valid base64"):
        app.data_url_bytes("data:image/png;base64,@@", 2**20)
    with pytest.raises(gr.Error, match="over the 1 MB upload limit"):
        app.data_url_bytes(data_url(os.urandom(2 * 2**20)), 2**20)


def test_a_size_the_model_never_drew_is_warned_about(reference):
    assert app.size_note(reference, 64, 64) == ""
    assert "learned to draw at 64x64 only" in app.size_note(reference, 128, 128)


def test_conversation_history_starts_at_the_last_upload_and_skips_unfinished_turns():
    turns = [{"q": "a?", "images": ["x.png"], "a": "1", "done": True},
             {"q": "b?", "images": ["y.png"], "a": "2", "done": True},
             {"q": "c?", "images": [], "a": "par", "done": False},  # stopped mid-stream
             {"q": "d?", "images": [], "a": "4", "done": True}]
    assert app.conversation_history(turns) == [("b?", "2"), ("d?", "4")]
    assert app.conversation_history([]) == []


def test_readable_turns_exceptions_into_messages():
    @app.readable
    def bad_input():
        raise ValueError("image file '/tmp/gradio/abc/cat.png' is not a readable image")

    @app.readable
    def bug():
        raise KeyError("internals")

    @app.readable
    def stream():
        yield 1
        raise ValueError("stopped early")

    with pytest.raises(gr.Error, match=r"image file 'cat\.png' is not a readable image"):
        bad_input()
    with pytest.raises(gr.Error, match=r"internal error \(KeyError\)"):
        bug()
    gen = stream()
    assert next(gen) == 1
    with pytest.raises(gr.Error, match="stopped early"):
        next(gen)


@pytest.mark.parametrize("argv, env, want", [
    ([], None, "shipped"),
    ([], "saved", "saved"),
    (["--checkpoint", "saved"], None, "saved"),
    (["--checkpoint", "some-org/some-model"], None, "hub/some-org--some-model"),
    (["--checkpoint", "offline-org/some-model"], None, "could not be fetched from the Hugging Face Hub"),
    (["--checkpoint", "no/such/dir"], None, "is neither an existing directory nor a hub id"),
])
def test_the_app_and_the_cli_load_the_same_checkpoint(monkeypatch, tmp_path, capsys, argv, env, want):
    """Both entry points load through `ovis_u1.checkpoint.load_model`: the default, $OVIS_U1_CHECKPOINT, a
    directory and a hub id (fetched) name the same checkpoint, and a bad one fails with the same message."""
    import huggingface_hub

    (tmp_path / "saved").mkdir()
    argv = [str(tmp_path / a) if a == "saved" else a for a in argv]
    monkeypatch.delenv(checkpoint.CHECKPOINT_ENV, raising=False)
    if env:
        monkeypatch.setenv(checkpoint.CHECKPOINT_ENV, str(tmp_path / env))

    def download(repo_id, **kwargs):
        if repo_id.startswith("offline-"):
            raise OSError("Name or service not known")
        folder = tmp_path / "hub" / repo_id.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    loaded = []

    def from_pretrained(cls, path=None, device="cpu", dtype=None):
        loaded.append((Path(path), torch.device(device), dtype))
        raise CheckpointError("recorded")  # the test needs the path only, not a model

    monkeypatch.setattr(OvisU1, "from_pretrained", classmethod(from_pretrained))
    with pytest.raises(SystemExit) as done:
        app.main([*argv, "--device", "cpu"])
    app_says = str(done.value).removeprefix("app.py: cannot load the model: ")
    code = cli(["answer", "--question", "Hi?", "--device", "cpu", *argv])
    cli_says = capsys.readouterr().err.strip().removeprefix("error: ")
    assert code == 2 and cli_says == " ".join(app_says.split())
    if want == "shipped":
        assert loaded == [(checkpoint.DEFAULT_MODEL_DIR, torch.device("cpu"), torch.float32)] * 2
    elif app_says == "recorded":
        assert loaded == [(tmp_path / want, torch.device("cpu"), torch.float32)] * 2
    else:
        assert loaded == [] and want in app_says



@pytest.mark.parametrize("device", ["bogus", "cpu:1", "cuda:abc"])
def test_a_bad_device_is_one_line_naming_what_is_allowed(device):
    with pytest.raises(SystemExit) as done:  # before any model is loaded
        app.main(["--device", device])
    assert str(done.value) == (f"app.py: cannot load the model: device {device!r} is not a device; "
                               "use cpu, cuda, cuda:N (N a GPU index) or mps")

def zero_gpu_stand_in(monkeypatch) -> list[str]:
    """A stand-in for ZeroGPU's `spaces` package: like the real one, each `@spaces.GPU` call's arguments and
    result cross a process boundary pickled, so anything the model is not in the process on the other side.
    Returns the names of the functions it wrapped."""
    wrapped = []

    def gpu(duration=60):
        def wrap(fn):
            wrapped.append(fn.__name__)

            @functools.wraps(fn)
            def call(*args, **kwargs):
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                return pickle.loads(pickle.dumps(fn(*args, **kwargs)))
            return call
        return wrap

    fake = types.ModuleType("spaces")
    fake.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", fake)
    return wrapped


def test_the_edit_chain_is_plain_data_and_a_failed_edit_changes_nothing(tiny_model, monkeypatch, tmp_path):
    """The Edit tab's state is `EditSession`'s history, which ZeroGPU can pickle (a session would carry the
    model), and the tab's three callbacks resume a session around it; a failed edit returns no new state."""
    import ovis_u1.generation

    zero_gpu_stand_in(monkeypatch)
    fns = {f.api_name: f.fn for f in app.build_ui(tiny_model, tmp_path / "examples").fns.values() if f.api_name}
    source = tmp_path / "source.png"
    one = Image.new("RGB", (48, 32), "green")
    one.save(source)
    settings = (1, 3.0, 1.5, 7, "exact")
    _, _, chain, _ = fns["edit"](str(source), "make it red", *settings)
    result2, gallery, chain2, note = fns["keep_editing"](chain, "add a square", *settings)
    assert [t for t, _ in chain2] == [None, "make it red", "add a square"] and len(chain) == 2
    assert [caption for _, caption in gallery] == ["original", "1. make it red", "2. add a square"]
    assert all(isinstance(im, Image.Image) for _, im in chain2) and note == "Result 48x32: step 2."
    want = ovis_u1.generation.EditSession(tiny_model, one, num_inference_steps=1, guidance_scale=3.0,
                                          image_guidance_scale=1.5, seed=7, progress=False)
    want.edit("make it red")
    assert np.array_equal(np.asarray(want.edit("add a square")), np.asarray(result2))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ovis_u1.generation, "edit", out_of_memory)
    with pytest.raises(gr.Error, match="out of memory"):
        fns["keep_editing"](chain2, "remove the square", *settings)
    assert [t for t, _ in chain2] == [None, "make it red", "add a square"]  # the state it was given, intact
    shown, gallery, chain3, _ = fns["undo_edit"](chain2)
    assert np.array_equal(np.asarray(shown), np.asarray(chain2[1][1])) and len(chain3) == len(gallery) == 2
    assert fns["undo_edit"](chain3[:1])[2] == chain3[:1]  # the original is never undone
    assert fns["undo_edit"]([])[:3] == (None, [], [])


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_space_front_matter():
    meta = front_matter(REPO / "spaces" / "README.md")
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == gr.__version__  # the Space runs the Gradio these tests run
    assert meta["app_file"] == "spaces/app.py" and (REPO / meta["app_file"]).is_file()
    assert meta["suggested_hardware"]
    text = (REPO / "spaces" / "requirements.txt").read_text()
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    assert any(re.match(r"torch\b", line) for line in lines)
    assert not any(re.match(r"gradio\s*([=<>~!]|$)", line) for line in lines)  # sdk_version installs it


def test_space_entry_point_builds_the_ui_without_a_gpu(tiny_model, monkeypatch):
    wrapped = zero_gpu_stand_in(monkeypatch)  # the Space must wrap its GPU work in spaces.GPU
    spec = importlib.util.spec_from_file_location("ovis_u1_space_app", REPO / "spaces" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing loads nothing
    assert module.MODEL_ID == os.environ.get(module.MODEL_ENV, "AIDC-AI/Ovis-U1-3B")
    demo = module.create_demo(model=tiny_model)
    assert isinstance(demo, gr.Blocks)
    assert {"chat", "create", "edit_new", "edit_more", "analyse", "word_attention"} <= set(wrapped)
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {e.lstrip("/") for e in ENDPOINTS} <= names
