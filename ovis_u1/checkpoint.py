"""Saving and loading: the project's own format and the published Ovis-U1-3B directory layout.

Own format: `config.json` ({"format": "ovis-u1-compact", "config": ...}) + `model.safetensors` with this
package's parameter names + tokenizer files. Published layout: `config.json` with `model_type: ovis_u1`,
sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, `preprocessor_config.json`,
tokenizer files; parameter names under the published prefixes (PUBLISHED_PREFIXES). Loading is loud: any
missing, unexpected or wrongly shaped tensor raises `CheckpointError` naming them. Pickle is never read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import (
    AdapterConfig,
    DecoderConfig,
    LLMConfig,
    OvisU1Config,
    RefinerConfig,
    VAEConfig,
    VisionConfig,
    get_preset,
)

OWN_FORMAT = "ovis-u1-compact"
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"

# Our parameter-name prefix -> the published one. Longest match wins when mapping back, so the refiner
# (nested inside the published decoder as `txt_in`) is told apart from the rest of the decoder.
PUBLISHED_PREFIXES = {
    "visual_tokenizer.": "visual_tokenizer.",
    "vte.": "vte.",
    "visual_positions.": "visual_positions.",  # a departure; absent from published checkpoints
    "llm.": "llm.",
    "refiner.": "visual_generator.backbone.txt_in.",
    "decoder.": "visual_generator.backbone.",
    "vae.autoencoder.": "visual_generator.vae.",
}
TIED_KEYS = ("llm.lm_head.weight",)  # absent from checkpoints when the LM ties it to its embeddings
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(RuntimeError):
    pass


def to_published_key(key: str) -> str:
    for ours, theirs in PUBLISHED_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise CheckpointError(f"parameter {key!r} has no published name (prefixes: {list(PUBLISHED_PREFIXES)})")


def from_published_key(key: str) -> str | None:
    best = max((t for t in PUBLISHED_PREFIXES.values() if key.startswith(t)), key=len, default=None)
    if best is None:
        return None
    ours = next(o for o, t in PUBLISHED_PREFIXES.items() if t == best)
    return ours + key[len(best):]


# ---- config translation ---------------------------------------------------------------------------------
def _pick(cls, values: dict, **renames) -> object:
    """Build a component config from a published sub-config: known fields kept, renamed ones mapped."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: values[k] for k in names if k in values}
    kw.update({ours: values[theirs] for ours, theirs in renames.items() if theirs in values})
    for f in dataclasses.fields(cls):
        if f.name in kw and isinstance(f.default, tuple):
            kw[f.name] = tuple(kw[f.name])
    return cls(**kw)


def config_to_published(cfg: OvisU1Config) -> dict:
    """The published config.json for this model: what the published classes read, plus `compact_*` fields
    (ignored there) that let this package restore what they cannot say (sampling defaults, the preset)."""
    vis, ad, dec, ref = cfg.vision, cfg.adapter, cfg.decoder, cfg.refiner
    backbone = {
        "model_type": "aimv2", "hidden_size": vis.hidden_size, "num_hidden_layers": vis.num_layers,
        "num_attention_heads": vis.num_heads, "intermediate_size": vis.intermediate_size,
        "patch_size": vis.patch_size, "image_size": vis.pos_grid * vis.patch_size,
        "rms_norm_eps": vis.norm_eps, "qkv_bias": vis.qkv_bias, "use_bias": vis.use_bias,
        "rope_theta": vis.rope_theta, "window_size": vis.window_size, "hidden_stride": ad.hidden_stride,
        # null = full attention in every block; a list = windows in every block not listed.
        "fullatt_block_indexes": list(vis.fullatt_blocks) if vis.use_window_attention else None,
        "preserve_original_pe": vis.preserve_original_pe, "interpolate_pe_method": vis.interpolate_pe_method,
        "disable_rope": not vis.use_rope, "num_channels": 3, "temporal_patch_size": 1,
    }
    vae = dataclasses.asdict(cfg.vae)
    n = len(cfg.vae.block_out_channels)
    vae.update(_class_name="AutoencoderKL", down_block_types=["DownEncoderBlock2D"] * n,
               up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(cfg.vae.block_out_channels))
    g = cfg.generation
    generator = {"model_type": "yak", **dataclasses.asdict(dec), "axes_dim": list(dec.axes_dim),
                 "guidance_embed": False, "vae_config": vae, "timestep_shift": g.use_time_shift,
                 "base_shift": g.base_shift, "max_shift": g.max_shift,
                 "refiner_hidden_size": ref.hidden_size, "refiner_num_heads": ref.num_heads,
                 "refiner_depth": ref.depth, "refiner_mlp_ratio": ref.mlp_ratio, "refiner_qkv_bias": ref.qkv_bias}
    return {
        "model_type": "ovis_u1", "architectures": ["Ovis_U1"], "hidden_size": cfg.llm.hidden_size,
        "llm_config": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                       **dataclasses.asdict(cfg.llm)},
        "visual_tokenizer_config": {
            "model_type": "aimv2_visual_tokenizer", "vocab_size": ad.vocab_size,
            "hidden_stride": ad.hidden_stride, "tokenize_function": ad.tokenize_function,
            "min_pixels": ad.min_pixels, "max_pixels": ad.max_pixels, "backbone_config": backbone,
        },
        "visual_generator_config": generator,
        "multimodal_max_length": g.multimodal_max_length,
        "conversation_formatter_class": "Qwen3ConversationFormatter",
        "compact_generation_config": dataclasses.asdict(g),
        "compact_preset": cfg.preset,
    }


