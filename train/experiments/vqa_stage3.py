"""Stage-3 (understanding) variants from the stage-2 boundary checkpoint, scored on held-out VQA (n=120).

The README's "default model" section quotes these runs. The checkpoint is the one a recipe run leaves at
the end of stage 2 (global step 4,100 of `python -m train --recipe default`; copy it away before the
trainer's keep=2 rotation removes it). Variants, by environment variable:

    CKPT=runs/default/checkpoints/step_0004100 python -m train.experiments.vqa_stage3 base 600
    GAIN=8      the adapter's LayerNorm gain x8 (a sharper visual softmax)
    LR=1.5e-3   the stage's learning rate;  VISLR=4  vision, adapter and VTE at 4x that
    STRIDE=1    a 1x1 merge (4x the visual tokens; fresh adapter head);  VOCAB=2048  a larger visual vocabulary
    FREEZE_LLM=1  stage 3 trains the vision, adapter and VTE only
    WARM=1200   first 1,200 LLM-only steps on text-described scenes (see vqa_text_oracle), WLR its lr
    SHAPE_FRAC=0.5  that fraction of each batch is shape questions (the mix has ~1/6; see vqa_gradients)
    SHAPE_FIRST=600 the first 600 steps are shape questions only (a curriculum), then the usual mix
    DESCRIBE_FIRST=600 the same with descriptions ("a red circle and a blue square"), which name every
                object's colour and shape at once
    BYPASS=1    a diagnostic, not the architecture: no softmax, so each visual token's embedding is the
                head's LayerNorm output times the VTE / 128, a linear map of the merged ViT features

One thread by default (THREADS), so two variants run side by side on 2 cores. CKPT=default starts from
the shipped model instead; DEVICE=cuda trains there; BATCH sets the questions per step (default 32);
EVAL the held-out questions scored (default 120). A step count of 0 runs as many steps as fit in
BUDGET_S seconds (timed on a throwaway copy first, since the schedule needs the count up front):

    CKPT=default DEVICE=cuda BATCH=128 BUDGET_S=120 python -m train.experiments.vqa_stage3 long 0
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from ovis_u1.model import OvisU1
from ovis_u1.shapes.evaluate import evaluate_model
from ovis_u1.vision import VisualTokenizer
from train import losses
from train.config import DataArgs, resolve
from train.data import TaskData
from train.experiments import device_sync, steps_for_budget
from train.experiments.vqa_text_oracle import CKPT, train_llm_on_text
from train.trainer import load_checkpoint, lr_lambda, set_trainable


def env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def bypass_softmax(tokenizer: VisualTokenizer) -> None:
    """Replace the probabilistic tokens by the LayerNorm'd logits / 128 (embedding norms near the text's)."""
    def forward(patches, grid_thws):
        features = tokenizer.backbone(patches, grid_thws)
        g = tokenizer.adapter_cfg.hidden_stride ** 2
        logits = tokenizer.head(features.reshape(-1, g * features.shape[-1]))
        return torch.nn.functional.pad(logits / 128, (0, tokenizer.adapter_cfg.num_indicators))
    tokenizer.forward = forward


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    variant, steps = sys.argv[1], int(sys.argv[2])
    lr, vis_mult, batch_size = env("LR", 5e-4), env("VISLR", 1.0), int(env("BATCH", 32))
    device = torch.device(os.environ.get("DEVICE", "cpu"))
    torch.manual_seed(0)
    args = resolve("default", [])
    if CKPT == "default":  # the shipped model: no optimizer state, only the weights
        model = OvisU1.from_pretrained()
    else:
        model, *_ = load_checkpoint(Path(CKPT), args)
    adapter = model.config.adapter
    stride, vocab = int(env("STRIDE", adapter.hidden_stride)), int(env("VOCAB", adapter.vocab_size))
    if (stride, vocab) != (model.config.adapter.hidden_stride, model.config.adapter.vocab_size):
        # A fresh adapter head (its input or output size changes) over the trained ViT; fresh VTE for a new V.
        model.config.adapter.hidden_stride, model.config.adapter.vocab_size = stride, vocab
        backbone = model.visual_tokenizer.backbone.state_dict()
        model.visual_tokenizer = VisualTokenizer(model.config.vision, model.config.adapter)
        model.visual_tokenizer.backbone.load_state_dict(backbone)
        if model.vte.num_embeddings != vocab:
            model.vte = torch.nn.Embedding(vocab, model.config.llm.hidden_size)
    with torch.no_grad():
        model.visual_tokenizer.head[1].weight.mul_(env("GAIN", 1.0))
    if int(env("BYPASS", 0)):
        bypass_softmax(model.visual_tokenizer)
    if int(env("WARM", 0)):
        model.requires_grad_(False)
        model.llm.requires_grad_(True)
        train_llm_on_text(model, args, int(env("WARM", 0)), env("WLR", 1e-3), seed=7)
    set_trainable(model, next(s for s in args.stages if s.name == "stage3"))
    if int(env("FREEZE_LLM", 0)):
        model.llm.requires_grad_(False)  # only the visual side learns to speak to the LLM
    model.to(device)
    data = TaskData(DataArgs(image_size=64))

    def optimizer(m):
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        visual = [p for n, p in named if n.startswith(("visual_tokenizer", "vte"))]
        rest = [p for n, p in named if not n.startswith(("visual_tokenizer", "vte"))]
        return torch.optim.AdamW([{"params": visual, "mult": vis_mult}, {"params": rest, "mult": 1.0}], lr=lr,
                                 betas=args.optim.betas, weight_decay=args.optim.weight_decay)

    def train_step(m, opt, step, steps) -> float:
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"] * lr_lambda(step, steps, args.optim.warmup_frac, args.optim.min_lr_frac)
        if step < env("DESCRIBE_FIRST", 0):  # descriptions from their own index range, the whole batch
            batch = [data.world.vqa(2 * 10**7 + step * batch_size + k, kind="describe") for k in range(batch_size)]
        else:
            batch = data.batch("vqa", step * batch_size, batch_size)
        n_shape = batch_size if step < env("SHAPE_FIRST", 0) else round(env("SHAPE_FRAC", 0.0) * batch_size)
        if n_shape:  # shape questions from their own index range, in place of the first rows
            batch[:n_shape] = [data.world.vqa(10**7 + step * batch_size + k, kind="shape") for k in range(n_shape)]
        loss = losses.vqa_loss(m, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                       args.optim.grad_clip or 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    if steps == 0:  # as many steps as fit in BUDGET_S seconds, timed on a throwaway copy
        probe = copy.deepcopy(model)
        probe_opt = optimizer(probe)
        steps, per_step = steps_for_budget(lambda i: train_step(probe, probe_opt, i, 1000), env("BUDGET_S", 60),
                                           sync=device_sync(device))
        del probe, probe_opt
        print(f"{variant}: {per_step:.4f} s/step, {steps} steps fit in {env('BUDGET_S', 60):g} s", flush=True)
    opt, t0, ema = optimizer(model), time.time(), None
    for step in range(steps):
        loss = train_step(model, opt, step, steps)
        ema = loss if ema is None else 0.97 * ema + 0.03 * loss
        if (step + 1) % 100 == 0:
            print(variant, step + 1, round(ema, 4), f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    report = evaluate_model(model, n=int(env("EVAL", 120)), tasks=("vqa",))["vqa"]
    print(json.dumps({"variant": variant, "steps": steps, "batch": batch_size, "loss": ema,
                      "vqa": report["overall"]["value"],
                      "kinds": {k: round(v["value"], 2) for k, v in report.items() if k != "overall"}}), flush=True)


if __name__ == "__main__":
    main()
