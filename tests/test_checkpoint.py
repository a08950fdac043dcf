"""Saving and loading: own format, the published Ovis-U1 layout, loud errors and atomic saves, and the
migration of pre-parity checkpoints."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re

import pytest
import torch
from conftest import patches_of, random_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ovis_u1.checkpoint as ckpt
from ovis_u1.checkpoint import CheckpointError, config_from_published, config_to_published, to_published_key
from ovis_u1.config import get_preset
from ovis_u1.decoder import latent_ids, pack_latents
from ovis_u1.model import OvisU1
from ovis_u1.prompts import INDICATOR_IDS

IMAGE = random_image(40, 72, seed=11)


@torch.no_grad()
def probe(model: OvisU1) -> dict[str, torch.Tensor | str]:
    """Outputs of every component on fixed inputs, plus the user-facing tasks."""
    from ovis_u1.generation import encode_conditions
    from ovis_u1.images import preprocess_image
    from ovis_u1.prompts import generation_prompt

    g = torch.Generator().manual_seed(0)
    cond, mask = encode_conditions(model, [generation_prompt("a red circle")], [IMAGE])
    refined = model.refiner(cond, mask)
    c = model.config.vae.latent_channels
    x = pack_latents(torch.randn(1, c, 16, 16, generator=g))
    v = model.decoder(x, latent_ids(1, 16, 16), refined.tokens, torch.zeros(1, cond.shape[1], 3),
                      torch.tensor([0.5]), refined.cls, txt_mask=mask)
    pixels = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    ad = model.config.adapter
    patches, grid = preprocess_image(IMAGE, model.config.vision.patch_size, ad.hidden_stride, ad.min_pixels,
                                     ad.max_pixels, ad.image_mean, ad.image_std)
    return {
        "visual_tokens": model.visual_tokens([patches], [grid]),
        "condition": cond, "refined": refined.tokens, "cls": refined.cls, "velocity": v,
        "vae_latents": model.vae.encode(pixels),
        "vae_pixels": model.vae.decode(torch.randn(1, c, 8, 8, generator=g)),
        "t2i": model.text_to_image("a blue square", height=32, width=32, num_inference_steps=2,
                                   progress=False, output_type="latent"),
        "answer": model.answer("What is in the image?", images=IMAGE, max_new_tokens=6),
    }


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], str):
            assert a[k] == b[k], k
        else:
            assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


@pytest.fixture(scope="module")
def own_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "ckpt"
    tiny_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def published_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("published") / "ckpt"
    tiny_model.save_pretrained(path, layout="published", max_shard_size=256 * 1024)
    return path


# ---- own format -------------------------------------------------------------------------------------------
def test_own_round_trip(tiny_model, own_dir):
    assert sorted(p.name for p in own_dir.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    cfg = json.loads((own_dir / "config.json").read_text())
    assert cfg["format"] == "ovis-u1-compact"
    loaded = OvisU1.from_pretrained(own_dir)
    assert loaded.config == tiny_model.config
    assert not loaded.training
    sd, ref = loaded.state_dict(), tiny_model.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # The tied LM head is stored once and tied again on load.
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    text = "<|im_start|>user\nWhat is in the image?<|im_end|>"
    assert loaded.tokenizer.encode(text) == tiny_model.tokenizer.encode(text)
    assert_same_outputs(probe(loaded), probe(tiny_model))


def test_checkpoint_without_tokenizer(own_dir, tmp_path, photo):
    path = _copy_own(own_dir, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).unlink()
    model = OvisU1.from_pretrained(path)  # fine for tensor-level use ...
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):  # ... but the tasks say what is missing
        model.answer("What is it?")
    with pytest.raises(ValueError, match="no tokenizer"):
        model.text_to_image("a circle", height=32, width=32, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        model.edit(photo, "make it red", num_inference_steps=1, progress=False)


def test_load_dtype(own_dir):
    model = OvisU1.from_pretrained(own_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---- published layout -------------------------------------------------------------------------------------
FACT_KEYS = [  # names from the facts sheet, with the tiny model's block indices
    "visual_tokenizer.backbone.preprocessor.patchifier.proj.weight",
    "visual_tokenizer.backbone.preprocessor.patchifier.norm.weight",
    "visual_tokenizer.backbone.preprocessor.pos_embed",
    *(f"visual_tokenizer.backbone.trunk.blocks.0.{n}.weight"
      for n in ("attn.qkv", "attn.proj", "norm_1", "mlp.fc1", "mlp.fc2", "mlp.fc3", "norm_2")),
    "visual_tokenizer.backbone.trunk.post_trunk_norm.weight",
    "visual_tokenizer.head.0.weight", "visual_tokenizer.head.1.weight", "visual_tokenizer.head.1.bias",
    "vte.weight",
    "llm.model.embed_tokens.weight", "llm.model.layers.0.self_attn.q_proj.weight", "llm.model.norm.weight",
    *(f"visual_generator.backbone.{n}.weight" for n in (
        "img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
        "txt_in.input_embedder", "txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2",
        *(f"txt_in.individual_token_refiner.blocks.0.{b}" for b in (
            "norm1", "self_attn_qkv", "self_attn_proj", "norm2", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")),
        *(f"double_blocks.0.{b}" for b in (
            "img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_self_attn.qkv", "img_self_attn.proj",
            "img_mlp.0", "img_mlp.2", "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0",
            "txt_mlp.2")),
        *(f"single_blocks.0.{b}" for b in ("linear1", "linear2", "modulation.lin")),
        "final_layer.linear", "final_layer.adaLN_modulation.1")),
    *(f"visual_generator.backbone.{n}.scale" for n in (
        "double_blocks.0.img_attn.norm.query_norm", "double_blocks.0.img_attn.norm.key_norm",
        "double_blocks.0.img_self_attn.norm.query_norm", "double_blocks.0.txt_attn.norm.key_norm",
        "single_blocks.0.norm.query_norm", "single_blocks.0.norm.key_norm")),
    "visual_generator.backbone.txt_in.cls_token",
    "visual_generator.vae.encoder.conv_in.weight", "visual_generator.vae.decoder.conv_out.weight",
    "visual_generator.vae.quant_conv.weight",
]
TOP_PREFIXES = ("llm.", "visual_tokenizer.backbone.", "visual_tokenizer.head.", "vte.",
                "visual_generator.backbone.", "visual_generator.vae.")


def test_published_layout_files_and_keys(tiny_model, published_dir):
    names = sorted(p.name for p in published_dir.iterdir())
    shards = [n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    assert len(shards) >= 3
    assert all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    for required in ("config.json", "model.safetensors.index.json", "preprocessor_config.json",
                     "tokenizer.json", "tokenizer_config.json"):
        assert required in names
    index = json.loads((published_dir / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    stored, total = {}, 0
    for shard in shards:
        with safe_open(str(published_dir / shard), framework="pt") as f:
            for k in f.keys():
                assert k not in stored, f"{k} stored twice"
                t = f.get_tensor(k)
                stored[k] = shard
                total += t.numel() * t.element_size()
                assert t.dtype == torch.bfloat16, k
                assert weight_map[k] == shard
    assert weight_map == stored  # the index covers every tensor and nothing else
    assert index["metadata"]["total_size"] == total
    assert set(FACT_KEYS) <= stored.keys(), sorted(set(FACT_KEYS) - stored.keys())
    assert all(k.startswith(TOP_PREFIXES) for k in stored)
    assert not any(k.startswith(("refiner.", "decoder.", "vae.")) or "autoencoder" in k for k in stored)
    assert "llm.lm_head.weight" not in stored  # tied to the embeddings
    expected = {to_published_key(k) for k in tiny_model.state_dict()} - {"llm.lm_head.weight"}
    assert stored.keys() == expected


def test_published_config_files(tiny_model, published_dir):
    cfg = json.loads((published_dir / "config.json").read_text())
    assert cfg["model_type"] == "ovis_u1"
    assert cfg["conversation_formatter_class"] == "Qwen3ConversationFormatter"
    assert cfg["multimodal_max_length"] == tiny_model.config.generation.multimodal_max_length
    llm = cfg["llm_config"]
    assert llm["model_type"] == "qwen3" and llm["hidden_size"] == 64 and llm["num_hidden_layers"] == 2
    vt = cfg["visual_tokenizer_config"]
    assert vt["model_type"] == "aimv2_visual_tokenizer"
    assert (vt["vocab_size"], vt["hidden_stride"], vt["tokenize_function"]) == (256, 2, "softmax")
    assert {"min_pixels", "max_pixels"} <= vt.keys()
    bb = vt["backbone_config"]
    assert bb["model_type"] == "aimv2" and bb["hidden_size"] == 64 and bb["patch_size"] == 8
    gen = cfg["visual_generator_config"]
    assert gen["model_type"] == "yak"
    d = tiny_model.config.decoder
    for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim", "vec_in_dim",
              "in_channels", "out_channels"):
        assert gen[k] == getattr(d, k), k
    assert gen["axes_dim"] == list(d.axes_dim)
    vae = gen["vae_config"]
    assert vae["_class_name"] == "AutoencoderKL" and vae["latent_channels"] == 4
    assert vae["block_out_channels"] == [16, 32]
    pre = json.loads((published_dir / "preprocessor_config.json").read_text())
    assert pre["do_center_crop"] is False and pre["do_normalize"] is True
    assert pre["image_mean"] == pytest.approx(list(tiny_model.config.adapter.image_mean))


def test_published_round_trip_equals_bf16_rounded(tiny_model, make_tiny, published_dir):
    loaded = OvisU1.from_pretrained(published_dir)
    assert loaded.config == tiny_model.config
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    rounded = make_tiny(0)  # same weights as tiny_model ...
    with torch.no_grad():
        for p in rounded.parameters():  # ... rounded to bf16 (buffers such as RoPE frequencies stay fp32)
            p.copy_(p.to(torch.bfloat16).float())
    sd, ref = loaded.state_dict(), rounded.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert_same_outputs(probe(loaded), probe(rounded))


def test_published_config_translation():
    for name in ("tiny", "shapes", "small", "ovis-u1-3b"):
        cfg = get_preset(name)
        assert config_from_published(config_to_published(cfg)) == cfg, name
    cfg.vision = dataclasses.replace(cfg.vision, use_window_attention=True, window_size=56,
                                     fullatt_blocks=(7, 15, 23))
    assert config_from_published(json.loads(json.dumps(config_to_published(cfg)))) == cfg


def test_published_config_without_refiner_fields():
    """The published `yak` config states only the decoder; the refiner must keep its own sizes."""
    full = get_preset("ovis-u1-3b")
    d = config_to_published(full)
    gen = {k: v for k, v in d["visual_generator_config"].items() if not k.startswith("refiner_")}
    d = {k: v for k, v in d.items() if not k.startswith("compact_")} | {"visual_generator_config": gen}
    cfg = config_from_published(d)
    assert cfg.refiner == full.refiner  # depth 2, 24 heads, not the decoder's depth 6 / 12 heads
    assert cfg.decoder == full.decoder
    assert cfg.llm == full.llm and cfg.vision == full.vision and cfg.vae == full.vae


def test_full_size_published_shapes_on_meta():
    """The understanding side's tensor shapes at full size under their published names, as listed in the facts
    sheet ([out, in]). The decoder's and refiner's full-size shapes are test_decoder's
    test_full_size_shapes_on_meta; their published names, test_published_layout_files_and_keys."""
    model = OvisU1.from_preset("ovis-u1-3b", device="meta")
    shapes = {to_published_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    want = {
        "visual_tokenizer.backbone.preprocessor.patchifier.proj.weight": (1024, 3, 14, 14),
        "visual_tokenizer.backbone.preprocessor.pos_embed": (1, 1024, 1024),
        "visual_tokenizer.head.0.weight": (65536 - 4, 4096), "vte.weight": (65536, 2048),
        "visual_generator.backbone.txt_in.input_embedder.weight": (1536, 4096),  # reads the LLM's 2 x 2048
    }
    for k, shape in want.items():
        assert shapes[k] == shape, k


# ---- errors -----------------------------------------------------------------------------------------------
def _copy_own(own_dir, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(own_dir, dst)
    return dst


def _rewrite(path, edit):
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_unexpected_and_misshaped_keys(own_dir, tmp_path):
    path = _copy_own(own_dir, tmp_path)
    _rewrite(path, lambda sd: sd.pop("decoder.img_in.weight"))
    with pytest.raises(CheckpointError, match=r"missing: decoder\.img_in\.weight"):
        OvisU1.from_pretrained(path)
    _rewrite(path, lambda sd: sd.update({"decoder.img_in.weight": torch.zeros(64, 16),
                                         "decoder.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected: decoder\.extra\.weight"):
        OvisU1.from_pretrained(path)
    def misshape(sd):
        del sd["decoder.extra.weight"]
        sd["vte.weight"] = torch.zeros(10, 64)

    _rewrite(path, misshape)
    with pytest.raises(CheckpointError, match=r"wrongly shaped: vte\.weight: checkpoint \(10, 64\) vs model"):
        OvisU1.from_pretrained(path)


def test_published_errors(published_dir, tmp_path):
    import shutil
    path = tmp_path / "pub"
    shutil.copytree(published_dir, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    sd = load_file(str(path / first))
    save_file({**sd, "text_encoder.weight": torch.zeros(2)}, str(path / first))
    with pytest.raises(CheckpointError, match=rf"{first} does not hold the tensors .*index.*text_encoder"):
        OvisU1.from_pretrained(path)  # a tensor the index does not list
    index["weight_map"]["text_encoder.weight"] = first
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected tensors outside the known prefixes.*text_encoder"):
        OvisU1.from_pretrained(path)
    victim = sorted(sd)[0]
    del index["weight_map"]["text_encoder.weight"], index["weight_map"][victim]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: v for k, v in sd.items() if k != victim}, str(path / first))
    with pytest.raises(CheckpointError, match="missing"):
        OvisU1.from_pretrained(path)
    (path / first).unlink()
    with pytest.raises(CheckpointError, match="index names shards that are missing"):
        OvisU1.from_pretrained(path)


def test_unknown_config_fields(own_dir, tmp_path):
    path = _copy_own(own_dir, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw["config"]["decoder"]["hiden_size"] = 3
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown decoder config fields.*hiden_size"):
        OvisU1.from_pretrained(path)
    (path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="neither this package's format"):
        OvisU1.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        OvisU1.from_pretrained(path)


class _Boobytrap:
    """Unpickling this creates a file: proves the loader never unpickles anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("with_config", [False, True])
