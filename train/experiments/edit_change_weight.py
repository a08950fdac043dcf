"""Does weighing the tokens an edit changes (data.edit_change_weight) make the decoder follow instructions?

On the shipped model most failed edits copy the source and skip the instruction: held-out, 0.62 keep
every object they should and 0.32 do what was asked. Most of an edit target is copied from the
source, so the plain x0 loss spends little on the few tokens the instruction changes.

Two copies of a model continue stage 5 side by side on the same batches, noise and schedule,
alternating step by step: one with the plain edit loss, one with the changed tokens weighted 1 + W.
Then both are scored on the same held-out scenes: edit success with its two parts (kept intact,
effect) and mini-GenEval, so a gain in editing is not paid for in text-to-image.

    python -m train.experiments.edit_change_weight 500 4        # steps, then one or more W
    CKPT=runs/default/final LR=1e-4 EVAL=60 python -m train.experiments.edit_change_weight 500 1.5 4

CKPT (default: the shipped model) is a model directory; LR is the peak learning rate of the
continuation (warm-up and cosine as the recipe's); EVAL is the number of held-out edits and prompts;
ROWS="t2i,edit" sets the rows per step (default stage 5's 16,16; "0,32" trains on edits alone);
DEVICE=cuda trains there. A step count of 0 runs as many steps as fit in BUDGET_S seconds (timed first
on throwaway copies, since the schedule needs the count up front):

    DEVICE=cuda ROWS=64,64 BUDGET_S=120 python -m train.experiments.edit_change_weight 0
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

import torch

from ovis_u1.model import OvisU1
from ovis_u1.shapes.evaluate import evaluate_model
from train.config import resolve
from train.data import TaskData
from train.experiments import device_sync, steps_for_budget
from train.trainer import TrainingModule, lr_lambda, plain_step, resolve_precision, set_trainable


def main(argv: list[str]) -> int:
    steps, weights = int(argv[0]), [float(w) for w in argv[1:]]
    lr, n_eval = float(os.environ.get("LR", 1e-4)), int(os.environ.get("EVAL", 60))
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    args = resolve("default")
    stage = next(s for s in args.stages if s.name == "stage5")
    data = TaskData(args.data)
    base = OvisU1.from_pretrained(os.environ.get("CKPT"), device=os.environ.get("DEVICE", "cpu"))
    precision = resolve_precision(args.precision, base.device)

    def arm(w: float):  # (model, params, module, optimizer) continuing stage 5 with edit_change_weight w
        model = copy.deepcopy(base)
        set_trainable(model, stage)
        params = [p for p in model.parameters() if p.requires_grad]
        module = TrainingModule(model, dataclasses.replace(args.data, edit_change_weight=w), precision)
        opt = torch.optim.AdamW(params, lr=lr, betas=args.optim.betas, weight_decay=args.optim.weight_decay)
        return model, params, module, opt

    arm_weights = list(dict.fromkeys([0.0, *weights]))  # the plain loss first, as the control
    rows = stage.split_batch(stage.batch_size)
    if "ROWS" in os.environ:
        rows = {t: int(n) for t, n in zip(("t2i", "edit"), os.environ["ROWS"].split(",")) if int(n) > 0}
    if steps == 0:  # as many steps as fit in BUDGET_S seconds, timed on a throwaway copy of the arms
        probes = [arm(w) for w in arm_weights]

        def probe_step(i):
            batches = {t: data.batch(t, i * n, n) for t, n in rows.items()}
            for _, params, module, opt in probes:
                plain_step(module, opt, params, batches, stage.tasks, torch.Generator().manual_seed(i),
                           args.optim.grad_clip)
        budget = float(os.environ.get("BUDGET_S", 60))
        steps, per_step = steps_for_budget(probe_step, budget, sync=device_sync(base.device))
        del probes
        print(f"{per_step:.4f} s/step for all arms: {steps} steps fit in {budget:g} s")
    arms = {w: arm(w) for w in arm_weights}
    print(f"stage5 continuation, {steps} steps, batch {rows}, peak lr {lr:g}, {precision}; arms W = {list(arms)}")
    for step in range(steps):
        batches = {t: data.batch(t, step * n, n) for t, n in rows.items()}
        losses = []
        for _, params, module, opt in arms.values():
            for g in opt.param_groups:
                g["lr"] = lr * lr_lambda(step, steps, args.optim.warmup_frac, args.optim.min_lr_frac)
            losses.append(plain_step(module, opt, params, batches, stage.tasks, torch.Generator().manual_seed(step),
                                     args.optim.grad_clip))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d} " + "  ".join(f"W={w:g}: " + " ".join(f"{t} {v:.4f}" for t, v in p.items())
                                                for w, p in zip(arms, losses)), flush=True)
    print(f"held-out, n={n_eval}, seed 0, exact")
    print("W       edit success  kept intact  effect   mini-GenEval   " + "  ".join(
        k for k in ("recolor", "remove", "add", "replace", "move")))
    for w, (model, *_) in arms.items():
        report = evaluate_model(model.eval(), n=n_eval, seed=0, tasks=("geneval", "edit"))
        e = report["edit"]
        print(f"{w:<7g} {e['overall']['value']:.3f}         {e['kept_intact']['value']:.3f}        "
              f"{e['effect']['value']:.3f}    {report['geneval']['overall']['value']:.3f}          "
              + "    ".join(f"{e[k]['value']:.2f}" if k in e else " -- "
                           for k in ("recolor", "remove", "add", "replace", "move")),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
