"""Training configuration: composed dataclasses resolved as defaults <- YAML recipe <- CLI `a.b=c`.

The resolved config is written into the run folder and into every checkpoint, so a run can always be
told apart and resumed from what it saved.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .stages import PAPER_STAGES, StageArgs

PRECISIONS = ("fp32", "bf16", "auto")


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
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} in {where}; known: {sorted(fields)}")
        base = cls()
        for k, v in value.items():
            setattr(base, k, _coerce_field(cls, fields[k], v, f"{where}.{k}", getattr(base, k)))
        return base
    return value


def _coerce_field(owner, f, v, where, current):
    if f.name == "stages":
        if not isinstance(v, list):
            raise ValueError(f"{where} must be a list of stages")
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
        raise ValueError(f"override {item!r} must look like key=value (e.g. stages.0.steps=100)")
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
            raise ValueError(f"unknown setting {'.'.join(parts[:i + 1])!r} in override {item!r}")
    last = parts[-1]
    if not hasattr(obj, last):
        raise ValueError(f"unknown setting {key!r}; {type(obj).__name__} has "
                         f"{sorted(f.name for f in dataclasses.fields(obj))}")
    current = getattr(obj, last)
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
    raise ValueError(f"no stage {part!r} in override {key!r}; stages: {[s.name for s in stages]}")


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
        data = yaml.safe_load(path.read_text()) or {}
        args = _coerce(TrainArgs, data, str(path))
    for item in overrides or []:
        apply_override(args, item)
    if args.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {args.precision!r}")
    weight = args.data.edit_change_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ValueError(f"data.edit_change_weight must be a finite number >= 0, got {weight!r}")
    for name, hi in (("cond_dropout", 0.5), ("vqa_history", 1.0)):  # fractions of the samples
        value = getattr(args.data, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
            raise ValueError(f"data.{name} must be a number in [0, {hi}], got {value!r}")
    for stage in args.stages:
        stage.validate()
    kinds = [s.name for s in args.stages if s.vqa_kinds]
    if kinds and args.data.source != "shapes":
        raise ValueError(f"stages {kinds} set vqa_kinds, but vqa_kinds choose shapes-world questions and "
                         f"data.source is {args.data.source!r}; drop them or train on data.source=shapes")
    if not isinstance(args.preset_overrides, dict):
        raise ValueError("preset_overrides must be a mapping of 'section.field' to values, "
                         f"got {args.preset_overrides!r}")
    return args
