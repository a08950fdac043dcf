"""The web demo end to end: `python app.py` in a subprocess, driven with gradio_client.

Every named endpoint is called and its output compared with the package called directly on the same
model; concurrent sessions must not mix; bad input must come back as a readable message while the server
keeps serving. Plus the parts that need no server: checkpoint resolution, size presets, error conversion,
and the hosted-Space entry point built around a tiny injected model.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
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
from ovis_u1.checkpoint import CheckpointError
from ovis_u1.inference import edit_size
from ovis_u1.shapes import ShapesWorld
from tests._app_server import REPO, shared_app

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
    return app.load_model(os.environ.get(app.CHECKPOINT_ENV), device="cpu", dtype=torch.float32)


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
    result, history = c.predict(handle_file(shapes["edit"]), instruction, STEPS, 3.0, 1.5, 5, "exact",
                                api_name="/edit")
    h, w = edit_size(reference, source)
    assert Image.open(result).size == (w, h)
    want = reference.edit(source, instruction, num_inference_steps=STEPS, guidance_scale=3.0,
                          image_guidance_scale=1.5, seed=5, progress=False)[0]
    assert_close(result, want)
    assert [x["caption"] for x in history] == ["original", f"1. {instruction}"]

    result2, history = c.predict("remove the circle", STEPS, 3.0, 1.5, 5, "exact", api_name="/keep_editing")
    assert [x["caption"] for x in history] == ["original", f"1. {instruction}", "2. remove the circle"]
    want2 = reference.edit(want, "remove the circle", num_inference_steps=STEPS, guidance_scale=3.0,
                           image_guidance_scale=1.5, seed=5, progress=False)[0]
    assert_close(result2, want2)

    result3, history = c.predict(api_name="/undo_edit")
    assert len(history) == 2
    assert np.array_equal(image_at(result3), image_at(result))


def test_refiner_endpoints_return_plots(client, reference):
    prompt = "a red circle to the left of a blue square"
    tokens, attention, gates, movement, word = client.predict(prompt, api_name="/refiner_report")
    report = app.insight.refiner_report(reference, prompt)
    assert [t["token"] for t in tokens] == [report.tokens[i] for i in report.prompt_indices]
    for plot in (attention, gates, movement):
        assert plot_png(plot).size[0] > 100
    assert word["value"] == report.prompt_indices[-1]
    heat = client.predict(prompt, report.prompt_indices[2], STEPS, 2, 1, api_name="/word_attention")
    assert plot_png(heat).size[0] > 100


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
        _, history = job.result(timeout=180)
        assert [x["caption"] for x in history] == ["original", f"1. {text}"]
    assert server.alive()


@pytest.mark.parametrize("call, needle", [
    (lambda c, f: c.predict(handle_file(f["broken"]), "make the circle blue", STEPS, 3.0, 1.5, 1, "exact",
                            api_name="/edit"), "'broken.png' is not a readable image"),
    (lambda c, f: c.predict({"text": "What is this?", "files": [handle_file(f["broken"])]}, 8,
                            api_name="/chat"), "'broken.png' is not a readable image"),
    (lambda c, f: c.predict("a red circle", 100000, 64, STEPS, 3.0, 1, 1, "exact", api_name="/text_to_image"),
     "100000"),
    (lambda c, f: c.predict("   ", 64, 64, STEPS, 3.0, 1, 1, "exact", api_name="/text_to_image"),
     "non-empty"),
    (lambda c, f: c.predict("make it red", STEPS, 3.0, 1.5, 1, "exact", api_name="/keep_editing"),
     "nothing to keep editing"),
])
def test_bad_input_gives_a_readable_error_and_the_server_keeps_serving(server, shapes, call, needle):
    c = new_client(server)
    with pytest.raises(AppError) as err:
        call(c, shapes)
    message = str(err.value)
    assert needle in message
    assert "Traceback" not in message and "/tmp/" not in message
    (item,) = c.predict("a red circle", 64, 64, 1, 3.0, 1, 1, "exact", api_name="/text_to_image")
    assert Image.open(item["image"]).size == (64, 64)
    assert server.alive()


# ---- no server needed --------------------------------------------------------------------------------
def test_size_presets_respect_the_model_bounds(reference):
    g = reference.config.generation
    presets = app.size_presets(g)
    assert next(iter(presets.values())) == (g.height, g.width)
    for h, w in presets.values():
        assert h % g.size_multiple == 0 and w % g.size_multiple == 0
        assert g.min_side <= min(h, w) and max(h, w) <= g.max_side


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


def test_an_unreachable_hub_id_fails_with_a_clear_message(monkeypatch, capsys):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub"):
        app.resolve_checkpoint("some-org/some-model")
    with pytest.raises(CheckpointError, match="neither an existing directory nor a hub id"):
        app.resolve_checkpoint("no/such/dir")
    with pytest.raises(SystemExit) as done:
        app.main(["--checkpoint", "some-org/some-model"])
    assert "cannot load the model" in str(done.value) and "--checkpoint DIR" in str(done.value)


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
    # A stand-in for ZeroGPU's package: the Space must wrap its GPU work in spaces.GPU.
    wrapped = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration=60: (lambda fn: wrapped.append(fn.__name__) or fn)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    spec = importlib.util.spec_from_file_location("ovis_u1_space_app", REPO / "spaces" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing loads nothing
    assert module.MODEL_ID == os.environ.get(module.MODEL_ENV, "AIDC-AI/Ovis-U1-3B")
    demo = module.create_demo(model=tiny_model)
    assert isinstance(demo, gr.Blocks)
    assert {"chat", "create", "edit_new", "edit_more", "analyse", "word_attention"} <= set(wrapped)
    names = {d.api_name for d in demo.fns.values() if d.api_name}
    assert {e.lstrip("/") for e in ENDPOINTS} <= names
