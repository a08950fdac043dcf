"""OvisU1 (ovis_u1/model.py) composing its parts on the tiny preset: the visual-token embedding merge,
the LLM condition, gradients through the understanding and generation paths, dtype casts, presets and
parameter counts, and an import without side effects. Each part alone has its own file (test_vision,
test_refiner, test_decoder, test_vae, test_layers).

The `tiny_model` fixture is shared and read-only; tests that train or cast use a fresh `make_tiny()`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import missing_grads, patches_of, perturb, random_image

from ovis_u1.config import get_preset
from ovis_u1.decoder import latent_ids, pack_latents
from ovis_u1.model import OvisU1
from ovis_u1.prompts import INDICATOR_IDS, VISUAL_ATOM_ID

REPO = Path(__file__).resolve().parents[1]


# ---- embedding merge and the LLM -----------------------------------------------------------------------
def _ids_with_image(n_visual: int, text=(5, 6, 7)) -> torch.Tensor:
    ids = [*text, INDICATOR_IDS[0], *[VISUAL_ATOM_ID] * n_visual, INDICATOR_IDS[1], 9, 10]
    return torch.tensor([ids])


def test_vte_embedding_merge(tiny_model):
    patches, grids = patches_of(tiny_model, random_image(40, 72, seed=1))
    probs = tiny_model.visual_tokens(patches, grids)
    n = probs.shape[0]
    ids = _ids_with_image(n)
    embeds = tiny_model.embed(ids, patches, grids)
    assert embeds.shape == (1, ids.shape[1], tiny_model.config.llm.hidden_size)
    vte = tiny_model.vte.weight
    text = tiny_model.llm.get_input_embeddings().weight
    atoms = ids[0] == VISUAL_ATOM_ID
    torch.testing.assert_close(embeds[0, atoms], probs @ vte)
    v = vte.shape[0]
    # As published: indicator -301-k -> VTE row V-5+k (row V-5 is also the last visual word's)
    torch.testing.assert_close(embeds[0, 3], vte[v - 5])
    torch.testing.assert_close(embeds[0, 4 + n], vte[v - 4])
    for pos, tid in ((0, 5), (1, 6), (2, 7), (-2, 9), (-1, 10)):
        torch.testing.assert_close(embeds[0, pos], text[tid])
    with pytest.raises(ValueError, match="visual-token positions"):
        tiny_model.embed(_ids_with_image(n - 1), patches, grids)
    with pytest.raises(ValueError, match="visual-token positions"):
        tiny_model.embed(_ids_with_image(n), [], [])


def test_condition_is_last_two_hidden_layers(tiny_model):
    """Checked with hooks, independently of transformers' hidden_states convention."""
    patches, grids = patches_of(tiny_model, random_image(32, 32, seed=4))
    n = tiny_model.visual_tokens(patches, grids).shape[0]
    ids = torch.cat([_ids_with_image(n), _ids_with_image(n, text=(8, 8, 8))])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding in the second row
    seen = {}
    llm = tiny_model.llm.model
    h1 = llm.layers[-1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("last_layer_input", (args or (kwargs["hidden_states"],))[0]),
        with_kwargs=True)
    h2 = llm.norm.register_forward_hook(lambda m, args, out: seen.__setitem__("final_norm_output", out))
    try:
        cond = tiny_model.condition(ids, mask, patches * 2, grids * 2)
    finally:
        h1.remove()
        h2.remove()
    d = tiny_model.config.llm.hidden_size
    assert cond.shape == (2, ids.shape[1], 2 * d)
    # The published order: the last hidden state (after the final norm) first, then the one before it.
    torch.testing.assert_close(cond[..., :d], seen["final_norm_output"])
    torch.testing.assert_close(cond[..., d:], seen["last_layer_input"])
    # Right padding does not touch the real tokens (causal LLM), and rows are independent.
    alone = tiny_model.condition(ids[1:, :-2], mask[1:, :-2], patches, grids)
    torch.testing.assert_close(cond[1:, :-2], alone, rtol=1e-4, atol=1e-5)