def test_pickle_only_directory(own_dir, tmp_path, with_config):
    path = tmp_path / "pickled"
    path.mkdir()
    marker = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boobytrap(marker)))
    if with_config:
        (path / "config.json").write_text((own_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"pickle.*pytorch_model\.bin|pytorch_model\.bin.*pickle"):
        OvisU1.from_pretrained(path)
    assert not marker.exists()


def test_corrupt_safetensors(own_dir, tmp_path):
    path = _copy_own(own_dir, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(b"\x00garbage, not safetensors at all" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        OvisU1.from_pretrained(path)
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        OvisU1.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        OvisU1.from_pretrained(path)


def test_bad_paths(own_dir, tmp_path):
    path = _copy_own(own_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        OvisU1.from_pretrained(path)
    with pytest.raises(CheckpointError, match="is a file"):
        OvisU1.from_pretrained(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        OvisU1.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((own_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        OvisU1.from_pretrained(empty)
    with pytest.raises(ValueError, match="layout"):
        OvisU1.from_preset("tiny").save_pretrained(tmp_path / "x", layout="diffusers")


# ---- atomic saves -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["own", "published"])
def test_failed_save_keeps_previous_checkpoint(tiny_model, make_tiny, tmp_path, monkeypatch, layout):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(path, layout=layout, max_shard_size=256 * 1024)
    before = sorted(p.name for p in path.iterdir())
    other = make_tiny(5)
    calls = []
    real_save = ckpt.save_file
    files_before_crash = 0 if layout == "own" else 1  # published: crash after the first shard

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > files_before_crash:
            raise OSError("No space left on device")
        real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(path, layout=layout, max_shard_size=256 * 1024)
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind
    loaded = OvisU1.from_pretrained(path)
    ref = tiny_model.state_dict()
    tol = {} if layout == "own" else {"atol": 0.02, "rtol": 0.01}
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ref[k], **tol)
    # A save that succeeds replaces the old checkpoint completely and cleans up after itself.
    other.save_pretrained(path, layout=layout, max_shard_size=256 * 1024)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert torch.equal(OvisU1.from_pretrained(path).vte.weight,
                       other.vte.weight if layout == "own" else other.vte.weight.bfloat16().float())


def test_save_never_replaces_foreign_files(tiny_model, tmp_path):
    """A save replaces its target whole: it must refuse files and folders that hold no checkpoint."""
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    with pytest.raises(CheckpointError, match="is a file"):
        tiny_model.save_pretrained(note)
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2,3")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        tiny_model.save_pretrained(work)
    assert note.read_text() == "keep me" and (work / "data.csv").read_text() == "1,2,3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "work"]
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_model.save_pretrained(empty)  # an empty folder is fine
    assert (empty / "config.json").exists()


def test_config_dataclass_round_trip():
    cfg = get_preset("tiny")
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg)["decoder"]["axes_dim"] == (4, 6, 6)


# ---- the loader is a strict gate (issue 32's battery) -------------------------------------------------------
def _edit_config(path, edit):
    raw = json.loads((path / "config.json").read_text())
    replaced = edit(raw)
    raw = replaced if getattr(edit, "whole", False) else raw
    (path / "config.json").write_text(json.dumps(raw))


def _set(keys: str, value):
    """An edit of config.json that sets a dotted field."""
    def edit(raw):
        *parents, last = keys.split(".")
        obj = raw
        for k in parents:
            obj = obj[k]
        obj[last] = value
    return edit


def _whole(value):
    def edit(raw):
        return value
    edit.whole = True
    return edit


# (layout, edit of config.json, what the error must name)
BAD_CONFIGS = {
    "list": ("own", _whole([1, 2]), r"config\.json must hold a JSON object, got a list"),
    "string": ("own", _whole("ovis"), r"config\.json must hold a JSON object, got a string"),
    "null": ("own", _whole(None), r"config\.json must hold a JSON object, got null"),
    "config-null": ("own", _set("config", None), r"config\.json: field 'config' must be an object.*null"),
    "config-missing": ("own", lambda raw: raw.pop("config") and None, r"field 'config' must be an object"),
    "section-list": ("own", _set("config.decoder", [1]), r"config\.decoder must be an object, got a list"),
    "int-as-string": ("own", _set("config.decoder.hidden_size", "64"), r"decoder\.hidden_size must be an integer"),
    "int-as-float": ("own", _set("config.llm.num_hidden_layers", 2.5), r"llm\.num_hidden_layers must be an int"),
    "zero-heads": ("own", _set("config.decoder.num_heads", 0), r"decoder\.num_heads must be >= 1"),
    "negative-size": ("own", _set("config.vision.hidden_size", -64), r"vision\.hidden_size must be >= 1"),
    "bool-as-string": ("own", _set("config.llm.tie_word_embeddings", "yes"), r"tie_word_embeddings must be true"),
    "nan-eps": ("own", _set("config.vision.norm_eps", float("nan")), r"vision\.norm_eps must be a finite number"),
    "inf-eps": ("own", _set("config.llm.rms_norm_eps", float("inf")), r"llm\.rms_norm_eps must be a finite"),
    "zero-eps": ("own", _set("config.llm.rms_norm_eps", 0.0), r"llm\.rms_norm_eps must be > 0"),
    "tuple-as-int": ("own", _set("config.decoder.axes_dim", 16), r"decoder\.axes_dim must be a list"),
    "short-mean": ("own", _set("config.adapter.image_mean", [0.5]), r"adapter\.image_mean must list 3 values"),
    "gen-steps": ("own", _set("config.generation.num_inference_steps", "many"), r"generation\.num_inference_steps"),
    "gen-guidance": ("own", _set("config.generation.guidance_scale", -1.0), r"generation\.guidance_scale must be >= 0"),
    "gen-prefix": ("own", _set("config.generation.t2i_prefix", 3), r"generation\.t2i_prefix must be a string"),
    "gen-sides": ("own", _set("config.generation.min_side", 4096), r"generation\.min_side \(4096\) is above"),
    "preset": ("own", _set("config.preset", ["tiny"]), r"config\.preset must be a string"),
    "prediction": ("own", _set("config.decoder.prediction", "noise"), r"cannot be built.*prediction"),
    "format-version": ("own", _set("format_version", 99), r"format_version 99 is not one this package reads"),
    "unknown-section": ("own", _set("config.extras", {}), r"unknown config section\(s\) \['extras'\]"),
    "unknown-top": ("own", _set("notes", "x"), r"unknown top-level field\(s\) \['notes'\]"),
    "pub-llm-list": ("published", _set("llm_config", []), r"config\.json: llm_config must be an object, got a list"),
    "pub-gen-string": ("published", _set("visual_generator_config", "yak"), r"visual_generator_config must be an"),
    "pub-vae-int": ("published", _set("visual_generator_config.vae_config", 3), r"vae_config must be an object"),
    "pub-backbone": ("published", _set("visual_tokenizer_config.backbone_config", None),
                     r"backbone_config must be an object, got null"),
    "pub-field-type": ("published", _set("llm_config.hidden_size", "big"), r"llm\.hidden_size must be an integer"),
    "pub-image-size": ("published", _set("visual_tokenizer_config.backbone_config.image_size", "448"),
                       r"config\.json: a field of the wrong type"),
    "pub-max-length": ("published", _set("multimodal_max_length", None), r"multimodal_max_length must be an int"),
    "pub-hidden-size": ("published", _set("hidden_size", 65), r"top-level hidden_size 65 differs from llm_config"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_malformed_config_is_a_checkpoint_error_naming_file_and_field(case, own_dir, published_dir, tmp_path):
    import shutil
    layout, edit, message = BAD_CONFIGS[case]
    path = tmp_path / "ckpt"
    shutil.copytree(own_dir if layout == "own" else published_dir, path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=message):
        OvisU1.from_pretrained(path)


def test_config_json_that_is_not_a_file(own_dir, tmp_path):
    import os
    import signal
    path = _copy_own(own_dir, tmp_path)
    (path / "config.json").unlink()
    (path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is a directory"):
        OvisU1.from_pretrained(path)
    (path / "config.json").rmdir()
    os.mkfifo(path / "config.json")  # nobody ever writes to it: a plain open() would block forever
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("loading hung on a FIFO named config.json"))
    signal.alarm(20)
    try:
        with pytest.raises(CheckpointError, match=r"config\.json is not a regular file"):
            OvisU1.from_pretrained(path)
    finally:
        signal.alarm(0)
    (path / "config.json").unlink()
    (path / "config.json").write_bytes(b'{"format": "ovis-u1-compact", "config": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"config\.json is not UTF-8"):
        OvisU1.from_pretrained(path)


def test_stray_weight_files_are_never_read(tiny_model, own_dir, published_dir, tmp_path):
    """Only the file the format names (or the index's shards) is read: a stray file changes nothing."""
    import shutil
    path = _copy_own(own_dir, tmp_path)
    save_file({"vte.weight": torch.zeros_like(tiny_model.vte.weight)}, str(path / "zz.safetensors"))
    assert torch.equal(OvisU1.from_pretrained(path).vte.weight, tiny_model.vte.weight)
    pub = tmp_path / "pub"
    shutil.copytree(published_dir, pub)
    save_file({"vte.weight": torch.zeros_like(tiny_model.vte.weight)}, str(pub / "zz.safetensors"))
    assert torch.equal(OvisU1.from_pretrained(pub).vte.weight, tiny_model.vte.weight.bfloat16().float())


@pytest.mark.parametrize("entry, message", [
    ("../outside.safetensors", "no folders"), ("/tmp/abs.safetensors", "no folders"),
    ("sub/x.safetensors", "no folders"), ("model.bin", "no folders"), (7, "no folders"),
])
def test_index_entries_stay_inside_the_folder(published_dir, tmp_path, entry, message):
    import shutil
    path = tmp_path / "pub"
    shutil.copytree(published_dir, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = entry
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"index\.json: weight_map\[.*{message}"):
        OvisU1.from_pretrained(path)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"index\.json is not valid JSON"),
    ("[]", r"index\.json must hold a JSON object with a 'weight_map', got a list"),
    ('{"metadata": {}}', r"index\.json: field 'weight_map' must be a non-empty object.*null"),
    ('{"weight_map": []}', r"index\.json: field 'weight_map'"),
])
def test_malformed_index(published_dir, tmp_path, text, message):
    import shutil
    path = tmp_path / "pub"
    shutil.copytree(published_dir, path)
    (path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        OvisU1.from_pretrained(path)


@pytest.mark.parametrize("value, message", [
    (torch.full((64,), float("nan")), "NaN or infinite"),
    (torch.tensor([float("inf")] + [0.0] * 63), "1 NaN or infinite value"),
    (torch.zeros(64, dtype=torch.int64), "dtype int64"),
    (torch.zeros(64, dtype=torch.bool), "dtype bool"),
    (torch.zeros(64, dtype=torch.complex64), "dtype complex64"),
])
def test_weights_must_be_finite_floats(own_dir, tmp_path, value, message):
    path = _copy_own(own_dir, tmp_path)
    sd = load_file(str(path / "model.safetensors"))
    key = next(k for k, v in sd.items() if v.shape == (64,))
    sd[key] = value
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(key)}'.*{message}"):
        OvisU1.from_pretrained(path)


@pytest.mark.parametrize("name, text, message", [
    ("tokenizer.json", "{}", r"tokenizer\.json: field 'model' must be an object"),
    ("tokenizer.json", "{corrupt", r"tokenizer\.json is not valid JSON"),
    ("tokenizer.json", '{"model": {"type": "Nonsense"}}', r"tokenizer\.json is not a usable tokenizer"),
    ("tokenizer_config.json", '{"auto_map": {"AutoTokenizer": ["x.Tok", null]}}',
     r"tokenizer_config\.json: .*auto_map"),
    ("tokenizer_config.json", "[1]", r"tokenizer_config\.json must hold a JSON object"),
])
def test_bad_tokenizer_files(own_dir, tmp_path, name, text, message):
    path = _copy_own(own_dir, tmp_path)
    (path / name).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        OvisU1.from_pretrained(path)


def test_save_refuses_non_finite_weights(make_tiny, tmp_path):
    model = make_tiny(3)
    with torch.no_grad():
        model.vte.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite.*vte\.weight"):
        model.save_pretrained(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layouts", [("own", "own"), ("own", "published"), ("published", "own")])
def test_save_keeps_the_users_files(tiny_model, make_tiny, tmp_path, layouts):
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(path, layout=layouts[0], max_shard_size=256 * 1024)
    (path / "README.md").write_text("my notes")
    (path / "samples").mkdir()
    (path / "samples" / "a.txt").write_text("a")
    other = make_tiny(4)
    other.save_pretrained(path, layout=layouts[1], max_shard_size=256 * 1024)
    assert (path / "README.md").read_text() == "my notes" and (path / "samples" / "a.txt").read_text() == "a"
    names = {p.name for p in path.iterdir()}
    # The previous checkpoint's own files are gone when the new layout does not write them.
    assert ("model.safetensors" in names) == (layouts[1] == "own")
    assert ("model.safetensors.index.json" in names) == (layouts[1] == "published")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = OvisU1.from_pretrained(path)
    assert torch.allclose(loaded.vte.weight, other.vte.weight, atol=0.02)


def test_a_crash_between_the_swaps_renames_is_recoverable(tiny_model, make_tiny, tmp_path, monkeypatch):
    import os
    path = tmp_path / "ckpt"
    tiny_model.save_pretrained(path)
    (path / "README.md").write_text("my notes")
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="killed"):
        make_tiny(6).save_pretrained(path)
    monkeypatch.undo()
    assert not path.exists()
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = OvisU1.from_pretrained(path)  # the old checkpoint, from where the swap left it
    assert torch.equal(loaded.vte.weight, tiny_model.vte.weight)
    other = make_tiny(7)
    other.save_pretrained(path)  # puts the old one back first, then swaps as usual
    assert torch.equal(OvisU1.from_pretrained(path).vte.weight, other.vte.weight)
    assert (path / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---- migrating a checkpoint written before the parity fixes (train/migrate_checkpoint.py) ---------------
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
