"""The one visible training loop: stages in order, mixed-task batches, exact resume, atomic checkpoints.

Runs under Hugging Face accelerate: one process on CPU, DDP/FSDP when launched on several GPUs
(`accelerate launch -m train ...`) or several CPU ranks (`torchrun --nproc_per_node 2 -m train ...`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ovis_u1.acceleration import bf16_is_native
from ovis_u1.checkpoint import CheckpointError, check_save_target, state_for_saving
from ovis_u1.config import OvisU1Config
from ovis_u1.model import OvisU1

from .config import DataArgs, TrainArgs, check
from .data import TaskData
from .lora import apply_lora, lora_parameters, merge_lora
from .losses import TASK_LOSSES
from .stages import StageArgs


class RunError(RuntimeError):
    """Something that stops a run (non-finite numbers, an out folder that cannot be written, another
    trainer on it); `python -m train` prints it as one line. What was saved before it stays intact."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that an exact resume needs."""

    stage_index: int = 0
    stage_step: int = 0  # steps done in the current stage
    global_step: int = 0
    drawn: dict[str, int] = field(default_factory=dict)  # samples drawn per task (data position)
    done: bool = False


class TrainingModule(nn.Module):
    """What DDP/FSDP wraps: one forward = the summed losses of a mixed-task batch."""

    def __init__(self, model: OvisU1, data: DataArgs, precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.loss_kwargs = {"t2i": {"cond_dropout": data.cond_dropout}, "edit": {"cond_dropout": data.cond_dropout}}
        self.bf16 = precision == "bf16"
        if self.bf16 and model.device.type == "cpu":
            # transformers' sdpa path takes PyTorch's CPU flash kernel, whose bf16 backward is ~3x slower
            # than float32; its eager path is two matmuls and a float32 softmax (see ovis_u1.layers.sdpa).
            model.llm.set_attn_implementation("eager")
        if self.bf16:  # the ViT's nn.RMSNorm sees bf16 input with float32 weights: correct, unfused
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")

    def forward(self, batches: dict[str, list], weights: dict[str, float], generator: torch.Generator):
        parts = {}
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for task, samples in batches.items():
                parts[task] = TASK_LOSSES[task](self.model, samples, generator,
                                                **self.loss_kwargs.get(task, {})).float()
        total = sum(weights[t] * parts[t] for t in parts) / sum(weights[t] for t in parts)
        return total, {t: float(v.detach()) for t, v in parts.items()}


# ---- model construction and freezing ----------------------------------------------------------------------
def override_config(config, overrides: dict):
    """A model config with `{"section.field": value}` changes; unknown names raise, listing the known ones."""
    for key, value in overrides.items():
        section, _, name = str(key).partition(".")
        sub = getattr(config, section, None)
        if not dataclasses.is_dataclass(sub) or not name:
            known = [f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))]
            raise ValueError(f"preset_overrides key {key!r} must be 'section.field' with a section of {known}")
        fields = {f.name for f in dataclasses.fields(sub)}
        if name not in fields:
            raise ValueError(f"preset_overrides key {key!r}: {section} has no field {name!r}; known: {sorted(fields)}")
        setattr(config, section, dataclasses.replace(sub, **{name: value}))
    return config


def build_model(args: TrainArgs, data: TaskData) -> OvisU1:
    if args.init:
        model = OvisU1.from_pretrained(args.init)
    else:
        from ovis_u1.config import get_preset
        from ovis_u1.tokenizer import build_tokenizer, default_corpus
        config = override_config(get_preset(args.preset), args.preset_overrides)
        torch.manual_seed(args.seed)
        tokenizer = build_tokenizer(default_corpus() + data.corpus(), vocab_size=config.llm.vocab_size)
        model = OvisU1(config, tokenizer=tokenizer)
    if args.lora.enabled:
        apply_lora(model, args.lora)
    return model


