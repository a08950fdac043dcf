"""Does `precision: bf16` train the generation stages as well as float32, and how much faster is it?

Two copies of one checkpoint train side by side on the same batches, noise and schedule, one under bf16
autocast and one in float32, alternating step by step so both see the same machine. Every EVAL steps
both are scored in float32 on the same held-out samples with fixed noise and t (the stage's own loss:
the x0 error for the shapes preset), and the step times are compared as a ratio.

    CKPT=runs/to_stage2/checkpoints/step_0004100 python -m train.experiments.bf16_parity stage4 600
    CKPT=... python -m train.experiments.bf16_parity stage5 600

The stage (one of the default recipe's) gives the trainable modules, tasks, batch and learning rate;
its schedule is compressed to the given number of steps.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from ovis_u1.shapes.world import ShapesWorld
from train import losses
from train.config import resolve
from train.data import TaskData
from train.experiments import plain_step
from train.trainer import TrainingModule, load_checkpoint, lr_lambda, set_trainable


@torch.no_grad()
def heldout_loss(model, samples: dict[str, list], seed: int = 123) -> dict[str, float]:
    """The stage's losses on fixed held-out samples, with fixed noise, t and no condition dropout."""
    was_training = model.training
    model.eval()
    out = {}
    for task, rows in samples.items():
        g = torch.Generator().manual_seed(seed)
        fn = losses.TASK_LOSSES[task]
        out[task] = statistics.fmean(float(fn(model, rows[i:i + 32], g, cond_dropout=0.0))
                                     for i in range(0, len(rows), 32))
    model.train(was_training)
    model.vae.eval()
    return out


def _median(run: dict) -> float:
    times = run["times"]
    return statistics.median(times[5:] or times)  # the first steps warm up the allocator and kernels


def main(argv: list[str]) -> int:
    stage_name, steps = argv[0], int(argv[1])
    eval_every = int(os.environ.get("EVAL", 100))
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    args = resolve("default")
    stage = next(s for s in args.stages if s.name == stage_name)
    data = TaskData(args.data)
    base, *_ = load_checkpoint(Path(os.environ.get("CKPT", "runs/to_stage2/checkpoints/step_0004100")), args)
    world = ShapesWorld(size=args.data.image_size, seed=args.data.seed, split="heldout")
    held = {t: [getattr(world, t)(i) for i in range(128)] for t in stage.tasks}
    runs = {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(base)
        set_trainable(model, stage)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[precision] = dict(model=model, params=params, module=TrainingModule(model, args.data,
                                                                                 precision),
                               opt=torch.optim.AdamW(params, lr=stage.lr, betas=args.optim.betas,
                                                     weight_decay=args.optim.weight_decay), times=[])
    rows = stage.split_batch(stage.batch_size)
    print(f"{stage_name}, {steps} steps, batch {rows}, held-out samples per task 128")
    print("step  " + "  ".join(f"{p}:{t}" for p in runs for t in stage.tasks))
    for step in range(steps + 1):
        if step % eval_every == 0:
            scores = {p: heldout_loss(r["model"], held) for p, r in runs.items()}
            ratio = "" if step < 10 else (f"   fp32 / bf16 s/step so far "
                                          f"{_median(runs['fp32']) / _median(runs['bf16']):.2f}")
            print(f"{step:5d} " + "  ".join(f"{scores[p][t]:.4f}" for p in runs for t in stage.tasks) + ratio,
                  flush=True)
        if step == steps:
            break
        batches = {t: data.batch(t, step * n, n) for t, n in rows.items()}
        for r in runs.values():
            for g in r["opt"].param_groups:
                g["lr"] = stage.lr * lr_lambda(step, steps, args.optim.warmup_frac, args.optim.min_lr_frac)
            gen = torch.Generator().manual_seed(step)
            t0 = time.perf_counter()
            plain_step(r["module"], r["opt"], r["params"], batches, stage.tasks, gen, args.optim.grad_clip)
            r["times"].append(time.perf_counter() - t0)
    med = {p: _median(r) for p, r in runs.items()}
    print("median s/step " + ", ".join(f"{p} {m:.3f}" for p, m in med.items())
          + f"; fp32 / bf16 = {med['fp32'] / med['bf16']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