def published_departures(cfg: OvisU1Config) -> list[str]:
    """What of this model the published code would build or run differently from this package."""
    dec, ref = cfg.decoder, cfg.refiner
    out = []
    published_refiner = (dec.context_in_dim, dec.hidden_size, 2 * dec.num_heads, 2, 4.0, True)
    if (ref.in_dim, ref.hidden_size, ref.num_heads, ref.depth, ref.mlp_ratio, ref.qkv_bias) != published_refiner:
        out.append(f"its refiner ({ref.depth} blocks of {ref.num_heads} heads, width {ref.hidden_size}) is not the "
                   f"published one (2 blocks of 2 x {dec.num_heads} decoder heads, width {dec.hidden_size})")
    if dec.prediction != "velocity":
        out.append(f"its decoder predicts the {dec.prediction!r}, the published one the velocity")
    if cfg.adapter.position_buckets:
        out.append("it has visual position embeddings, which the published model lacks")
    return out


# Published config-class defaults for the fields whose absence changes behaviour (AIMv2Config, YakConfig).
_PUBLISHED_DEFAULTS = {"preserve_original_pe": False, "interpolate_pe_method": "one_dim",
                       "fullatt_block_indexes": None, "disable_rope": False, "timestep_shift": False,
                       "base_shift": 0.5, "max_shift": 1.15}