def set_trainable(model: OvisU1, stage: StageArgs, lora_enabled: bool = False) -> list[str]:
    """Freeze everything, then unfreeze the stage's components (only their LoRA weights when enabled)."""
    model.requires_grad_(False)
    components = model.components()
    for name in stage.trainable:
        module = components[name]
        adapters = lora_parameters(module) if lora_enabled else []
        if adapters:
            for p in adapters:
                p.requires_grad_(True)
        else:
            module.requires_grad_(True)
    model.train()
    model.vae.eval()  # frozen or not, it has no dropout/batch-norm; eval keeps diffusers quiet
    return [n for n, p in model.named_parameters() if p.requires_grad]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run trains in: "auto" is bf16 where the device has native bf16 matmuls, else fp32.
    An explicit bf16 is kept, with a warning where it will be emulated (several times slower)."""
    native = bf16_is_native(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        warnings.warn(f"precision=bf16 on a {device.type} device without native bf16 matmuls: PyTorch emulates "
                      "them, so steps run several times slower than fp32 (precision=auto would pick fp32 here)",
                      stacklevel=2)
    return precision


def lr_lambda(step: int, total: int, warmup_frac: float, min_frac: float) -> float:
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def calibrate_vae(model: OvisU1, data: TaskData, n: int = 256) -> None:
    """Set the VAE's shift/scale so normalised latents have zero mean and unit variance."""
    from .losses import images_to_tensor
    ae = model.vae.autoencoder.eval()
    z = torch.cat([ae.encode(images_to_tensor(data.batch("vae", i, 32), model.device)).latent_dist.mean
                   for i in range(0, n, 32)])
    cfg = model.config.vae
    cfg.shift_factor, cfg.scaling_factor = float(z.mean()), float(1.0 / z.std())


