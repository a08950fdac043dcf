"""Saving and loading: the project's own format and the published Ovis-U1-3B directory layout.

Own format: `config.json` ({"format": "ovis-u1-compact", "config": ...}) + `model.safetensors` with this
package's parameter names + tokenizer files. Published layout: `config.json` with `model_type: ovis_u1`,
sharded `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, `preprocessor_config.json`,
tokenizer files; parameter names under the published prefixes (PUBLISHED_PREFIXES). Loading is loud: any
missing, unexpected or wrongly shaped tensor raises `CheckpointError` naming them. Pickle is never read.
`load_model` is the one loader behind the app, the CLI and the Space: it takes a directory, a hub id, or
nothing for $OVIS_U1_CHECKPOINT or the shipped model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import stat
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
    if isinstance(llm.hidden_size, int) and d.get("hidden_size") is not None and d["hidden_size"] != llm.hidden_size:
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


# The names a save writes. Anything else in a checkpoint folder (a README, notes, a user's file) is the user's:
# a save carries it over into the new checkpoint and never deletes it.
CHECKPOINT_FILE = re.compile(r"config\.json|preprocessor_config\.json|model\.safetensors(\.index\.json)?|"
                             r"model-\d+-of-\d+\.safetensors|tokenizer\.json|tokenizer_config\.json|"
                             r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja")


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the new checkpoint `tmp` at `path`. Into a fresh path it is one rename. Over an old checkpoint it is
    two (old away to `.<name>.old`, new in); a crash between them leaves the old one there, which loading
    falls back to and the next save restores (`_restore_interrupted`)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    _carry_foreign(path, tmp)
    old = _old_copy(path)
    if old.exists():  # a crash after an earlier swap's second rename: `path` already holds all of it
        shutil.rmtree(old)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


def _carry_foreign(path: Path, tmp: Path) -> None:
    """Hard-link (or copy, where links are not possible) the user's files of `path` into the new checkpoint."""
    for item in sorted(path.iterdir()):
        if CHECKPOINT_FILE.fullmatch(item.name) or (tmp / item.name).exists():
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, tmp / item.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(item, tmp / item.name)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _restore_interrupted(path: Path) -> None:
    old = _old_copy(path)
    if not path.exists() and not path.is_symlink() and (old / "config.json").exists():
        os.replace(old, path)


def save_pretrained(model, path, layout: str = "own", max_shard_size: int = 4 * 2**30) -> None:
    if layout not in ("own", "published"):
        raise ValueError(f"layout {layout!r}; choose 'own' or 'published'")
    path = Path(path)
    _restore_interrupted(path)
    check_save_target(path)
    tmp = _atomic_dir(path)
    try:
        sd = state_for_saving(model)
        _refuse_non_finite(sd)
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


