"""ovis_u1.refiner_insight on the tiny preset: what it measures is what the model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from ovis_u1 import refiner_insight as ri
from ovis_u1.model import OvisU1

PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def report(tiny_model):
    return ri.refiner_report(tiny_model, PROMPT)


def test_report_shapes_and_normalisation(tiny_model, report):
    n = len(report.tokens)
    depth, hidden = tiny_model.config.refiner.depth, tiny_model.config.refiner.hidden_size
    assert len(report.attention) == depth
    for a in report.attention:
        assert a.shape == (n + 1, n + 1)
        np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-5)  # softmax rows, heads averaged
    assert [c.tolist() for c in report.cls_attention] == [a[0].tolist() for a in report.attention]
    assert report.gates.shape == (depth, 2, hidden)
    assert report.gate_magnitude.shape == (depth, 2) and (report.gate_magnitude > 0).all()
    assert report.movement.shape == report.cosine.shape == report.embedded_norm.shape == (n,)
    assert (report.movement >= 0).all() and (np.abs(report.cosine) <= 1 + 1e-6).all()


def test_tokens_cover_the_condition_and_the_span_is_the_prompt(report):
    assert report.tokens[0] == "<|im_start|>"
    assert "<img_0>" in report.tokens and "<v0>" in report.tokens and "<img_1>" in report.tokens
    assert "".join(report.tokens[i] for i in report.prompt_indices).strip() == PROMPT
    assert report.tokens[report.prompt_span[1]] == "<|im_end|>"


def test_words_group_sub_word_pieces(tiny_model):
    """A rare word ("zigzag") is split into pieces by the small tokenizer; the report offers it as one word."""
    prompt = "zigzag purple  triangles, left"
    report = ri.refiner_report(tiny_model, prompt)
    assert [w.text for w in report.words] == prompt.split()
    pieces = [i for w in report.words for i in w.indices]
    assert pieces == sorted(pieces) and set(pieces) <= set(report.prompt_indices)
    for w in report.words:
        assert "".join(report.tokens[i] for i in w.indices).strip() == w.text
    # Every prompt token that is not pure whitespace belongs to a word.
    assert {i for i in report.prompt_indices if report.tokens[i].strip()} == set(pieces)
    assert any(len(w.indices) > 1 for w in report.words)  # the point: some word has several pieces
    np.testing.assert_allclose(report.word_mean(report.movement),
                               [report.movement[list(w.indices)].mean() for w in report.words])


def test_movement_and_gates_are_the_refiners_own(tiny_model, report):
    """Recompute from the refiner's output directly (the report must not re-derive the maths its own way)."""
    from ovis_u1.generation import encode_conditions, vit_factor
    from ovis_u1.images import blank_image
    from ovis_u1.prompts import t2i_prompts
    g = tiny_model.config.generation
    cond, mask = encode_conditions(tiny_model, [t2i_prompts(PROMPT)[0]],
                                   [blank_image(g.height, g.width, g.blank_image_max_pixels, vit_factor(tiny_model))])
    with torch.no_grad():
        out = tiny_model.refiner(cond, mask, return_attention=True)
        embedded = tiny_model.refiner.input_embedder(cond)
    np.testing.assert_allclose(report.movement, (out.tokens - embedded)[0].norm(dim=-1).numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(report.gates[:, 0], torch.stack([gm[0] for gm, _ in out.gates]).numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(report.attention[1], out.attention[1][0].mean(dim=0).numpy(), atol=1e-5)


def test_an_untrained_refiner_is_the_identity(tiny_tokenizer):
    """Zero-initialised gates (adaLN-Zero): nothing moves, every gate is zero."""
    torch.manual_seed(0)
    model = OvisU1.from_preset("tiny", tokenizer=tiny_tokenizer).eval()
    report = ri.refiner_report(model, "a circle")
    assert np.abs(report.gates).max() == 0
    np.testing.assert_allclose(report.movement, 0.0, atol=1e-6)
    np.testing.assert_allclose(report.cosine, 1.0, atol=1e-5)


def test_word_attention_map_pairs_the_t2i_image_with_a_heatmap(tiny_model, report):
    word = report.prompt_indices[2]  # " circle"
    image, heat = ri.word_attention_map(tiny_model, PROMPT, word, step=2, num_inference_steps=3, seed=5)
    want = tiny_model.text_to_image(PROMPT, num_inference_steps=3, seed=5, progress=False)[0]
    assert np.array_equal(np.asarray(image), np.asarray(want))  # the same image text_to_image makes
    g, f = tiny_model.config.generation, tiny_model.vae.downsample
    assert heat.shape == (g.height // f // 2, g.width // f // 2)
    assert (heat >= 0).all() and heat.max() <= 1
    # Attention to every text key at once is at most everything (the rest goes to image keys).
    per_word = [ri.word_attention_map(tiny_model, PROMPT, i, step=2, num_inference_steps=3, seed=5)[1]
                for i in (0, word)]
    assert not np.allclose(per_word[0], per_word[1])
    assert np.array_equal(per_word[1], heat)
    first = ri.word_attention_map(tiny_model, PROMPT, word, step=1, num_inference_steps=3, seed=5)[1]
    assert not np.allclose(first, heat)  # another step, another input to the decoder


def test_a_words_map_is_the_sum_over_its_pieces(tiny_model):
    prompt = "zigzag purple triangles"
    report = ri.refiner_report(tiny_model, prompt)
    word = next(w for w in report.words if len(w.indices) > 1)
    kwargs = {"step": 2, "num_inference_steps": 3, "seed": 5}
    _, whole = ri.word_attention_map(tiny_model, prompt, word, **kwargs)
    pieces = [ri.word_attention_map(tiny_model, prompt, i, **kwargs)[1] for i in word.indices]
    np.testing.assert_allclose(whole, np.sum(pieces, axis=0), rtol=1e-5, atol=1e-7)
    assert np.array_equal(ri.word_attention_map(tiny_model, prompt, list(word.indices), **kwargs)[1], whole)


def test_word_attention_map_rejects_bad_arguments(tiny_model, report):
    n = len(report.tokens)
    with pytest.raises(ValueError, match="step must be"):
        ri.word_attention_map(tiny_model, PROMPT, 0, step=4, num_inference_steps=3)
    with pytest.raises(ValueError, match="word_index"):
        ri.word_attention_map(tiny_model, PROMPT, n, step=1, num_inference_steps=1)
    for bad in ([], [0, n], "3", True, 2.0):
        with pytest.raises(ValueError, match="word_index"):
            ri.word_attention_map(tiny_model, PROMPT, bad, step=1, num_inference_steps=1)
    with pytest.raises(ValueError, match="block"):
        ri.word_attention_map(tiny_model, PROMPT, 0, step=1, num_inference_steps=1, block=5)
    with pytest.raises(ValueError, match="prompt"):
        ri.refiner_report(tiny_model, "  ")


def test_plots_are_figures(tiny_model, report, tmp_path):
    image, heat = ri.word_attention_map(tiny_model, PROMPT, report.prompt_indices[-1], step=1,
                                        num_inference_steps=1)
    figures = {
        "attention": ri.plot_refiner_attention(report),
        "attention_all": ri.plot_refiner_attention(report, focus="all"),
        "gates": ri.plot_gates(report),
        "movement": ri.plot_token_movement(report),
        "word": ri.plot_word_heatmap(image, heat, word=report.words[-1], step=1),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 2000
    attention_axes = [ax for ax in figures["attention"].axes if ax.get_title().startswith("block")]
    assert len(attention_axes) == tiny_model.config.refiner.depth
    labels = [t.get_text() for t in attention_axes[0].get_xticklabels()]
    assert labels[0] == "CLS" and labels[-1] == ri.REST and "circle" in labels
    with pytest.raises(ValueError, match="focus"):
        ri.plot_token_movement(report, focus="some")


def test_word_heatmap_is_drawn_unblended_and_bright_means_more(tiny_model, report):
    """The map is shown as computed (no blend with the image, which made high look dark on an object),
    with a colormap whose lightness rises with the value, from 0 to the map's maximum."""
    image, heat = ri.word_attention_map(tiny_model, PROMPT, report.words[1], step=1, num_inference_steps=1)
    fig = ri.plot_word_heatmap(image, heat, word=report.words[1])
    title = next(ax for ax in fig.axes if ax.get_title().startswith("attention to"))
    assert title.get_title() == "attention to 'red'"
    (shown,) = title.get_images()
    assert np.array_equal(np.asarray(shown.get_array()), heat) and shown.get_alpha() in (None, 1.0)
    assert shown.norm.vmin == 0 and shown.norm.vmax == pytest.approx(heat.max())
    rgb = shown.cmap(np.linspace(0, 1, 16))[:, :3]
    lightness = rgb @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(lightness) > 0).all()


@pytest.fixture(scope="module")
def shipped():
    return OvisU1.from_pretrained().eval()


@pytest.mark.parametrize(("prompt", "colour"), [(PROMPT, "red"), ("a green square", "green")])
def test_on_the_shipped_model_a_colour_word_is_read_most_on_its_object(shipped, prompt, colour):
    """What notebook 02 and the demo tab say: a colour word's map is highest on the object of that colour.
    Measured at step 6 of 12, seed 3 (mean over the object's cells / over background cells): ' red' 0.15 /
    0.02, ' green' 0.21 / 0.09. Not every word does this: the second object's colour ('blue' here) and the
    shape words are read almost as much from the background (notebook 02 shows both)."""
    from ovis_u1.shapes.reader import CLASS_NAMES, classify_pixels
    report = ri.refiner_report(shipped, prompt)
    word = next(w for w in report.words if w.text == colour)
    image, heat = ri.word_attention_map(shipped, prompt, word, step=6, num_inference_steps=12, seed=3)
    cls = classify_pixels(np.asarray(image))
    h, w = heat.shape  # one cell per decoder image token: the share of each pixel class per cell
    cells = {name: (cls == CLASS_NAMES.index(name)).reshape(h, cls.shape[0] // h, w, cls.shape[1] // w)
             .mean(axis=(1, 3)) for name in (colour, "white")}
    own, background = cells[colour] > 0.5, cells["white"] > 0.99
    assert own.any() and background.any(), f"seed 3 should draw a {colour} object on white"
    assert heat[own].mean() > 1.5 * heat[background].mean(), (colour, heat[own].mean(), heat[background].mean())
