"""The command line, run in-process through `main(argv)` on a random tiny model.

What is the CLI's own: flags reach the package call, images land in files named by seed, answers on stdout,
every mistake one line on stderr with exit code 2, and a checkpoint named as the app names it. What the
images and answers are is the package's to test (test_generation.py, test_chat.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

import ovis_u1.checkpoint
from ovis_u1.__main__ import main

TINY = ["--preset", "tiny", "--device", "cpu", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def calls(monkeypatch):
    """What each model method the CLI called was given, the call itself running as usual: the flags'
    effect on images is the package's to test (test_generation.py, test_chat.py), their plumbing the CLI's."""
    from ovis_u1 import OvisU1
    seen = {}

    def spy(name):
        real = getattr(OvisU1, name)

        def call(self, *args, **kwargs):
            seen[name] = (args, kwargs)
            return real(self, *args, **kwargs)
        return call

    for name in ("text_to_image", "edit"):
        monkeypatch.setattr(OvisU1, name, spy(name))
    return seen


def test_generate(tmp_path, capsys, calls):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "a red circle", "--prompt", "a blue square",
                         "--steps", "1", "--seed", "3", "--height", "48", "--guidance", "2.5", "--num-images",
                         "2", "--mode", "fast", "--out", str(tmp_path))
    assert code == 0, err
    args, kwargs = calls["text_to_image"]
    assert args == (["a red circle", "a blue square"],)
    assert kwargs == dict(height=48, width=None, num_inference_steps=1, guidance_scale=2.5, seed=3,
                          num_images_per_prompt=2, mode="fast", progress=False)
    paths = [Path(p) for p in out.split()]  # image k of the call has seed 3 + k
    assert [p.name for p in paths] == [f"generate-seed{s}.png" for s in (3, 4, 5, 6)]
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (64, 48) and im.mode == "RGB"


def test_edit(tmp_path, capsys, calls):
    src = tmp_path / "in.png"
    random_image(40, 72).save(src)
    code, out, err = run(capsys, "edit", *TINY, "--image", str(src), "--instruction", "make it red",
                         "--steps", "1", "--image-guidance", "1.2", "--out", str(tmp_path / "out"))
    assert code == 0, err
    (image, instructions), kwargs = calls["edit"]
    assert image.size == (72, 40) and instructions == ["make it red"]
    assert kwargs == dict(num_inference_steps=1, guidance_scale=None, image_guidance_scale=1.2, seed=42,
                          num_images_per_prompt=1, mode="exact", progress=False)
    (path,) = out.split()
    assert Path(path).name == "edit-seed42.png"
    with Image.open(path) as im:
        assert im.mode == "RGB"


def test_answer_plain_and_streamed(tmp_path, capsys):
    src = tmp_path / "in.png"
    random_image(40, 40).save(src)
    code, out, err = run(capsys, "answer", *TINY, "--question", "What is in the image?", "--image", str(src),
                         "--max-new-tokens", "6")
    assert code == 0, err
    code, streamed, _ = run(capsys, "answer", *TINY, "--question", "What is in the image?",
                            "--image", str(src), "--max-new-tokens", "6", "--stream")
    assert code == 0
    assert streamed == out and out.endswith("\n")
    code, _, _ = run(capsys, "answer", *TINY, "--question", "Hello?", "--max-new-tokens", "2")
    assert code == 0


def test_answer_conversation_and_chat(tmp_path, capsys, monkeypatch):
    import io

    from ovis_u1.checkpoint import load_model
    from ovis_u1.shapes import random_scene
    src = tmp_path / "scene.png"
    random_scene(np.random.default_rng(3)).render().save(src)
    # The shipped model, so the answers are words (a random tiny model's can be empty, which would let a
    # CLI that drops the history pass): the second answer must come from the two-turn conversation.
    model = load_model(device="cpu")  # what the CLI loads without --checkpoint
    image = Image.open(src).convert("RGB")
    first = model.answer("How many objects are there?", images=[image])
    second = model.answer("What color is the largest object?", images=[image],
                          history=[("How many objects are there?", first)])
    assert first and second
    base = ["answer", "--device", "cpu", "--image", str(src)]
    questions = ["--question", "How many objects are there?", "--question", "What color is the largest object?"]
    code, out, err = run(capsys, *base, *questions)
    assert code == 0, err
    assert out == f"{first}\n{second}\n"
    # --chat reads the same turns from stdin (blank lines skipped, no prompt when stdin is not a terminal).
    monkeypatch.setattr("sys.stdin", io.StringIO("How many objects are there?\n\nWhat color is the largest object?\n"))
    code, chatted, err = run(capsys, *base, "--chat")
    assert code == 0, err
    assert chatted == out and err == ""
    code, _, err = run(capsys, *base)
    assert code == 2
    assert_one_line_error(err, "--question", "--chat")


@pytest.mark.parametrize("command", ["edit", "answer"])
def test_corrupt_image_is_a_one_line_error(tmp_path, capsys, command):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    args = ["--instruction", "make it red"] if command == "edit" else ["--question", "What is this?"]
    code, out, err = run(capsys, command, *TINY, "--image", str(bad), *args)
    assert code == 2 and out == ""
    assert_one_line_error(err, "broken.png")


def test_missing_image_file(tmp_path, capsys):
    code, _, err = run(capsys, "edit", *TINY, "--image", str(tmp_path / "nope.png"), "--instruction", "x")
    assert code == 2
    assert_one_line_error(err, "does not exist")


def test_a_hub_id_is_fetched_and_loaded(tmp_path, capsys, monkeypatch):
    """`--checkpoint org/name` goes through the loader the app uses (which test_app.py checks resolves every
    spec as the CLI does); here the whole command runs on what the fetch returned."""
    import huggingface_hub
    asked = []

    def download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(ovis_u1.checkpoint.DEFAULT_MODEL_DIR)  # stands in for the hub cache's copy

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    code, out, err = run(capsys, "generate", "--checkpoint", "some-org/shapes-model", "--device", "cpu", "--quiet",
                         "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path))
    assert code == 0, err
    assert asked == ["some-org/shapes-model"]
    with Image.open(out.strip()) as im:
        assert im.size == (64, 64)  # the shipped shapes model's size, so its config was the one loaded

    def offline(repo_id, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, out, err = run(capsys, "generate", "--checkpoint", "some-org/shapes-model", "--device", "cpu",
                         "--prompt", "a cat")
    assert code == 2 and out == ""
    assert_one_line_error(err, "'some-org/shapes-model' is not a local directory and could not be fetched",
                          "Name or service not known", "--checkpoint DIR")


def test_missing_checkpoints(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "generate", "--checkpoint", str(tmp_path / "nowhere"), "--device", "cpu",
                       "--prompt", "a cat")
    assert code == 2
    assert_one_line_error(err, "nowhere' is neither an existing directory nor a hub id")
    # No --checkpoint: the shipped default model, here made to be missing.
    monkeypatch.delenv(ovis_u1.checkpoint.CHECKPOINT_ENV, raising=False)
    monkeypatch.setattr(ovis_u1.checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    code, _, err = run(capsys, "answer", "--device", "cpu", "--question", "Hi?")
    assert code == 2
    assert_one_line_error(err, "default model is missing")


@pytest.mark.parametrize("argv, words", [
    (["generate", *TINY, "--prompt", "a cat", "--steps", "0"], ["num_inference_steps"]),
    (["generate", *TINY, "--prompt", "a cat", "--guidance", "nan"], ["guidance_scale"]),
    (["generate", *TINY, "--prompt", "  "], ["prompt"]),
    (["generate", *TINY, "--prompt", "a cat", "--height", "9999"], ["height"]),
    (["generate", *TINY, "--prompt", "a cat", "--mode", "turbo"], ["--mode"]),
    (["generate", *TINY, "--prompt", "a cat", "--steps", "many"], ["--steps"]),
    (["generate", *TINY], ["--prompt"]),
    (["answer", *TINY, "--question", "Hi?", "--max-new-tokens", "-1"], ["max_new_tokens"]),
    (["generate", "--preset", "tiny", "--checkpoint", "x", "--prompt", "a cat"], ["not both"]),
    (["paint", "--prompt", "a cat"], ["paint"]),
    ([], ["command"]),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, words):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, *words)


def test_help(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0 and "--prompt" in out


# ---- hostile input (issue 32's battery): each a one-line error that names the problem ---------------------
NOT_UTF8 = b"a \xff\xfe cat".decode("utf-8", "surrogateescape")  # how Python hands over undecodable argv bytes


@pytest.mark.parametrize("argv, words", [
    (["generate", *TINY, "--prompt", NOT_UTF8], ["--prompt", "not UTF-8"]),
    (["generate", *TINY, "--prompt", "ok", "--prompt", NOT_UTF8], ["--prompt #2", "not UTF-8"]),
    (["answer", *TINY, "--question", NOT_UTF8], ["--question", "not UTF-8"]),
    (["edit", *TINY, "--image", "x.png", "--instruction", NOT_UTF8], ["--instruction", "not UTF-8"]),
    (["generate", "--preset", "tiny", "--device", "bogus", "--prompt", "a cat"], ["--device 'bogus'", "cuda:N"]),
    (["generate", "--preset", "tiny", "--device", "cuda:abc", "--prompt", "a cat"], ["--device 'cuda:abc'"]),
    (["generate", "--preset", "tiny", "--device", "cpu:1", "--prompt", "a cat"], ["--device 'cpu:1'"]),
    (["generate", *TINY, "--prompt", "a cat", "--seed", str(2**70)], ["--seed", str(2**70)]),
    (["generate", *TINY, "--prompt", "a cat", "--seed", "-1"], ["--seed", "-1"]),
    (["edit", *TINY, "--image", "/proc/self/mem", "--instruction", "x"], ["/proc/self/mem"]),
    (["answer", *TINY, "--image", "/dev/zero", "--question", "x"], ["/dev/zero", "not a regular file"]),
])
def test_hostile_arguments_are_one_line_errors(capsys, argv, words):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_one_line_error(err, *words)


def test_cuda_device_that_is_not_there(capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run(capsys, "generate", "--preset", "tiny", "--device", "cuda:3", "--prompt", "a cat")
    assert code == 2
    assert_one_line_error(err, "cuda:3", "1 CUDA device")


def test_image_without_read_permission(tmp_path, capsys, monkeypatch):
    import os
    path = tmp_path / "locked.png"
    random_image(32, 32).save(path)
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for a user
        def denied(self):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "read_bytes", denied)
    code, _, err = run(capsys, "answer", *TINY, "--image", str(path), "--question", "What is this?")
    assert code == 2
    assert_one_line_error(err, "locked.png", "Permission denied")


def test_chat_stdin_that_is_not_utf8(tmp_path, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"How many?\n\xff\xfe oops\n")))
    code, out, err = run(capsys, "answer", *TINY, "--chat", "--max-new-tokens", "2")
    assert code == 2
    assert out.count("\n") == 1  # the first line was answered before the bad one
    assert_one_line_error(err, "stdin line 2", "not UTF-8")