def check_save_target(path: Path) -> None:
    """The save replaces the checkpoint at `path` (keeping the user's other files), so never let `path` be a
    file or a folder of something else. Callers that save at the end of long work check it up front."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; save_pretrained writes a checkpoint directory")
    if path.is_dir() and not (path / "config.json").exists() and any(path.iterdir()):
        raise CheckpointError(f"{path} is a non-empty directory that holds no checkpoint (no config.json); "
                              "refusing to replace its contents: save to a new or empty directory")


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
    if not cfg_file.exists() and not cfg_file.is_symlink():
        raise CheckpointError(f"{path} has no config.json, so it is not an Ovis-U1 checkpoint."
                              f"{_pickle_hint(path)}")
    raw = _read_json(cfg_file, "config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object, got {_json_type(raw)}")
    if raw.get("format") == OWN_FORMAT:
        config, layout = _own_config(raw, cfg_file), "own"
    elif raw.get("model_type") == "ovis_u1":
        config, layout = _published_config(raw, cfg_file), "published"
    else:
        raise CheckpointError(f"{cfg_file}: neither this package's format (format={OWN_FORMAT!r}) nor the "
                              f"published one (model_type='ovis_u1'); got keys {sorted(raw)[:8]}")
    _check_config_values(config, cfg_file)
    return config, layout


def _weight_files(path: Path, layout: str) -> dict[Path, set[str] | None]:
    """The weight files the format names -> the tensor names the index assigns to each (None: no index).
    Own format: model.safetensors. Published: the index's shards, or model.safetensors without an index.
    Any other *.safetensors in the folder is never read: a stray file must not change the model."""
    index = path / "model.safetensors.index.json"
    if layout == "published" and (index.exists() or index.is_symlink()):
        return _index_shards(path, index)
    single = path / "model.safetensors"
    if not single.exists() and not single.is_symlink():
        others = sorted(p.name for p in path.glob("*.safetensors"))
        named = (f" (it holds {others[:5]}, which the format does not name; a published checkpoint in shards "
                 "needs its model.safetensors.index.json)" if others else "")
        raise CheckpointError(f"no model.safetensors weights in {path}{named}.{_pickle_hint(path)}")
    _regular_file(single, "weights file")
    return {single: None}


def _index_shards(path: Path, index: Path) -> dict[Path, set[str]]:
    raw = _read_json(index, "weight index")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{index} must hold a JSON object with a 'weight_map', got {_json_type(raw)}")
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object of tensor name -> "
                              f"shard file name, got {_json_type(weight_map)}")
    shards: dict[Path, set[str]] = {}
    for key, name in weight_map.items():
        # Only plain file names inside the checkpoint folder: an index must not reach elsewhere on disk.
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", "..") \
                or "\\" in name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: weight_map[{key!r}] = {name!r}; entries must be the file name of "
                                  "a .safetensors shard in the checkpoint folder (no folders, no '..')")
        shards.setdefault(path / name, set()).add(key)
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise CheckpointError(f"index names shards that are missing from {path}: {missing}")
    for shard in shards:
        _regular_file(shard, "weight shard")
    return shards


def _pickle_hint(path: Path) -> str:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    return (f" It holds {pickles}: pickle checkpoints are never loaded (they can run code); convert them "
            "to safetensors." if pickles else "")


def _read_tensors(files: dict[Path, set[str] | None], layout: str) -> dict[str, torch.Tensor]:
    sd, unknown, origin = {}, [], {}
    for f, listed in files.items():
        try:
            with safe_open(str(f), framework="pt") as fh:
                names = set(fh.keys())
                if listed is not None and names != listed:
                    _index_mismatch(f, names, listed)
                for k in sorted(names):
                    key = k if layout == "own" else from_published_key(k)
                    if key is None:
                        unknown.append(k)
                        continue
                    if key in origin:
                        raise CheckpointError(f"tensor {k!r} is stored twice, in {origin[key].name} and {f.name}; "
                                              "a checkpoint holds each tensor once")
                    origin[key] = f
                    sd[key] = _checked_tensor(fh.get_tensor(k), f, k)
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
                              "`python -m train --recipe default` or pass a checkpoint directory")
    path = _interrupted_swap(path)
    config, layout = _read_config(path)
    files = _weight_files(path, layout)
    tokenizer = _load_tokenizer(path)
    try:
        with torch.device("meta"):
            model = cls(config, tokenizer=tokenizer)
    except (ValueError, TypeError, AssertionError, RuntimeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{path / 'config.json'} describes a model that cannot be built: {e}") from e
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
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.json").is_symlink():
        return None
    _check_tokenizer_files(path)
    # The fast-tokenizer class reads tokenizer.json directly; AutoTokenizer would try to resolve the
    # published config's custom model_type first.
    from transformers import PreTrainedTokenizerFast
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as e:  # the tokenizers library reports a bad file as a bare Exception
        raise CheckpointError(f"{path / 'tokenizer.json'} is not a usable tokenizer: "
                              f"{' '.join(str(e).split())[:300]}") from e


# ---- naming a model: the one loader behind the app, the CLI and the Space ----------------------------------
CHECKPOINT_ENV = "OVIS_U1_CHECKPOINT"  # what the app and the CLI load when no checkpoint is named
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # 'AIDC-AI/Ovis-U1-3B'


def resolve_checkpoint(spec: str | os.PathLike | None = None) -> Path:
    """The checkpoint directory `spec` names: an existing directory as it is; a hub id (`org/name`)
    fetched with huggingface_hub's `snapshot_download` (into its cache, which later calls read); nothing:
    $OVIS_U1_CHECKPOINT when set, else the shipped default model."""
    spec = spec or os.environ.get(CHECKPOINT_ENV) or None
    if spec is None:
        return DEFAULT_MODEL_DIR
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(str(spec)):
        raise CheckpointError(f"checkpoint {str(spec)!r} is neither an existing directory nor a hub id like "
                              "'AIDC-AI/Ovis-U1-3B'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(spec)))
    except Exception as e:  # offline, unknown repo, gated, ...: all mean "not available here"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{str(spec)!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {reason[:300]}). Where no hub is reachable, download it elsewhere "
            f"(`hf download {spec} --local-dir DIR`), copy it here and load that directory "
            "(--checkpoint DIR).") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (half float32's memory: the published model fits one GPU), float32 elsewhere
    (CPUs without bfloat16 units run it slower than float32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DEVICE_TYPES = ("cpu", "cuda", "mps")


def checked_device(device: str | torch.device | None, label: str = "device") -> torch.device:
    """`device` as a torch.device that exists on this machine (None: CUDA when available, else the CPU), or a
    ValueError saying what is allowed."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    allowed = "cpu, cuda, cuda:N (N a GPU index) or mps"
    kind, _, index = text.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise ValueError(f"{label} {text!r} is not a device; use {allowed}")
    device = torch.device(text)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{label} {text} but no CUDA device is available")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{label} {text} but this machine has {count} CUDA device(s): cuda:0 to "
                             f"cuda:{count - 1}")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{label} {text} but no MPS device is available")
    return device