class WeightAverage:
    """An exponential moving average of a stage's trainable weights, kept in float32 beside them.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the first steps, far from
    where training ends, fade out quickly; n is the stage step, so a resumed run averages exactly as
    an uninterrupted one."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, updates_done: int) -> None:
        decay = min(self.decay, (1 + updates_done) / (10 + updates_done))
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names],
                             [self.params[n].detach().float() for n in names], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for n, p in self.params.items():
            p.copy_(self.shadow[n].to(p.dtype))

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.shadow):
            raise RuntimeError(f"the checkpoint's weight average covers {len(tensors)} tensors, the stage trains "
                               f"{len(self.shadow)}: it belongs to another stage or model")
        self.shadow = {n: t.float().clone() for n, t in tensors.items()}


# ---- checkpoints -------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """`write(tmp)` beside `path`, then rename it into place: a crash leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(out_dir: Path, model: OvisU1, optimizer, state: TrainState, args: TrainArgs,
                    generator: torch.Generator, keep: int, average: WeightAverage | None = None) -> Path:
    """Write into a temp folder, rename it into place, then move the `latest` pointer: a crash at any
    moment leaves the previous checkpoint intact and pointed to."""
    ckpts = out_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.global_step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckpts))
    try:
        weights = state_for_saving(model)
        bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
        if bad:  # a checkpoint that --resume would carry on from must hold usable weights
            raise RunError(f"refusing to checkpoint step {state.global_step}: {len(bad)} weight tensor(s) hold NaN "
                           f"or inf, e.g. {bad[:3]}")
        save_file(weights, tmp / "model.safetensors")
        (tmp / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer.state_dict())
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        if average is not None:
            save_file({n: t.contiguous().cpu() for n, t in average.shadow.items()}, tmp / "ema.safetensors")
        save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
        args.save(tmp / "train_config.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not also keep a half checkpoint forever
        raise
    final = ckpts / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpts / "latest", name)
    for old in sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, args: TrainArgs
                    ) -> tuple[OvisU1, TrainState, dict | None, torch.Tensor, dict[str, torch.Tensor] | None]:
    from transformers import PreTrainedTokenizerFast
    config = OvisU1Config.from_dict(json.loads((path / "model_config.json").read_text()))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"))
    model = OvisU1(config, tokenizer=tokenizer)
    if args.lora.enabled:
        apply_lora(model, args.lora)
    missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    missing = [k for k in missing if k != "llm.lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    state = TrainState(**json.loads((path / "state.json").read_text()))
    opt = None
    if (path / "optimizer.safetensors").exists():
        opt = _unflatten_optimizer(load_file(path / "optimizer.safetensors"),
                                   json.loads((path / "optimizer.json").read_text()))
    ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None
    return model, state, opt, load_file(path / "rng.safetensors")["generator"], ema


# ---- the loop ----------------------------------------------------------------------------------------------
def scaled_stages(args: TrainArgs) -> list[StageArgs]:
    stages = [dataclasses.replace(s, steps=max(0, round(s.steps * args.step_scale)),
                                  batch_size=max(1, round(s.batch_size * args.batch_scale)),
                                  lr=s.lr * args.lr_scale) for s in args.stages]
    if args.only_stages is not None:
        unknown = set(args.only_stages) - {s.name for s in stages}
        if unknown:
            raise ValueError(f"only_stages names unknown stages {sorted(unknown)}; have {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in args.only_stages]
    for s in stages:
        s.validate()
    return stages


def train(args: TrainArgs, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.cpu, kwargs_handlers=[DistributedDataParallelKwargs(
        find_unused_parameters=True)])
    out_dir = Path(args.out_dir)
    main = accelerator.is_main_process
    stages = scaled_stages(args)
    data = TaskData(args.data)
    for stage in stages:
        data.require(stage.tasks, stage.name)
    lock = None
    if main:
        with _writing(out_dir, "create the run folder"):
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run(out_dir)
            _check_fresh_or_resumed(out_dir, resume)
            try:  # the export comes last: a target it cannot replace must stop the run now, not hours later
                check_save_target(Path(args.export) if args.export else out_dir / "final")
            except CheckpointError as e:
                raise RunError(f"export: {e}") from None
            _remove_stale_temps(out_dir)
            args.save(out_dir / "train_config.json")
    try:
        return _train(args, accelerator, out_dir, stages, data, resume)
    finally:
        if lock is not None:
            lock.close()


def _train(args: TrainArgs, accelerator, out_dir: Path, stages: list[StageArgs], data: TaskData,
           resume: bool) -> Path:
    main = accelerator.is_main_process
    generator = torch.Generator()
    opt_state = ema_state = None
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        try:
            model, state, opt_state, rng, ema_state = load_checkpoint(ckpt, args)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            raise RunError(f"cannot resume from {ckpt}: {' '.join(str(e).split())[:300]}; it is damaged, so point "
                           f"{out_dir / 'checkpoints' / 'latest'} at the one before it (or remove --resume)") from e
        generator.set_state(rng)
        if main:
            with _writing(out_dir, "rewrite log.jsonl"):
                _truncate_log(out_dir / "log.jsonl", state.global_step)
    else:
        if resume and main:
            print(f"no checkpoint in {out_dir}; starting from scratch")
            with _writing(out_dir, "rewrite log.jsonl"):  # lines of a run killed before its first checkpoint
                _truncate_log(out_dir / "log.jsonl", 0)
        model = build_model(args, data)
        state = TrainState()
        generator.manual_seed(args.seed * 1000 + accelerator.process_index)
    model.to(accelerator.device)
    precision = resolve_precision(args.precision, accelerator.device)
    log = _Logger(out_dir, main, args.progress)
    if main and precision != args.precision:
        print(f"precision {args.precision} -> {precision} ({'native' if precision == 'bf16' else 'no native'} "
              f"bf16 matmuls on this {accelerator.device.type})", flush=True)

    while state.stage_index < len(stages):
        stage = stages[state.stage_index]
        trainable = set_trainable(model, stage, args.lora.enabled)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=args.optim.betas,
                                      weight_decay=args.optim.weight_decay)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
            opt_state = None
        average = WeightAverage(model, stage.ema) if stage.ema else None
        if average is not None and ema_state is not None:
            average.load(ema_state)
        elif average is not None and state.stage_step and main:
            warnings.warn(f"resuming {stage.name} at step {state.stage_step} from a checkpoint without a weight "
                          "average: the average starts again from the current weights", stacklevel=2)
        ema_state = None
        module, optimizer = accelerator.prepare(
            TrainingModule(model, args.data, precision), optimizer)
        log.stage(stage, len(trainable), sum(p.numel() for p in params))
        rows = stage.split_batch(stage.batch_size)
        world, rank = accelerator.num_processes, accelerator.process_index
        while state.stage_step < stage.steps:
            for g in optimizer.param_groups:
                g["lr"] = stage.lr * lr_lambda(state.stage_step, stage.steps, args.optim.warmup_frac,
                                               args.optim.min_lr_frac)
            t0 = time.perf_counter()
            batches = {}
            for task, n in rows.items():
                local = max(1, n // world)
                start = state.drawn.get(task, 0) + rank * local
                batches[task] = data.batch(task, start, local, stage.vqa_kinds)
                state.drawn[task] = state.drawn.get(task, 0) + local * world
            loss, parts = module(batches, stage.tasks, generator)
            step = f"{stage.name} step {state.stage_step + 1} (global step {state.global_step + 1})"
            if not _everywhere(accelerator, bool(torch.isfinite(loss.detach()))):
                losses = ", ".join(f"{t} {v:g}" for t, v in parts.items())
                raise RunError(_non_finite_message(f"{step}: the loss is {float(loss.detach()):g} ({losses})", out_dir))
            accelerator.backward(loss)
            if args.optim.grad_clip:
                norm = accelerator.clip_grad_norm_(params, args.optim.grad_clip)
                if not _everywhere(accelerator, bool(torch.isfinite(norm))):
                    raise RunError(_non_finite_message(f"{step}: the gradient norm is {float(norm):g}", out_dir))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update(state.stage_step)
            state.stage_step += 1
            state.global_step += 1
            log.step(state, stage, float(loss.detach()), parts, optimizer.param_groups[0]["lr"],
                     sum(len(b) for b in batches.values()) * world / (time.perf_counter() - t0), args.log_every)
            if state.stage_step == stage.steps:
                if average is not None:
                    if main:  # the last trained weights, for comparing them with the average
                        raw = {n: p.detach().contiguous().cpu() for n, p in average.params.items()}
                        with _writing(out_dir, "save the stage's last trained weights"):
                            (out_dir / "raw").mkdir(exist_ok=True)
                            _atomic_write(out_dir / "raw" / f"{stage.name}.safetensors", partial(save_file, raw))
                    average.copy_to_model()
                if "vae" in stage.trainable:
                    calibrate_vae(model, data)
                state.stage_index += 1
                state.stage_step = 0
            if state.global_step % args.ckpt_every == 0 or state.stage_step == 0:
                _check_finite_weights(accelerator, model, f"after {stage.name} step {state.stage_step or stage.steps} "
                                      f"(global step {state.global_step})", out_dir)
                if main:
                    with _writing(out_dir, f"save the checkpoint of step {state.global_step}"):
                        save_checkpoint(out_dir, model, optimizer if state.stage_step else None, state, args,
                                        generator, args.keep_checkpoints, average if state.stage_step else None)
            accelerator.wait_for_everyone()
            if state.stage_step == 0:
                break
        if stage.steps == 0:
            state.stage_index += 1
        accelerator.free_memory()
    state.done = True
    log.close()
    export = Path(args.export) if args.export else out_dir / "final"
    model.llm.set_attn_implementation("sdpa")  # the exported model runs inference on the fused kernel
    if args.lora.enabled:
        merge_lora(model)
    _check_finite_weights(accelerator, model, "before the export", out_dir)
    if main:
        with _writing(out_dir, f"export the trained model to {export}"):
            model.eval().save_pretrained(export)
            log.plot()
        print(f"saved the trained model to {export}")
    accelerator.wait_for_everyone()
    return export


def _log_records(path: Path) -> list[dict]:
    """log.jsonl's records; a line a kill tore in half (or any line that is not a record) is left out."""
    records = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("global_step"), int):
            records.append(rec)
    return records


def _truncate_log(path: Path, global_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run may have logged more)."""
    if not path.exists():
        return
    keep = [rec for rec in _log_records(path) if rec["global_step"] <= global_step]
    _atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in keep))


# ---- guarding the run --------------------------------------------------------------------------------------
def lock_run(out_dir: Path):
    """Hold an exclusive lock on out_dir for the whole run: two trainers must not interleave one log and
    one set of checkpoints. The kernel drops the lock when the process dies, so a killed run leaves none."""
    handle = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunError(f"another trainer ({owner}) is running in {out_dir}; wait for it to finish or choose "
                       "another out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def _check_fresh_or_resumed(out_dir: Path, resume: bool) -> None:
    """A fresh run must not write into another run's folder: its log and checkpoints would mix with it."""
    if resume:
        return
    previous = [name for name in ("log.jsonl", "checkpoints") if (out_dir / name).exists()]
    if previous:
        raise RunError(f"{out_dir} already holds a run ({', '.join(previous)}); continue it with --resume, or "
                       "choose another out_dir (or delete the old run)")


def _remove_stale_temps(out_dir: Path) -> None:
    """Temp files and folders that a run killed mid-write leaves behind (the lock says no run is writing)."""
    ckpts = out_dir / "checkpoints"
    for folder in (out_dir, ckpts, out_dir / "raw"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if folder == ckpts and p.name.startswith(".step_") and p.is_dir():
                shutil.rmtree(p)
            elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink()


@contextmanager
def _writing(out_dir: Path, what: str):
    """A read-only or full out folder stops the run with one line; the last checkpoint survives both."""
    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space"}.get(
            e.errno, "check that the folder is writable")
        raise RunError(f"could not {what}{where}: {e.strerror or e}; {hint}, then continue with --resume "
                       f"(the last complete checkpoint in {out_dir} is kept)") from e


def _everywhere(accelerator, ok: bool) -> bool:
    """`ok` on every rank (one small all-gather), so all ranks stop together instead of hanging."""
    if accelerator.num_processes == 1:
        return ok
    flags = accelerator.gather(torch.tensor([float(ok)], device=accelerator.device))
    return bool(flags.min() > 0)


def _non_finite_message(what: str, out_dir: Path) -> str:
    return (f"{what}; training stopped and nothing non-finite was saved. The last checkpoint in "
            f"{out_dir / 'checkpoints'} is intact; lower the stage's lr or set optim.grad_clip, then rerun")


def _check_finite_weights(accelerator, model: OvisU1, when: str, out_dir: Path) -> None:
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not _everywhere(accelerator, not bad):
        raise RunError(_non_finite_message(f"{when}: {len(bad)} weight tensor(s) hold NaN or inf, e.g. {bad[:3]}",
                                           out_dir))


class _Logger:
    """Progress bar with loss and samples/s, a JSONL loss log, and a loss-curve PNG (main process only)."""

    def __init__(self, out_dir: Path, main: bool, progress: bool):
        self.out_dir, self.main, self.progress = out_dir, main, progress
        self.bar = None

    def stage(self, stage: StageArgs, n_tensors: int, n_params: int) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.close()
        print(f"[{stage.name}] training {stage.trainable} ({n_params:,} parameters in {n_tensors} tensors) on "
              f"{stage.tasks}: {stage.steps} steps, batch {stage.batch_size}, lr {stage.lr:g}", flush=True)
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=stage.steps, desc=stage.name, dynamic_ncols=True)

    def step(self, state: TrainState, stage: StageArgs, loss: float, parts: dict, lr: float, sps: float,
             every: int) -> None:
        if not self.main:
            return
        step_in_stage = state.stage_step or stage.steps
        if self.bar is not None:
            self.bar.n = step_in_stage
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:.0f}", refresh=False)
            self.bar.refresh()
        if state.global_step % every == 0 or step_in_stage in (1, stage.steps):
            rec = {"global_step": state.global_step, "stage": stage.name, "step": step_in_stage, "loss": loss,
                   **{f"loss_{k}": v for k, v in parts.items()}, "lr": lr, "samples_per_s": sps}
            with _writing(self.out_dir, "append to log.jsonl"), open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def plot(self) -> None:
        plot_losses(self.out_dir / "log.jsonl", self.out_dir / "loss.png")


def plot_losses(log_path: Path, png_path: Path) -> None:
    # A bare Figure (no pyplot state, no backend switch), so calling this from a notebook leaves its
    # inline plotting alone.
    from matplotlib.figure import Figure
    if not log_path.exists():
        return
    recs = [r for r in _log_records(log_path) if isinstance(r.get("stage"), str) and "step" in r]
    if not recs:
        return
    stages = list(dict.fromkeys(r["stage"] for r in recs))
    fig = Figure(figsize=(3.2 * len(stages), 2.8))
    axes = fig.subplots(1, len(stages), squeeze=False)
    for ax, name in zip(axes[0], stages):
        rs = [r for r in recs if r["stage"] == name]
        for key in sorted({k for r in rs for k in r if k.startswith("loss_")}):
            pts = [(r["step"], r[key]) for r in rs if key in r]
            ax.plot(*zip(*pts), label=key[5:], lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
