"""Tiny-config CPU tests of every component as the model composes them: shapes, gradients, packing.

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
from conftest import perturb, random_image

from ovis_u1.config import get_preset
from ovis_u1.decoder import latent_ids, pack_latents
from ovis_u1.images import preprocess_image
from ovis_u1.model import OvisU1
from ovis_u1.prompts import INDICATOR_IDS, VISUAL_ATOM_ID
from ovis_u1.vision import VisualTokenizer

REPO = Path(__file__).resolve().parents[1]


def patches_of(model, *images):
    """Images -> (list of per-image patch tensors, grids), through the processor with the model's config."""
    c = model.config
    out = [preprocess_image(im, c.vision.patch_size, c.adapter.hidden_stride, c.adapter.min_pixels,
                            c.adapter.max_pixels, c.adapter.image_mean, c.adapter.image_std) for im in images]
    return [p for p, _ in out], [g for _, g in out]


def missing_grads(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    return [n for n, p in module.named_parameters()
            if not n.startswith(skip) and (p.grad is None or not p.grad.abs().sum() > 0)]


def two_images():
    # Non-square, different sizes and orientations: grids (1, 4, 8) and (1, 8, 4) in tiny.
    return random_image(40, 72, seed=1), random_image(56, 40, seed=2)


# ---- vision encoder and adapter ----------------------------------------------------------------------
def test_vision_encoder_forward_backward(make_tiny):
    model = make_tiny()
    patches, grids = patches_of(model, *two_images())
    assert grids == [(1, 4, 8), (1, 8, 4)]
    encoder = model.visual_tokenizer.backbone
    feats = encoder(torch.cat(patches), grids)
    assert feats.shape == (64, model.config.vision.hidden_size)
    feats.square().mean().backward()
    # The feature is taken before post_trunk_norm (facts sheet), so that norm gets no gradient.
    assert missing_grads(encoder) == ["trunk.post_trunk_norm.weight"]


def test_adapter_probabilities(make_tiny):
    model = make_tiny()
    patches, grids = patches_of(model, *two_images())
    probs = model.visual_tokens(patches, grids)
    v, n_ind = model.config.adapter.vocab_size, model.config.adapter.num_indicators
    assert probs.shape == (64 // 4, v)  # one token per 2x2 merge group
    torch.testing.assert_close(probs.sum(-1), torch.ones(16), rtol=0, atol=1e-5)
    assert (probs >= 0).all()
    assert torch.equal(probs[:, -n_ind:], torch.zeros(16, n_ind))
    assert (probs[:, :-n_ind] > 0).all()
    (probs[:, :-n_ind] * torch.randn(16, v - n_ind)).sum().backward()
    assert missing_grads(model.visual_tokenizer.head) == []
    assert missing_grads(model.visual_tokenizer.backbone, skip=("trunk.post_trunk_norm",)) == []


def test_packing_images_equals_one_by_one(tiny_model):
    """Several native-resolution images in one call give what each gives alone: no attention across."""
    patches, grids = patches_of(tiny_model, *two_images(), random_image(32, 32, seed=5))
    with torch.no_grad():
        together = tiny_model.visual_tokens(patches, grids)
        alone = torch.cat([tiny_model.visual_tokens([p], [g]) for p, g in zip(patches, grids)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_equal_size_images_batch_like_the_masked_packed_sequence(tiny_model):
    """Images of one size take the batched path; it equals the block-diagonal mask over the packed sequence
    and each image alone."""
    imgs = [random_image(32, 32, seed=s) for s in (1, 2, 3)]
    patches, grids = patches_of(tiny_model, *imgs)
    backbone = tiny_model.visual_tokenizer.backbone
    x = torch.cat(patches)
    with torch.no_grad():
        batched = backbone(x, grids)
        h = backbone.preprocessor(x, grids)
        cos, sin = backbone._rope(grids, h.device)
        mask = backbone._mask(grids, h.device, windowed=False)
        for block in backbone.trunk.blocks:
            h = block(h, cos, sin, mask)
        alone = torch.cat([backbone(p, [g]) for p, g in zip(patches, grids)])
    torch.testing.assert_close(batched, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def _windowed_tokenizer(tiny_model, window_px: int, fullatt=(1,)) -> VisualTokenizer:
    vision = dataclasses.replace(tiny_model.config.vision, use_window_attention=True, window_size=window_px,
                                 fullatt_blocks=fullatt)
    vt = VisualTokenizer(vision, tiny_model.config.adapter)
    vt.load_state_dict(tiny_model.visual_tokenizer.state_dict())
    return vt.eval()


def test_window_attention(tiny_model):
    patches, grids = patches_of(tiny_model, *two_images())
    windowed = _windowed_tokenizer(tiny_model, window_px=32)  # 4 x 4 patches per window
    with torch.no_grad():
        full = tiny_model.visual_tokenizer(torch.cat(patches), grids)
        win = windowed(torch.cat(patches), grids)
        alone = torch.cat([windowed(p, [g]) for p, g in zip(patches, grids)])
        # A window covering every image is full attention.
        huge = _windowed_tokenizer(tiny_model, window_px=1024)(torch.cat(patches), grids)
    assert win.shape == full.shape
    assert not torch.allclose(win, full, atol=1e-4)  # the windows do restrict attention
    torch.testing.assert_close(win, alone, rtol=1e-5, atol=1e-6)  # ... and never across images
    torch.testing.assert_close(huge, full, rtol=1e-5, atol=1e-6)


def test_vision_rejects_bad_grid(tiny_model):
    with pytest.raises(ValueError, match="divisible"):
        tiny_model.visual_tokenizer(torch.zeros(15, 3, 8, 8), [(1, 3, 5)])


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
def _generation_batch(model, with_image=True):
    images = [random_image(32, 32, seed=7), random_image(32, 32, seed=8)]
    patches, grids = patches_of(model, *images)
    n = model.visual_tokens(patches[:1], grids[:1]).shape[0]
    ids = torch.cat([_ids_with_image(n), _ids_with_image(n, text=(11, 12, 13))])
    return model.condition(ids, torch.ones_like(ids), patches, grids)


def test_refiner_forward_backward(make_tiny):
    model = make_tiny()
    cond = _generation_batch(model)
    mask = torch.ones(cond.shape[:2], dtype=torch.bool)
    mask[1, -3:] = False
    out = model.refiner(cond, mask)
    hidden = model.config.refiner.hidden_size
    assert out.tokens.shape == (2, cond.shape[1], hidden)
    assert out.cls.shape == (2, hidden)
    # Padding positions do not move the real ones (masked pooling and masked keys).
    alone = model.refiner(cond[1:, :-3])
    torch.testing.assert_close(out.tokens[1:, :-3], alone.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cls[1:], alone.cls, rtol=1e-4, atol=1e-5)
    (out.tokens[mask].square().mean() + out.cls.square().mean()).backward()
    assert missing_grads(model.refiner) == []
    assert missing_grads(model.llm) == []  # the condition path is differentiable end to end


@pytest.mark.parametrize("with_ref", [False, True])
def test_decoder_via_model_forward_backward(make_tiny, with_ref):
    """LLM condition -> refiner -> decoder, with and without a VAE-encoded reference image."""
    model = make_tiny()
    cond = _generation_batch(model)
    refined = model.refiner(cond)
    f, c = model.vae.downsample, model.config.vae.latent_channels
    h = w = 32 // f
    g = torch.Generator().manual_seed(0)
    x = pack_latents(torch.randn(2, c, h, w, generator=g))
    ids = latent_ids(2, h, w)
    kw = {}
    if with_ref:
        ref_pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        ref = pack_latents(model.vae.encode(ref_pixels)).detach()
        kw = {"ref": ref, "ref_ids": latent_ids(2, h, w, index=1)}
    t = torch.tensor([0.3, 0.8])
    v = model.decoder(x, ids, refined.tokens, torch.zeros(*refined.tokens.shape[:2], 3), t, refined.cls, **kw)
    assert v.shape == x.shape  # the output is cut back to the target tokens
    v.square().mean().backward()
    assert missing_grads(model.decoder) == []
    assert missing_grads(model.refiner) == []
    if with_ref:
        with torch.no_grad():
            args = (x, ids, refined.tokens.detach(), torch.zeros(*refined.tokens.shape[:2], 3), t,
                    refined.cls.detach())
            plain = model.decoder(*args)
            hidden = model.decoder(*args, **kw, ref_mask=torch.zeros(2, ref.shape[1], dtype=torch.bool))
        assert not torch.allclose(v.detach(), plain, atol=1e-4)  # the reference is seen
        torch.testing.assert_close(hidden, plain, rtol=1e-4, atol=1e-5)  # a masked reference is not


def test_vae_encode_decode_shapes_and_grads(make_tiny):
    model = make_tiny()
    f, c = model.vae.downsample, model.config.vae.latent_channels
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    z = model.vae.encode(pixels)
    assert z.shape == (2, c, 32 // f, 48 // f)
    out = model.vae.decode(z)
    assert out.shape == pixels.shape
    assert out.min() >= -1 and out.max() <= 1
    (out - pixels).square().mean().backward()
    # Gradients reach both halves: through decode, then through encode's posterior mean.
    assert missing_grads(model.vae) == []


def test_vae_sampled_encoding(tiny_model):
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = tiny_model.vae.encode(pixels, sample=True, generator=g1)
        b = tiny_model.vae.encode(pixels, sample=True, generator=g2)
        mean = tiny_model.vae.encode(pixels)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, mean)


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


def test_migrating_a_pre_parity_checkpoint_keeps_its_outputs(make_tiny):
    """train.migrate_checkpoint: the refiner reads the new condition order, indicators their new rows, and
    visual tokens keep their embeddings (the given-up word had almost no probability on the images)."""
    from train.migrate_checkpoint import migrate
    old = make_tiny()
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    images = [random_image(32, 32, seed=s) for s in range(3)]
    new, lost = migrate(old, images)
    d = old.config.llm.hidden_size
    cond_new = torch.randn(2, 5, 2 * d, generator=torch.Generator().manual_seed(1))  # [h[-1], h[-2]]
    cond_old = torch.cat([cond_new[..., d:], cond_new[..., :d]], dim=-1)  # what the old code built
    with torch.no_grad():
        a, b = old.refiner(cond_old), new.refiner(cond_new)
    torch.testing.assert_close(b.tokens, a.tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.cls, a.cls, rtol=0, atol=1e-5)
    v = old.vte.num_embeddings
    for k in range(len(INDICATOR_IDS)):  # old row V-4+k is new row V-5+k
        assert torch.equal(new.vte.weight[v - 5 + k], old.vte.weight[v - 4 + k])
    patches, grids = patches_of(old, images[0])
    with torch.no_grad():
        e_old = old.visual_tokens(patches, grids) @ old.vte.weight
        e_new = new.visual_tokens(patches, grids) @ new.vte.weight
    assert lost < 0.05
    torch.testing.assert_close(e_new, e_old, rtol=0, atol=lost * 20 + 1e-5)