def load_model(spec: str | os.PathLike | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None):
    """The model `spec` names (see `resolve_checkpoint`: a directory, a hub id, or nothing for
    $OVIS_U1_CHECKPOINT or the shipped model), on `device` (default: CUDA when available, else the CPU)
    in `dtype` (default: `default_dtype`), ready for inference."""
    from .model import OvisU1
    device = checked_device(device)
    return OvisU1.from_pretrained(resolve_checkpoint(spec), device=device,
                                  dtype=dtype or default_dtype(device)).eval()


# ---- the gate: what a checkpoint folder may hold ------------------------------------------------------------
# Loading reads only the files the format names, each checked before use: regular files only (a FIFO under a
# checkpoint's name would block open() forever), JSON of the right types, config values of the right type and
# range, floating-point tensors with finite values. Every refusal is a CheckpointError naming file and field.
MAX_JSON_BYTES = 64 * 2**20  # far above any config, index or tokenizer this format writes
FORMAT_VERSION = 1
OWN_KEYS = ("format", "format_version", "config")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Sub-objects of a published config.json that must be JSON objects when present.
PUBLISHED_SECTIONS = (("llm_config",), ("visual_tokenizer_config",), ("visual_tokenizer_config", "backbone_config"),
                      ("visual_generator_config",), ("visual_generator_config", "vae_config"),
                      ("compact_generation_config",))
