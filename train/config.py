"""Training configuration: composed dataclasses resolved as defaults <- YAML recipe <- CLI `a.b=c`.

The resolved config is written into the run folder and into every checkpoint, so a run can always be
told apart and resumed from what it saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .stages import PAPER_STAGES, StageArgs

PRECISIONS = ("fp32", "bf16", "auto")
MAX_SEED = 2**32 - 1  # seeds feed torch (seed * 1000 + rank must fit 64 bits) and numpy's generators


class SettingsError(ValueError):
    """A setting that cannot work (wrong type, out of range, a missing file); `python -m train` prints it
    as one line instead of a traceback."""


@dataclass
class DataArgs:
    source: str = "shapes"  # "shapes" (generated on the fly) or a path to a JSONL file of own data
    image_size: int = 64
    seed: int = 0
    cond_dropout: float = 0.1  # per condition branch (editing drops text, and text + image, each this often)
    # Editing's x0 loss weighs the decoder tokens whose pixels the edit changes (1 + this) against the
    # tokens it must copy (1); 0 is the plain mean. Most of a target is copied, so the plain loss spends
    # little on what the instruction asks (README, "The default model").
    edit_change_weight: float = 0.0
    lm_corpus_lines: int = 20000
    vqa_history: float = 0.3  # shapes VQA samples (single-image) that continue a conversation of 1-2 turns


@dataclass
class OptimArgs:
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1  # cosine decay to this fraction of the stage's learning rate


@dataclass
class LoRAArgs:
    enabled: bool = False
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Linear layers (by name suffix) that get adapters inside the trainable components.
    decoder_targets: tuple[str, ...] = ("qkv", "proj", "linear1", "linear2", "img_mlp.0", "img_mlp.2",
                                        "txt_mlp.0", "txt_mlp.2")
    refiner_targets: tuple[str, ...] = ("self_attn_qkv", "self_attn_proj", "mlp.fc1", "mlp.fc2")
    llm_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainArgs:
    preset: str = "shapes"
    # Changes to the preset's model config, "section.field": value (e.g. {"adapter.position_buckets": 4});
    # ignored with `init`, whose checkpoint brings its own config.
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # checkpoint directory to start from instead of a random preset
    out_dir: str = "runs/default"
    export: str | None = None  # where the final model is saved (own format); default out_dir/final
    stages: list[StageArgs] = field(default_factory=lambda: [dataclasses.replace(s) for s in PAPER_STAGES])
    only_stages: list[str] | None = None  # run just these stage names (in recipe order)
    step_scale: float = 1.0  # multiplies every stage's steps (small runs of the paper recipe)
    batch_scale: float = 1.0  # multiplies every stage's batch size
    lr_scale: float = 1.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    threads: int | None = None
    cpu: bool = False  # force CPU even where CUDA exists (accelerate's cpu=True)
    # "bf16": losses run under bf16 autocast (weights, optimizer and targets stay float32); on 2 CPU
    # cores with AVX512-BF16 it makes stage 4 1.39x and stage 5 1.26x faster (README), and the LLM stages
    # no faster. On a CPU without native bf16 (AVX2 only) it makes every step ~10x slower, so "auto" picks
    # bf16 only where ovis_u1.acceleration.bf16_is_native says the device has it, fp32 elsewhere.
    precision: str = "fp32"
    progress: bool = True
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    lora: LoRAArgs = field(default_factory=LoRAArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _coerce(cls, value, where: str):
    """Turn YAML/JSON values into the dataclass field types (nested dataclasses, tuples, stage lists)."""
    if dataclasses.is_dataclass(cls):
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise SettingsError(f"{where} must be a mapping, got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise SettingsError(f"unknown setting(s) {unknown} in {where}; known: {sorted(fields)}")
        base = cls()
        for k, v in value.items():
            setattr(base, k, _coerce_field(cls, fields[k], v, f"{where}.{k}", getattr(base, k)))
        return base
    return value


def _coerce_field(owner, f, v, where, current):
    if f.name == "stages":
        if not isinstance(v, list):
            raise SettingsError(f"{where} must be a list of stages")
        return [_coerce(StageArgs, s, f"{where}[{i}]") for i, s in enumerate(v)]
    if dataclasses.is_dataclass(current):
        return _coerce(type(current), v, where)
    if isinstance(current, tuple) and isinstance(v, list):
        return tuple(v)
    return v


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(args: TrainArgs, item: str) -> None:
    """`a.b=c` (also `stages.3.steps=100` or `stages.stage0.steps=100`)."""
    if "=" not in item:
        raise SettingsError(f"override {item!r} must look like key=value (e.g. stages.0.steps=100)")
    key, raw = item.split("=", 1)
    value = _parse_scalar(raw)
    parts = key.split(".")
    obj: Any = args
    for i, part in enumerate(parts[:-1]):
        if isinstance(obj, list):
            obj = _stage(obj, part, key)
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise SettingsError(f"unknown setting {'.'.join(parts[:i + 1])!r} in override {item!r}")
    last = parts[-1]
    if not hasattr(obj, last):
        raise SettingsError(f"unknown setting {key!r}; {type(obj).__name__} has "
                         f"{sorted(f.name for f in dataclasses.fields(obj))}")
    current = getattr(obj, last)
    if dataclasses.is_dataclass(current) or (obj is args and last == "stages"):  # a whole section at once
        value = _coerce_field(type(obj), next(f for f in dataclasses.fields(obj) if f.name == last), value, key,
                              current)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    setattr(obj, last, value)


def _stage(stages: list[StageArgs], part: str, key: str) -> StageArgs:
    if part.isdigit() and int(part) < len(stages):
        return stages[int(part)]
    for s in stages:
        if s.name == part:
            return s
    raise SettingsError(f"no stage {part!r} in override {key!r}; stages: {[s.name for s in stages]}")


def resolve(recipe: str | Path | None = None, overrides: list[str] | None = None) -> TrainArgs:
    args = TrainArgs()
    if recipe is not None:
        path = Path(recipe)
        if not path.exists():
            known = sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml"))
            candidate = Path(__file__).parent / "recipes" / f"{recipe}.yaml"
            if not candidate.exists():
                raise FileNotFoundError(f"recipe {recipe!r} not found; built-in recipes: {known}")
            path = candidate
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise SettingsError(f"recipe {path} cannot be read as YAML: {' '.join(str(e).split())}") from None
        args = _coerce(TrainArgs, data, str(path))
    for item in overrides or []:
        apply_override(args, item)
    check(args)
    return args


def check(args: TrainArgs) -> None:
    """Every setting of the right type and range, before anything runs: a bad one is a SettingsError
    naming it and what is allowed, never a traceback minutes into a run."""
    if args.precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {list(PRECISIONS)}, got {args.precision!r}")
    _number(args, "seed", 0, MAX_SEED, integer=True)
    for name in ("log_every", "ckpt_every", "keep_checkpoints"):
        _number(args, name, 1, None, integer=True)
    if args.threads is not None:
        _number(args, "threads", 1, None, integer=True, note=" (or leave it unset)")
    _number(args, "step_scale", 0, None)
    for name in ("batch_scale", "lr_scale"):
        _number(args, name, 0, None, low_open=True)
    for name in ("cpu", "progress"):
        if not isinstance(getattr(args, name), bool):
            raise SettingsError(f"{name} must be true or false, got {getattr(args, name)!r}")
    for name in ("preset", "out_dir"):
        if not isinstance(getattr(args, name), str) or not getattr(args, name):
            raise SettingsError(f"{name} must be a non-empty string, got {getattr(args, name)!r}")
    for name in ("init", "export"):
        if getattr(args, name) is not None and (not isinstance(getattr(args, name), str) or not getattr(args, name)):
            raise SettingsError(f"{name} must be a path (or null), got {getattr(args, name)!r}")
    from ovis_u1.config import PRESETS
    if args.init is None and args.preset not in PRESETS:
        raise SettingsError(f"preset {args.preset!r} is not one of {sorted(PRESETS)}")
    if args.init is not None and not (Path(args.init) / "config.json").exists():
        why = "does not exist" if not Path(args.init).exists() else "holds no config.json (not a checkpoint)"
        raise SettingsError(f"init {args.init!r} {why}; give a checkpoint directory to start from, or null")
    if not isinstance(args.preset_overrides, dict):
        raise SettingsError("preset_overrides must be a mapping of 'section.field' to values, "
                            f"got {args.preset_overrides!r}")
    # Before the data checks: with vqa_kinds set, what is wrong is the choice of source, not the file.
    kinds = [s.name for s in args.stages if s.vqa_kinds]
    if kinds and args.data.source != "shapes":
        raise SettingsError(f"stages {kinds} set vqa_kinds, but vqa_kinds choose shapes-world questions and "
                            f"data.source is {args.data.source!r}; drop them or train on data.source=shapes")
    _check_data(args.data)
    _check_optim(args.optim)
    _check_lora(args.lora)
    if not isinstance(args.stages, list) or not args.stages:
        raise SettingsError(f"stages must be a non-empty list of stages, got {args.stages!r}")
    for stage in args.stages:
        try:
            stage.validate()
        except ValueError as e:
            raise SettingsError(str(e)) from None
    names = [s.name for s in args.stages]
    if args.only_stages is not None:
        if not isinstance(args.only_stages, list) or not all(isinstance(n, str) for n in args.only_stages):
            raise SettingsError(f"only_stages must be a list of stage names, got {args.only_stages!r}")
        unknown = [n for n in args.only_stages if n not in names]
        if unknown:
            raise SettingsError(f"only_stages names unknown stages {unknown}; have {names}")


def _check_data(data: DataArgs) -> None:
    _number(data, "image_size", 32, 4096, integer=True, where="data.")
    if data.image_size % 16:
        raise SettingsError(f"data.image_size must be a multiple of 16 (the VAE and patch grid divide it), "
                            f"got {data.image_size}")
    _number(data, "seed", 0, MAX_SEED, integer=True, where="data.")
    _number(data, "lm_corpus_lines", 1, None, integer=True, where="data.")
    _number(data, "edit_change_weight", 0, None, where="data.")
    for name, hi in (("cond_dropout", 0.5), ("vqa_history", 1.0)):  # fractions of the samples
        _number(data, name, 0, hi, where="data.")
    if not isinstance(data.source, str) or not data.source:
        raise SettingsError(f"data.source must be 'shapes' or the path of a JSONL file, got {data.source!r}")
    if data.source != "shapes":
        path = Path(data.source)
        if not path.exists():
            raise SettingsError(f"data.source {data.source!r} does not exist; give a JSONL file of own "
                                "data (README, 'Training') or 'shapes'")
        if not path.is_file():
            raise SettingsError(f"data.source {data.source!r} is not a regular file; give a JSONL file, one "
                                "record a line")
        if path.stat().st_size == 0:
            raise SettingsError(f"data.source {data.source!r} is empty; it needs JSONL records, one a line")


def _check_optim(optim: OptimArgs) -> None:
    _number(optim, "weight_decay", 0, None, where="optim.")
    _number(optim, "grad_clip", 0, None, where="optim.", note=" (0 turns clipping off)")
    _number(optim, "warmup_frac", 0, 1, where="optim.")
    _number(optim, "min_lr_frac", 0, 1, where="optim.")
    betas = optim.betas
    if not isinstance(betas, tuple) or len(betas) != 2 or any(
            isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1 for b in betas):
        raise SettingsError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")


def _check_lora(lora: LoRAArgs) -> None:
    if not isinstance(lora.enabled, bool):
        raise SettingsError(f"lora.enabled must be true or false, got {lora.enabled!r}")
    _number(lora, "rank", 1, None, integer=True, where="lora.")
    _number(lora, "alpha", 0, None, where="lora.", low_open=True)
    _number(lora, "dropout", 0, 1, where="lora.", high_open=True)
    for name in ("decoder_targets", "refiner_targets", "llm_targets"):
        value = getattr(lora, name)
        if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
            raise SettingsError(f"lora.{name} must be a list of layer-name suffixes, got {value!r}")


def _number(obj, name: str, low, high, integer: bool = False, low_open: bool = False, high_open: bool = False,
            where: str = "", note: str = "") -> None:
    value = getattr(obj, name)
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
        raise SettingsError(f"{where}{name} must be {kind} in {lo}{hi}{note}, got {value!r}")
