"""How long would a recipe take on this machine? Times a few steps of every stage and multiplies.

    python -m train.experiments.recipe_time --recipe default
    python -m train.experiments.recipe_time --recipe default --steps 12 precision=fp32
    python -m train.experiments.recipe_time --recipe default --device cuda

Each stage trains `--steps` steps on its own tasks, batch and trainable modules, starting from the
recipe's starting model (weights do not change step times), in the precision the trainer would choose
here (`precision: auto` resolves as in `train.trainer.resolve_precision`). The median step after two
warm-up steps, times the stage's step count, is the stage's estimate. Checkpoints, logging and the VAE
calibration are left out, so a real run takes a little longer. Prints a line per stage and the total.
"""

from __future__ import annotations

import argparse
import copy
import sys
from functools import partial

import torch

from train.config import resolve
from train.data import TaskData
from train.experiments import device_sync, median_step_time, plain_step
from train.trainer import TrainingModule, build_model, resolve_precision, scaled_stages, set_trainable


def stage_step(module, optimizer, params, data, rows, tasks, grad_clip, i: int) -> None:
    """The i-th training step of a stage: a fresh mixed batch of `rows` per task, then one optimizer step."""
    batches = {task: data.batch(task, i * n, n) for task, n in rows.items()}
    plain_step(module, optimizer, params, batches, tasks, torch.Generator().manual_seed(i), grad_clip)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train.experiments.recipe_time", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="default")
    p.add_argument("--steps", type=int, default=8, help="timed steps per stage (the first two warm up)")
    p.add_argument("--device", default="cpu", help="where to time the steps (cuda: synchronised around each)")
    p.add_argument("overrides", nargs="*", help="a.b=c settings, as for python -m train")
    a = p.parse_args(argv)
    if a.steps < 3:
        p.error(f"--steps must be at least 3 (two warm-up steps and one timed), got {a.steps}")
    args = resolve(a.recipe, a.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = TaskData(args.data)
    base = build_model(args, data).to(a.device)
    sync = device_sync(base.device)
    precision = resolve_precision(args.precision, base.device)
    print(f"recipe {a.recipe}, precision {args.precision} -> {precision}, {torch.get_num_threads()} threads, "
          f"{a.steps} steps per stage, device {base.device}")
    total = 0.0
    for stage in scaled_stages(args):
        if stage.steps == 0:
            continue
        model = copy.deepcopy(base)
        set_trainable(model, stage, args.lora.enabled)
        params = [q for q in model.parameters() if q.requires_grad]
        module = TrainingModule(model, args.data, precision)
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=args.optim.betas,
                                      weight_decay=args.optim.weight_decay)
        rows = stage.split_batch(stage.batch_size)
        per_step = median_step_time(partial(stage_step, module, optimizer, params, data, rows, stage.tasks,
                                            args.optim.grad_clip), a.steps, sync)
        minutes = per_step * stage.steps / 60
        total += minutes
        print(f"{stage.name:10s} {per_step:6.3f} s/step x {stage.steps:6d} steps = {minutes:6.1f} min", flush=True)
    print(f"total {total:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