def config_from_published(d: dict, preprocessor: dict | None = None) -> OvisU1Config:
    """Published config.json (and preprocessor_config.json) -> OvisU1Config.

    Sizes it does not state keep the ovis-u1-3b values; switches it does not state take the published
    config classes' defaults, as the published code would. The refiner follows the published rule (2
    blocks, heads = 2 x decoder heads, width = decoder width) unless this package's own `refiner_*`
    fields say otherwise. Pixel bounds and mean/std come from the preprocessor config when given.
    """
    full = get_preset("ovis-u1-3b")
    vt = d.get("visual_tokenizer_config", {})
    bb = {**_PUBLISHED_DEFAULTS, **vt.get("backbone_config", {})}
    gen = {**_PUBLISHED_DEFAULTS, **d.get("visual_generator_config", {})}
    vision = _pick(VisionConfig, {**dataclasses.asdict(full.vision), **bb}, num_layers="num_hidden_layers",
                   num_heads="num_attention_heads", norm_eps="rms_norm_eps")
    windows = bb["fullatt_block_indexes"]
    vision.use_window_attention = windows is not None
    vision.fullatt_blocks = tuple(windows or ())
    vision.use_rope = not bb["disable_rope"]
    if "image_size" in bb:
        vision.pos_grid = bb["image_size"] // vision.patch_size
    adapter = _pick(AdapterConfig, {**dataclasses.asdict(full.adapter), **vt})
    if preprocessor:
        adapter.min_pixels = preprocessor.get("min_pixels", adapter.min_pixels)
        adapter.max_pixels = preprocessor.get("max_pixels", adapter.max_pixels)
        adapter.image_mean = tuple(preprocessor.get("image_mean", adapter.image_mean))
        adapter.image_std = tuple(preprocessor.get("image_std", adapter.image_std))
    llm = _pick(LLMConfig, {**dataclasses.asdict(full.llm), **d.get("llm_config", {})})
    if "hidden_size" in d and d["hidden_size"] is not None and d["hidden_size"] != llm.hidden_size:
        raise CheckpointError(f"config.json: top-level hidden_size {d['hidden_size']} differs from "
                              f"llm_config.hidden_size {llm.hidden_size} (the published model asserts they match)")
    decoder = _pick(DecoderConfig, {**dataclasses.asdict(full.decoder), **gen})
    # Only the `refiner_*` fields (this package's exports) describe the refiner; the decoder's own
    # `num_heads`/`depth`/... must not leak into it.
    refiner_fields = {k: v for k, v in gen.items() if k.startswith("refiner_")}
    refiner = _pick(RefinerConfig, {"in_dim": decoder.context_in_dim, "hidden_size": decoder.hidden_size,
                                    "num_heads": 2 * decoder.num_heads, "depth": 2, "mlp_ratio": 4.0,
                                    "qkv_bias": True, **refiner_fields},
                    hidden_size="refiner_hidden_size", num_heads="refiner_num_heads", depth="refiner_depth",
                    mlp_ratio="refiner_mlp_ratio", qkv_bias="refiner_qkv_bias")
    vae = _pick(VAEConfig, {**dataclasses.asdict(full.vae), **gen.get("vae_config", {})})
    generation = dataclasses.replace(full.generation, use_time_shift=bool(gen["timestep_shift"]),
                                     base_shift=gen["base_shift"], max_shift=gen["max_shift"],
                                     blank_image_max_pixels=adapter.min_pixels,
                                     edit_image_max_pixels=adapter.min_pixels)
    generation = dataclasses.replace(generation, **{
        k: tuple(v) if isinstance(v, list) else v for k, v in d.get("compact_generation_config", {}).items()})
    if "multimodal_max_length" in d:
        generation.multimodal_max_length = d["multimodal_max_length"]
    return OvisU1Config(vision=vision, adapter=adapter, llm=llm, refiner=refiner, decoder=decoder, vae=vae,
                        generation=generation, preset=d.get("compact_preset", "ovis-u1-3b"))