def test_understanding_forward_backward(make_tiny):
    model = make_tiny()
    patches, grids = patches_of(model, random_image(40, 72, seed=1))
    n = model.visual_tokens(patches, grids).shape[0]
    ids = _ids_with_image(n)
    embeds = model.embed(ids, patches, grids)
    logits = model.llm(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape == (1, ids.shape[1], model.config.llm.vocab_size)
    labels = ids.clamp(min=0)[0, 1:]
    F.cross_entropy(logits[0, :-1], labels).backward()
    assert missing_grads(model.llm) == []
    assert missing_grads(model.vte) == []
    assert missing_grads(model.visual_tokenizer, skip=("backbone.trunk.post_trunk_norm",)) == []


# ---- generation path: refiner, decoder, VAE ---------------------------------------------------------
def _generation_batch(model):
    images = [random_image(32, 32, seed=7), random_image(32, 32, seed=8)]
    patches, grids = patches_of(model, *images)
    n = model.visual_tokens(patches[:1], grids[:1]).shape[0]
    ids = torch.cat([_ids_with_image(n), _ids_with_image(n, text=(11, 12, 13))])
    return model.condition(ids, torch.ones_like(ids), patches, grids)


def test_generation_path_forward_backward(make_tiny):
    """LLM condition -> refiner -> decoder with a VAE-encoded reference: the output is cut back to the
    target tokens, and the loss reaches every parameter of the decoder, the refiner and the LLM."""
    model = make_tiny()
    cond = _generation_batch(model)
    refined = model.refiner(cond)
    f, c = model.vae.downsample, model.config.vae.latent_channels
    h = w = 32 // f
    g = torch.Generator().manual_seed(0)
    x = pack_latents(torch.randn(2, c, h, w, generator=g))
    ref_pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    ref = pack_latents(model.vae.encode(ref_pixels)).detach()
    v = model.decoder(x, latent_ids(2, h, w), refined.tokens, torch.zeros(*refined.tokens.shape[:2], 3),
                      torch.tensor([0.3, 0.8]), refined.cls, ref=ref, ref_ids=latent_ids(2, h, w, index=1))
    assert v.shape == x.shape
    v.square().mean().backward()
    assert missing_grads(model.decoder) == []
    assert missing_grads(model.refiner) == []
    assert missing_grads(model.llm) == []  # the condition path is differentiable end to end


# ---- whole model ---------------------------------------------------------------------------------------
def test_to_float64(make_tiny):
    model = make_tiny()
    with torch.no_grad():
        ref = model.text_to_image("a red circle", height=32, width=32, num_inference_steps=2, progress=False,
                                  output_type="latent")
    model.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.dtype == torch.float64
    patches, grids = patches_of(model, random_image(32, 32))
    assert model.visual_tokens(patches, grids).dtype == torch.float64
    out = model.text_to_image("a red circle", height=32, width=32, num_inference_steps=2, progress=False,
                              output_type="latent")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-3, atol=1e-3)
    assert isinstance(model.answer("What is it?", images=random_image(32, 32), max_new_tokens=3), str)


def test_inconsistent_config_and_unknown_preset():
    cfg = get_preset("tiny")
    cfg.refiner = dataclasses.replace(cfg.refiner, in_dim=64)
    with pytest.raises(ValueError, match=r"refiner\.in_dim"):
        OvisU1(cfg)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        OvisU1.from_preset("nope")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("ovis-u1-7b")


def test_full_size_parameter_counts_on_meta():
    model = OvisU1.from_preset("ovis-u1-3b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    n = {k: v / 1e9 for k, v in model.num_parameters_by_component().items()}
    assert n["llm"] == pytest.approx(1.72, abs=0.01)  # Qwen3-1.7B with tied embeddings
    assert n["vision"] == pytest.approx(0.31, abs=0.01)
    assert n["decoder"] + n["refiner"] == pytest.approx(1.13, abs=0.01)
    assert n["vae"] == pytest.approx(0.084, abs=0.002)
    assert n["adapter"] == pytest.approx(0.27, abs=0.01)  # V = 65536
    assert n["vte"] == pytest.approx(0.134, abs=0.001)
    assert 3.3 <= n["total"] <= 3.9
    assert n["total"] == pytest.approx(sum(v for k, v in n.items() if k != "total"))


def test_perturbed_fixture_is_live(tiny_model):
    """Guards the fixture: with perturbed zero-init layers the decoder no longer predicts v = 0."""
    fresh = OvisU1.from_preset("tiny", tokenizer=tiny_model.tokenizer)
    assert torch.count_nonzero(fresh.decoder.final_layer.linear.weight) == 0
    assert torch.count_nonzero(tiny_model.decoder.final_layer.linear.weight) > 0
    assert perturb(torch.nn.Linear(2, 2)).weight.abs().sum() > 0


def test_import_has_no_side_effects(tmp_path):
    """Importing the package writes no files and opens no network connection."""
    code = textwrap.dedent("""
        import socket
        def refuse(*a, **k):
            raise RuntimeError("network access during import")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import ovis_u1, ovis_u1.model, ovis_u1.generation, ovis_u1.chat, ovis_u1.checkpoint
        import ovis_u1.images, ovis_u1.prompts
        import ovis_u1.tokenizer, ovis_u1.sampling, ovis_u1.vision, ovis_u1.llm, ovis_u1.vae
        print(ovis_u1.__file__)
    """)
    # A private copy of the package (others may be editing the working tree while this runs).
    shutil.copytree(REPO / "ovis_u1", tmp_path / "src" / "ovis_u1",
                    ignore=shutil.ignore_patterns("__pycache__", "default_model"))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"),
           "XDG_CACHE_HOME": str(home / "cache"), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(tmp_path / "src")}

    def snapshot():
        return {(p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}

    before = snapshot()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tmp_path / "src" / "ovis_u1" / "__init__.py")
    assert snapshot() == before
