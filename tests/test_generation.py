"""Text-to-image and editing (ovis_u1/generation.py) on the tiny model: sampling modes, batching, seeds and
initial noise, the fast mode, callbacks, argument checks, output sizes, EditSession, image sources."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from ovis_u1.generation import EditSession, ImageInputError
from ovis_u1.images import smart_resize

SIDE = 32  # 32 x 32 images -> 16 x 16 latents -> 64 decoder tokens in tiny
FAST = {"height": SIDE, "width": SIDE, "num_inference_steps": 2, "progress": False, "output_type": "latent"}
EDIT = {"num_inference_steps": 2, "progress": False, "output_type": "latent"}


def close(a, b, atol=1e-4):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.fixture
def count_calls():
    """count_calls(module) -> list of (rows, kwargs) of its calls, recorded until the test ends."""
    handles = []

    def count(module):
        calls = []
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append((args[0].shape[0], kwargs)), with_kwargs=True))
        return calls

    yield count
    for h in handles:
        h.remove()


# ---- exact vs plain, batching, seeds ------------------------------------------------------------------
def test_t2i_exact_equals_plain(tiny_model):
    prompts = ["a red circle", "two small blue squares to the left of a star"]
    kw = {**FAST, "num_inference_steps": 3, "num_images_per_prompt": 2, "seed": 7}
    exact = tiny_model.text_to_image(prompts, mode="exact", **kw)
    plain = tiny_model.text_to_image(prompts, mode="plain", **kw)
    assert exact.shape == (4, 64, 16) and exact.dtype == torch.float32
    assert (exact - plain).abs().max() < 1e-4
    assert not torch.allclose(exact[0], exact[1])  # different seeds within the call
    assert not torch.allclose(exact[0], exact[2])  # different prompts


def test_edit_exact_equals_plain(tiny_model, photo):
    kw = {**EDIT, "num_images_per_prompt": 2, "seed": 3}
    instructions = ["make it red", "add a small star"]
    exact = tiny_model.edit(photo, instructions, mode="exact", **kw)
    plain = tiny_model.edit(photo, instructions, mode="plain", **kw)
    assert exact.shape[0] == 4
    assert (exact - plain).abs().max() < 1e-4


def test_t2i_batched_equals_unbatched(tiny_model):
    prompts = ["a red circle", "a long prompt about a green triangle above a small yellow dot"]
    batched = tiny_model.text_to_image(prompts, num_images_per_prompt=2, seed=10, **FAST)
    for k in range(4):  # image k of the call (prompt-major) uses seed + k
        alone = tiny_model.text_to_image(prompts[k // 2], seed=10 + k, **FAST)
        close(batched[k:k + 1], alone)


def test_edit_batched_equals_unbatched(tiny_model, photo):
    batched = tiny_model.edit(photo, ["make it red", "make it blue"], seed=5, **EDIT)
    close(batched[0:1], tiny_model.edit(photo, "make it red", seed=5, **EDIT))
    close(batched[1:2], tiny_model.edit(photo, "make it blue", seed=6, **EDIT))


def test_seeds(tiny_model, photo):
    a = tiny_model.text_to_image("a red circle", seed=1, **FAST)
    assert torch.equal(a, tiny_model.text_to_image("a red circle", seed=1, **FAST))
    assert not torch.allclose(a, tiny_model.text_to_image("a red circle", seed=2, **FAST), atol=1e-3)
    e = tiny_model.edit(photo, "make it red", seed=1, **EDIT)
    assert torch.equal(e, tiny_model.edit(photo, "make it red", seed=1, **EDIT))
    assert not torch.allclose(e, tiny_model.edit(photo, "make it red", seed=2, **EDIT), atol=1e-3)
    # The global RNG plays no part: sampling depends on the seed argument alone.
    torch.manual_seed(123)
    assert torch.equal(a, tiny_model.text_to_image("a red circle", seed=1, **FAST))


def test_pil_output(tiny_model):
    images = tiny_model.text_to_image("a red circle", height=32, width=48, num_inference_steps=1,
                                      progress=False, num_images_per_prompt=2)
    assert len(images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (48, 32) and im.mode == "RGB" for im in images)


# ---- fast mode ----------------------------------------------------------------------------------------
def test_one_prompt_forwards_need_no_attention_mask(tiny_model, photo, count_calls):
    """Branches of different text lengths or reference views get their own forward (`branch_groups`):
    any mask keeps CUDA attention off its flash kernel. Two prompts still share each forward."""
    calls = count_calls(tiny_model.decoder)
    tiny_model.text_to_image("a red circle", mode="exact", **FAST)
    tiny_model.edit(photo, "make it red", mode="exact", **EDIT)
    assert calls and all(kw.get("txt_mask") is None and kw.get("ref_mask") is None for _, kw in calls)
    assert sorted({r for r, _ in calls}) == [1]  # one row per forward: cond, uncond (and no-reference)
    calls.clear()
    tiny_model.text_to_image(["a red circle", "a blue square"], mode="exact", **FAST)
    assert {r for r, _ in calls} == {2}


def test_fast_mode_fewer_decoder_evaluations(tiny_model, count_calls):
    calls = count_calls(tiny_model.decoder.double_blocks[0])  # every decoder evaluation runs it, cached or not
    kw = {k: v for k, v in FAST.items() if k != "num_inference_steps"}
    tiny_model.text_to_image("a red circle", mode="exact", **kw)
    exact_calls, exact_rows = len(calls), sum(r for r, _ in calls)
    calls.clear()
    fast = tiny_model.text_to_image("a red circle", mode="fast", **kw)
    assert torch.isfinite(fast).all() and fast.shape == (1, 64, 16)
    g = tiny_model.config.generation
    assert g.fast_num_inference_steps < g.num_inference_steps
    assert len(calls) < exact_calls
    assert sum(r for r, _ in calls) < exact_rows
    # At equal steps the guidance interval alone saves rows: t = 1 runs the conditional branch only.
    calls.clear()
    tiny_model.text_to_image("a red circle", mode="exact", **FAST)
    exact_rows = sum(r for r, _ in calls)
    calls.clear()
    tiny_model.text_to_image("a red circle", mode="fast", **FAST)
    assert sum(r for r, _ in calls) < exact_rows


def test_fast_mode_cache_hits(tiny_model, monkeypatch, count_calls):
    monkeypatch.setattr(tiny_model.config.generation, "fast_cache_threshold", 1e9)  # always reuse
    calls = count_calls(tiny_model.decoder.double_blocks[0])  # every evaluation, cached or not
    single = count_calls(tiny_model.decoder.single_blocks[0])  # full evaluations only
    tiny_model.text_to_image("a red circle", mode="fast", **{**FAST, "num_inference_steps": 6})
    hits = len(calls) - len(single)  # a hit skips every block after the first
    assert 0 < hits < len(calls)


def test_fast_mode_without_shortcuts_equals_exact(tiny_model, monkeypatch):
    g = tiny_model.config.generation
    monkeypatch.setattr(g, "fast_cache_threshold", 0.0)  # never reuse
    monkeypatch.setattr(g, "fast_guidance_interval", (0.0, 1.0))  # always guide
    kw = {**FAST, "num_inference_steps": 3}
    close(tiny_model.text_to_image("a red circle", mode="fast", **kw),
          tiny_model.text_to_image("a red circle", mode="exact", **kw), atol=1e-6)


# ---- callbacks and progress ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "plain", "fast"])
def test_callback_every_step(tiny_model, photo, mode):
    seen = []
    out = tiny_model.text_to_image(["a red circle", "a star"], mode=mode, seed=0,
                                   callback=lambda s, n, x: seen.append((s, n, x.clone())),
                                   **{**FAST, "num_inference_steps": 3})
    assert [(s, n) for s, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all(x.shape == out.shape for _, _, x in seen)  # the whole batch at every step
    assert torch.equal(seen[-1][2], out)
    seen.clear()
    tiny_model.edit(photo, "make it red", mode=mode, callback=lambda s, n, x: seen.append((s, n)), **EDIT)
    assert seen == [(1, 2), (2, 2)]


def test_progress_bar(tiny_model, capsys):
    tiny_model.text_to_image("a red circle", **FAST)
    assert capsys.readouterr() == ("", "")
    tiny_model.text_to_image("a red circle", **{**FAST, "progress": True})
    assert "denoising" in capsys.readouterr().err


# ---- argument checks ----------------------------------------------------------------------------------
def test_size_snapping_and_bounds(tiny_model):
    with pytest.warns(UserWarning, match="height 40 floored to 32"):  # the published generate_image floors
        images = tiny_model.text_to_image("a circle", height=40, width=64, num_inference_steps=1,
                                          progress=False)
    assert images[0].size == (64, 32)
    g = tiny_model.config.generation
    for bad in ({"height": g.min_side - 1}, {"width": g.max_side + 1}, {"height": 10_000},
                {"width": float("nan")}, {"height": "64"}, {"width": 0}):
        with pytest.raises(ValueError, match=r"height|width"):
            tiny_model.text_to_image("a circle", **{**FAST, **bad})


@pytest.mark.parametrize("steps", [0, -1, 10**6, 2.5, "4", True])
def test_bad_steps(tiny_model, photo, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_model.text_to_image("a circle", **{**FAST, "num_inference_steps": steps})
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_model.edit(photo, "make it red", **{**EDIT, "num_inference_steps": steps})


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), -1.0, "strong", [1.0]])
def test_bad_guidance(tiny_model, photo, scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_model.text_to_image("a circle", guidance_scale=scale, **FAST)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_model.edit(photo, "make it red", guidance_scale=scale, **EDIT)
    with pytest.raises(ValueError, match="image_guidance_scale"):
        tiny_model.edit(photo, "make it red", image_guidance_scale=scale, **EDIT)


def test_bad_prompts_and_options(tiny_model, photo):
    for bad in ("", "   \n", [], ["a circle", ""], [None]):
        with pytest.raises(ValueError, match="prompt"):
            tiny_model.text_to_image(bad, **FAST)
    with pytest.raises(ValueError, match="instruction"):
        tiny_model.edit(photo, "  ", **EDIT)
    with pytest.raises(ValueError, match="mode"):
        tiny_model.text_to_image("a circle", mode="turbo", **FAST)
    for n in (0, -2, 1000, 1.5):
        with pytest.raises(ValueError, match="num_images_per_prompt"):
            tiny_model.text_to_image("a circle", num_images_per_prompt=n, **FAST)
    with pytest.raises(ValueError, match="<image>"):
        tiny_model.text_to_image("draw <image> again", **FAST)
    with pytest.raises(ValueError, match="output_type"):
        tiny_model.text_to_image("a circle", **{**FAST, "output_type": "np"})
    with pytest.raises(ValueError, match="output_type"):
        tiny_model.edit(photo, "make it red", **{**EDIT, "output_type": "numpy"})


def test_overlong_prompt_truncated(tiny_model):
    prompt = " ".join(["a small red circle next to a big blue square"] * 60)
    with pytest.warns(UserWarning, match="truncated to 256"):
        out = tiny_model.text_to_image(prompt, **FAST)
    assert torch.isfinite(out).all()


# ---- editing ------------------------------------------------------------------------------------------
def test_edit_output_size_follows_input(tiny_model):
    g = tiny_model.config.generation
    for h, w in ((40, 72), (90, 30), (300, 200)):
        source = random_image(h, w, seed=h)
        want_h, want_w = smart_resize(h, w, factor=g.size_multiple, min_pixels=g.min_side ** 2,
                                      max_pixels=g.edit_max_pixels)
        out = tiny_model.edit(source, "make it red", num_inference_steps=1, progress=False)[0]
        assert out.size == (want_w, want_h)
        assert want_h * want_w <= g.edit_max_pixels
        assert want_h % g.size_multiple == want_w % g.size_multiple == 0
        assert (want_h > want_w) == (h > w)  # aspect kept, not squared


def test_edit_session_multi_turn(tiny_model, photo):
    session = EditSession(tiny_model, photo, num_inference_steps=1, progress=False, seed=4)
    first = session.edit("make it red")
    second = session.edit("now add a blue star")
    assert [t for t, _ in session.history] == [None, "make it red", "now add a blue star"]
    assert session.current is second
    # Turn two edits the result of turn one.
    again = tiny_model.edit(first, "now add a blue star", num_inference_steps=1, progress=False, seed=4)[0]
    assert np.array_equal(np.asarray(again), np.asarray(second))
    assert session.undo() is first
    assert session.undo() is session.history[0][1]
    assert session.undo() is session.history[0][1]  # the source is never popped


def test_edit_session_refuses_latent_output(tiny_model, photo):
    with pytest.raises(ValueError, match="EditSession keeps images, so output_type must be 'pil'"):
        EditSession(tiny_model, photo, output_type="latent")
    session = EditSession(tiny_model, photo, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="output_type must be 'pil', got 'latent'"):
        session.edit("make it red", output_type="latent")
    assert len(session.history) == 1  # nothing half-done was kept


def test_edit_session_resumes_a_history_kept_elsewhere(tiny_model, photo):
    session = EditSession(tiny_model, photo, num_inference_steps=1, progress=False, seed=4)
    first = session.edit("make it red")
    kept = [list(turn) for turn in session.history]  # as plain data, e.g. from a web app's state
    resumed = EditSession.resume(tiny_model, kept, num_inference_steps=1, progress=False, seed=4)
    second = resumed.edit("now add a blue star")
    assert np.array_equal(np.asarray(second), np.asarray(session.edit("now add a blue star")))
    assert len(kept) == 2 and resumed.undo() is first  # the session works on its own copy
    for bad, needle in [([], "starts with (None, original image); got an empty one"),
                        ([("make it red", first)], "starts with (None, original image)"),
                        ([(None, photo), ("make it red", "out.png")], "entry 1 must be (instruction text, PIL")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            EditSession.resume(tiny_model, bad)


# ---- understanding ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")


# ---- bad and unusual images through the public API ----------------------------------------------------
@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_edit_refuses_bad_images_with_the_loaders_message(tiny_model, tmp_path, kind):
    """edit() and EditSession read images through images.load_image (whose every refusal test_images.py
    checks: empty, truncated, bombs, ...), from bytes and from paths alike."""
    src, message = {"corrupt": (b"this is not an image at all", "not a readable image"),
                    "missing": (tmp_path / "nope.png", "does not exist")}[kind]
    for call in (lambda: tiny_model.edit(src, "make it red", **EDIT), lambda: EditSession(tiny_model, src)):
        with pytest.raises(ImageInputError, match=message):
            call()
    assert issubclass(ImageInputError, ValueError)


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_every_kind_of_image_source_reaches_edit_and_answer(tiny_model):
    """Encoded bytes, numpy arrays and PIL images in other modes: load_image makes them RGB (test_images.py
    checks each mode and source); here they go all the way through both entry points."""
    rgb = random_image(40, 56, seed=9)
    sources = {"P": rgb.convert("P"), "RGBA": random_image(40, 56, mode="RGBA"),
               "CMYK jpeg": _encoded(rgb.convert("CMYK"), "JPEG"), "numpy": np.asarray(rgb),
               "grayscale numpy": np.asarray(rgb.convert("L"))}
    for name, src in sources.items():
        tiny_model.edit(src, "make it red", num_inference_steps=1, progress=False, output_type="latent")
        assert isinstance(tiny_model.answer("What is in the image?", images=src, max_new_tokens=2), str), name


# ---------------------------------------------------------------- initial noise: latents=, generator=, seed=
def test_given_latents_give_the_same_result_through_every_entry_point(tiny_model, photo):
    from ovis_u1 import generation as inf
    c, f = tiny_model.config.vae.latent_channels, tiny_model.vae.downsample
    lat = torch.randn(2, c, SIDE // f, SIDE // f, generator=torch.Generator().manual_seed(3))
    keep = lat.clone()
    a = tiny_model.text_to_image("a circle", num_images_per_prompt=2, latents=lat, **FAST)
    b = tiny_model.text_to_image("a circle", num_images_per_prompt=2, latents=lat, mode="plain", **FAST)
    req = inf.t2i_request(tiny_model, ["a circle"], SIDE, SIDE, tiny_model.config.generation.guidance_scale, None, 2,
                          latents=lat)
    c_ = inf.sample(tiny_model, req, 2, progress=False)
    close(a, c_, atol=0)  # exact mode is the sampler itself
    close(a, b)  # plain mode: the published loop, same result up to float noise
    assert torch.equal(lat, keep)  # used as given, never written to
    one = tiny_model.text_to_image("a circle", latents=lat[0], num_images_per_prompt=2, **FAST)  # [C, h, w]: all
    close(one[0], one[1]), close(one[0], a[0])
    h, w = inf.edit_size(tiny_model, photo)
    elat = torch.randn(1, c, h // f, w // f, generator=torch.Generator().manual_seed(4))
    e1 = tiny_model.edit(photo, "make it red", latents=elat, **EDIT)
    e2 = tiny_model.edit(photo, "make it red", latents=elat, mode="plain", **EDIT)
    close(e1, e2)
    assert not torch.allclose(e1, tiny_model.edit(photo, "make it red", seed=1, **EDIT))


def test_generator_equals_seed(tiny_model, photo):
    by_seed = tiny_model.text_to_image("a circle", seed=7, num_images_per_prompt=2, **FAST)
    gens = [torch.Generator().manual_seed(7 + k) for k in range(2)]  # per_sample: image k is seed + k
    close(tiny_model.text_to_image("a circle", generator=gens, num_images_per_prompt=2, **FAST), by_seed, atol=0)
    one = tiny_model.text_to_image("a circle", generator=torch.Generator().manual_seed(7), **FAST)
    close(one, by_seed[:1])  # the same noise; a batch of one computes in another order (float noise)
    close(tiny_model.edit(photo, "make it red", generator=torch.Generator().manual_seed(5), **EDIT),
          tiny_model.edit(photo, "make it red", seed=5, **EDIT), atol=0)


def test_published_noise_mode_draws_the_batch_from_one_bfloat16_generator(tiny_model):
    from ovis_u1.sampling import draw_noise
    g = tiny_model.config.generation
    old = g.noise
    try:
        g.noise = "published"
        got = tiny_model.text_to_image("a circle", seed=7, num_images_per_prompt=2, **FAST)
        lhw = SIDE // tiny_model.vae.downsample
        want = tiny_model.text_to_image("a circle", num_images_per_prompt=2, **FAST,
                                        latents=draw_noise((2, 4, lhw, lhw), seed=7, mode="published"))
        close(got, want, atol=0)
        noise = draw_noise((2, 4, 8, 8), seed=7, mode="published")
        assert noise.dtype == torch.bfloat16
        assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7),
                                              dtype=torch.bfloat16))
    finally:
        g.noise = old


L = 16  # the tiny VAE halves each side: 32 px -> 16 latent rows and columns


@pytest.mark.parametrize("bad, match", [
    ({"latents": torch.zeros(3, 4, L, L)}, r"shape \(3, 4, 16, 16\); this call needs \[1, 4, 16, 16\]"),
    ({"latents": torch.zeros(1, 4, L)}, "shape"), ({"latents": torch.zeros(1, 4, 8, 8)}, "latent size"),
    ({"latents": torch.full((1, 4, L, L), float("nan"))}, "NaN or infinite"),
    ({"latents": torch.zeros(1, 4, L, L, dtype=torch.long)}, "floating-point"),
    ({"latents": np.zeros((1, 4, L, L))}, "torch.Tensor"),
    ({"seed": 1, "generator": torch.Generator()}, "either seed or generator"),
    ({"generator": [torch.Generator()] * 2}, "list of 1"),
    ({"seed": -1}, "seed must be an integer"), ({"seed": "abc"}, "seed must be an integer"),
])
def test_bad_noise_arguments_are_refused(tiny_model, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.text_to_image("a circle", **FAST, **bad)