# ---- saving ------------------------------------------------------------------------------------------------
def state_for_saving(model) -> dict[str, torch.Tensor]:
    """The state dict as stored: contiguous tensors, without the LM head when it is tied."""
    sd = model.state_dict()
    if model.config.llm.tie_word_embeddings:
        for k in TIED_KEYS:
            sd.pop(k, None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _atomic_dir(path: Path):
    """Write into a sibling temp folder, then swap it in, so a crash never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def _swap_in(tmp: Path, path: Path) -> None:
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


def save_pretrained(model, path, layout: str = "own", max_shard_size: int = 4 * 2**30) -> None:
    if layout not in ("own", "published"):
        raise ValueError(f"layout {layout!r}; choose 'own' or 'published'")
    path = Path(path)
    # The save replaces `path` as a whole, so never let it be a file or a folder of something else.
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; save_pretrained writes a checkpoint directory")
    if path.is_dir() and not (path / "config.json").exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} is a non-empty directory that holds no checkpoint (no config.json); "
                              "refusing to replace its contents: save to a new or empty directory")
    tmp = _atomic_dir(path)
    try:
        sd = state_for_saving(model)
        if layout == "own":
            save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
            config = {"format": OWN_FORMAT, "format_version": 1, "config": model.config.to_dict()}
        else:
            _save_sharded({to_published_key(k): v.to(torch.bfloat16) if v.is_floating_point() else v
                           for k, v in sd.items()}, tmp, max_shard_size)
            config = config_to_published(model.config)
            for why in published_departures(model.config):
                warnings.warn(f"saved in the published layout, but the published code will not run this model as "
                              f"this package does: {why}", stacklevel=3)
            _write_json(tmp / "preprocessor_config.json", _preprocessor_config(model.config))
        _write_json(tmp / "config.json", config)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _save_sharded(sd: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _preprocessor_config(cfg: OvisU1Config) -> dict:
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "do_center_crop": False,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(cfg.adapter.image_mean), "image_std": list(cfg.adapter.image_std),
            "patch_size": cfg.vision.patch_size, "hidden_stride": cfg.adapter.hidden_stride,
            "temporal_patch_size": 1, "resample": 3, "crop_size": {"height": -1, "width": -1},
            "size": {"shortest_edge": -1}, "min_pixels": cfg.adapter.min_pixels, "max_pixels": cfg.adapter.max_pixels}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---- loading -----------------------------------------------------------------------------------------------
def _read_config(path: Path) -> tuple[OvisU1Config, str]:
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory with config.json and "
                              "*.safetensors")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json, so it is not an Ovis-U1 checkpoint."
                              f"{_pickle_hint(path)}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if raw.get("format") == OWN_FORMAT:
        return OvisU1Config.from_dict(raw["config"]), "own"
    if raw.get("model_type") == "ovis_u1":
        return config_from_published(raw, _read_preprocessor(path)), "published"
    raise CheckpointError(f"{cfg_file}: neither this package's format (format={OWN_FORMAT!r}) nor the "
                          f"published one (model_type='ovis_u1'); got keys {sorted(raw)[:8]}")


def _read_preprocessor(path: Path) -> dict | None:
    """preprocessor_config.json of a published-layout checkpoint (pixel bounds, mean/std), if it has one."""
    f = path / "preprocessor_config.json"
    if not f.exists():
        return None
    try:
        pp = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(pp, dict):
        raise CheckpointError(f"{f} must hold a JSON object, got {type(pp).__name__}")
    if pp.get("do_center_crop") or pp.get("do_resize") is False or pp.get("resample", 3) != 3:
        raise CheckpointError(f"{f}: only a bicubic resize without centre crop is supported (the published visual "
                              f"tokenizer asserts the same), got do_center_crop={pp.get('do_center_crop')}, "
                              f"do_resize={pp.get('do_resize')}, resample={pp.get('resample')}")
    return pp


def _weight_files(path: Path, layout: str) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {path}.{_pickle_hint(path)}")
    index = path / "model.safetensors.index.json"
    if layout == "published" and index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"index names shards that are missing from {path}: {missing}")
        return [path / n for n in names]
    return files


def _pickle_hint(path: Path) -> str:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return (f" It holds {pickles}: pickle checkpoints are never loaded (they can run code); convert them "
            "to safetensors." if pickles else "")


def _read_tensors(files: list[Path], layout: str) -> dict[str, torch.Tensor]:
    sd, unknown = {}, []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    key = k if layout == "own" else from_published_key(k)
                    if key is None:
                        unknown.append(k)
                    else:
                        sd[key] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own types for corrupt headers
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{f.name} is not a readable safetensors file: {e}") from e
    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected tensors outside the known prefixes, e.g. "
                              f"{unknown[:5]}")
    return sd


def _check_keys(model, sd: dict[str, torch.Tensor]) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    optional = set(TIED_KEYS) if model.config.llm.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(sd) - optional)
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(sd) & set(expected) if sd[k].shape != expected[k])
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config; " + "; ".join(problems))


def load_pretrained(cls, path=None, device="cpu", dtype=None):
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if path == DEFAULT_MODEL_DIR and not path.exists():
        raise CheckpointError(f"the shipped default model is missing at {path}; train it with "
                              "`python -m train.default_model` or pass a checkpoint directory")
    config, layout = _read_config(path)
    files = _weight_files(path, layout)
    tokenizer = _load_tokenizer(path)
    with torch.device("meta"):
        model = cls(config, tokenizer=tokenizer)
    sd = _read_tensors(files, layout)
    _check_keys(model, sd)
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    _materialise_leftovers(model, device, dtype)
    return model.eval()


def _materialise_leftovers(model, device, dtype) -> None:
    """Tie the LM head and rebuild buffers that state dicts do not carry (rotary inverse frequencies)."""
    if model.config.llm.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    rotary = model.llm.model.rotary_emb
    if any(b.is_meta for b in rotary.buffers()):
        with torch.device(device):
            model.llm.model.rotary_emb = type(rotary)(config=model.llm.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left uninitialised after loading: {left[:8]}")
    model.to(device=device, dtype=dtype)


def _load_tokenizer(path: Path):
    if not (path / "tokenizer.json").exists():
        return None
    # The fast-tokenizer class reads tokenizer.json directly; AutoTokenizer would try to resolve the
    # published config's custom model_type first.
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(path))