# Integer fields that must be at least 1 (sizes, counts, dimensions); other integers must be >= 0.
_POSITIVE_INTS = {
    "patch_size", "hidden_size", "num_heads", "intermediate_size", "pos_grid", "vocab_size", "hidden_stride",
    "max_images", "min_pixels", "max_pixels", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "in_dim", "in_channels", "out_channels", "axes_dim", "theta", "vec_in_dim",
    "context_in_dim", "time_embed_dim", "latent_channels", "block_out_channels", "layers_per_block",
    "norm_num_groups", "height", "width", "num_inference_steps", "size_multiple", "min_side", "max_side",
    "edit_max_pixels", "blank_image_max_pixels", "max_new_tokens", "multimodal_max_length",
    "fast_num_inference_steps", "window_size",
}  # block counts (depth, num_layers, ...) may be 0: a refiner of depth 0 is an ablation the project trains
_POSITIVE_FLOATS = {"norm_eps", "rms_norm_eps", "rope_theta", "mlp_ratio", "min_t", "scaling_factor", "image_std"}
_NON_NEGATIVE_FLOATS = {"guidance_scale", "edit_guidance_scale", "image_guidance_scale", "fast_cache_threshold"}
_FIXED_LENGTH = {"image_mean": 3, "image_std": 3, "fast_guidance_interval": 2}


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _regular_file(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"the {what} {path} is missing (or a broken link)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise CheckpointError(f"{path} is {kind}; the {what} must be a regular file")


def _read_json(path: Path, what: str):
    """A checkpoint's JSON file, read without blocking: O_NONBLOCK and fstat refuse a FIFO put in its place."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"the {what} file {path} is missing (or a broken link)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise CheckpointError(f"{path} is {kind}; the {what} file must be a regular JSON file")
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(MAX_JSON_BYTES + 1)
        except OSError as e:
            raise CheckpointError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is over {MAX_JSON_BYTES // 2**20} MiB; not a {what} file this format writes")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start}); the {what} file must be JSON") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a {what} file") from None


def _own_config(raw: dict, cfg_file: Path) -> OvisU1Config:
    unknown = sorted(set(raw) - set(OWN_KEYS))
    if unknown:
        raise CheckpointError(f"{cfg_file}: unknown top-level field(s) {unknown}; this format has {list(OWN_KEYS)}")
    version = raw.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format_version {version!r} is not one this package reads "
                              f"({FORMAT_VERSION}); a newer ovis-u1 may have written it")
    body = raw.get("config")
    if not isinstance(body, dict):
        raise CheckpointError(f"{cfg_file}: field 'config' must be an object of config sections, got "
                              f"{_json_type(body)}")
    sections = {f.name for f in dataclasses.fields(OvisU1Config)}
    unknown = sorted(set(body) - sections)
    if unknown:
        raise CheckpointError(f"{cfg_file}: unknown config section(s) {unknown}; known: {sorted(sections)}")
    for name, value in body.items():
        if name != "preset" and not isinstance(value, dict):
            raise CheckpointError(f"{cfg_file}: config.{name} must be an object, got {_json_type(value)}")
    try:
        return OvisU1Config.from_dict(body)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def _published_config(raw: dict, cfg_file: Path) -> OvisU1Config:
    for keys in PUBLISHED_SECTIONS:
        obj = raw
        for k in keys[:-1]:
            obj = obj.get(k, {})
        if keys[-1] in obj and not isinstance(obj[keys[-1]], dict):
            raise CheckpointError(f"{cfg_file}: {'.'.join(keys)} must be an object, got {_json_type(obj[keys[-1]])}")
    preprocessor = _read_preprocessor(cfg_file.parent)
    try:
        return config_from_published(raw, preprocessor)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise CheckpointError(f"{cfg_file}: a field of the wrong type or value ({type(e).__name__}: {e})") from e


def _read_preprocessor(path: Path) -> dict | None:
    """preprocessor_config.json of a published-layout checkpoint (pixel bounds, mean/std), if it has one."""
    f = path / "preprocessor_config.json"
    if not f.exists() and not f.is_symlink():
        return None
    pp = _read_json(f, "preprocessor config")
    if not isinstance(pp, dict):
        raise CheckpointError(f"{f} must hold a JSON object, got {_json_type(pp)}")
    if pp.get("do_center_crop") or pp.get("do_resize") is False or pp.get("resample", 3) != 3:
        raise CheckpointError(f"{f}: only a bicubic resize without centre crop is supported (the published visual "
                              f"tokenizer asserts the same), got do_center_crop={pp.get('do_center_crop')}, "
                              f"do_resize={pp.get('do_resize')}, resample={pp.get('resample')}")
    for key in ("min_pixels", "max_pixels"):
        if key in pp and (isinstance(pp[key], bool) or not isinstance(pp[key], int) or pp[key] < 1):
            raise CheckpointError(f"{f}: {key} must be a positive integer, got {pp[key]!r}")
    for key in ("image_mean", "image_std"):
        if key in pp and (not isinstance(pp[key], list) or len(pp[key]) != 3
                          or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pp[key])):
            raise CheckpointError(f"{f}: {key} must be a list of 3 numbers, got {pp[key]!r}")
    return pp


def _check_config_values(cfg: OvisU1Config, cfg_file: Path) -> None:
    """Every config field has its default's type (bool, int, float, str, tuple) and a sane range."""
    if not isinstance(cfg.preset, str):
        raise CheckpointError(f"{cfg_file}: config.preset must be a string, got {_json_type(cfg.preset)}")
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            if f.default is dataclasses.MISSING:
                continue
            value = getattr(sub, f.name)
            problem = _value_problem(f.name, value, f.default)
            if problem:
                raise CheckpointError(f"{cfg_file}: config field {section.name}.{f.name} {problem}, got {value!r}")
    for section, lo, hi in (("adapter", "min_pixels", "max_pixels"), ("generation", "min_side", "max_side")):
        sub = getattr(cfg, section)
        if getattr(sub, lo) > getattr(sub, hi):
            raise CheckpointError(f"{cfg_file}: config field {section}.{lo} ({getattr(sub, lo)}) is above "
                                  f"{section}.{hi} ({getattr(sub, hi)})")


def _value_problem(name: str, value, default) -> str | None:
    if isinstance(default, tuple):
        if not isinstance(value, (tuple, list)):
            return "must be a list"
        if name in _FIXED_LENGTH and len(value) != _FIXED_LENGTH[name]:
            return f"must list {_FIXED_LENGTH[name]} values"
        element = default[0] if default else 0
        return next((f"has an element that {p}" for v in value if (p := _value_problem(name, v, element))), None)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        low = 1 if name in _POSITIVE_INTS else 0
        return None if value >= low else f"must be >= {low}"
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if not math.isfinite(value):
            return "must be a finite number"
        if name in _POSITIVE_FLOATS and value <= 0:
            return "must be > 0"
        if name in _NON_NEGATIVE_FLOATS and value < 0:
            return "must be >= 0"
        return None
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    return None


def _checked_tensor(t: torch.Tensor, f: Path, name: str) -> torch.Tensor:
    """Every weight of this model is floating point: an integer, bool or complex tensor would be cast
    silently (a complex one loses its imaginary part), and NaN or inf would load and draw black images."""
    if not t.is_floating_point():
        raise CheckpointError(f"{f.name}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                              "the weights of this model are floating point")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{f.name}: tensor {name!r} holds {bad} NaN or infinite value(s) of {t.numel()}; "
                              "refusing a checkpoint with non-finite weights")
    return t


def _refuse_non_finite(sd: dict[str, torch.Tensor]) -> None:
    """A save never writes weights that loading would refuse."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"refusing to save non-finite weights: {len(bad)} tensor(s) hold NaN or inf, "
                              f"e.g. {bad[:5]}")


def _index_mismatch(f: Path, names: set[str], listed: set[str]) -> None:
    extra, absent = sorted(names - listed), sorted(listed - names)
    detail = "; ".join(part for part in (f"not listed for it: {extra[:5]}" if extra else "",
                                         f"listed but absent: {absent[:5]}" if absent else "") if part)
    raise CheckpointError(f"{f.name} does not hold the tensors model.safetensors.index.json assigns to it ({detail})")


def _check_tokenizer_files(path: Path) -> None:
    for name in TOKENIZER_FILES:
        f = path / name
        if not f.exists() and not f.is_symlink():
            continue
        raw = _read_json(f, "tokenizer")
        if not isinstance(raw, dict):
            raise CheckpointError(f"{f} must hold a JSON object, got {_json_type(raw)}")
        if "auto_map" in raw:  # points transformers at code shipped with the checkpoint; this loader runs none
            raise CheckpointError(f"{f}: field 'auto_map' names custom tokenizer code; checkpoints that need "
                                  "code to load are refused (remove auto_map to use the plain fast tokenizer)")
    raw = _read_json(path / "tokenizer.json", "tokenizer")
    if not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path / 'tokenizer.json'}: field 'model' must be an object describing the "
                              f"tokenizer model, got {_json_type(raw.get('model'))}")


def _old_copy(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _interrupted_swap(path: Path) -> Path:
    """A save swaps a checkpoint in with two renames (old away, new in). A crash between them leaves
    only the previous checkpoint, under `.<name>.old`: load that one, and say so."""
    old = _old_copy(path)
    if path.exists() or not (old / "config.json").exists():
        return path
    warnings.warn(f"{path} is missing but {old} holds the checkpoint a save was replacing when it was "
                  "interrupted; loading that one (the next save to this path restores it)", stacklevel=3)
    return old
