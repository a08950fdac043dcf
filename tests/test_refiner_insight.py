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


def test_movement_and_gates_are_the_refiners_own(tiny_model, report):
    """Recompute from the refiner's output directly (the report must not re-derive the maths its own way)."""
    from ovis_u1.inference import encode_conditions
    from ovis_u1.processing import blank_image, t2i_prompts
    g = tiny_model.config.generation
    cond, mask = encode_conditions(tiny_model, [t2i_prompts(PROMPT)[0]],
                                   [blank_image(g.height, g.width, g.blank_image_max_pixels)])
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


def test_word_attention_map_rejects_bad_arguments(tiny_model, report):
    n = len(report.tokens)
    with pytest.raises(ValueError, match="step must be"):
        ri.word_attention_map(tiny_model, PROMPT, 0, step=4, num_inference_steps=3)
    with pytest.raises(ValueError, match="word_index"):
        ri.word_attention_map(tiny_model, PROMPT, n, step=1, num_inference_steps=1)
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
        "word": ri.plot_word_heatmap(image, heat, word=report.tokens[-2], step=1),
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
