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
    BYPASS=1    a diagnostic, not the architecture: no softmax, so each visual token's embedding is the
                head's LayerNorm output times the VTE / 128, a linear map of the merged ViT features

One thread by default (THREADS), so two variants run side by side on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ovis_u1.shapes.evaluate import evaluate_model
from ovis_u1.vision import VisualTokenizer
from train import losses
from train.config import DataArgs, resolve
from train.data import TaskData
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
    lr, vis_mult, batch_size = env("LR", 5e-4), env("VISLR", 1.0), 32
    torch.manual_seed(0)
    args = resolve("default", [])
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
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    visual = [p for n, p in named if n.startswith(("visual_tokenizer", "vte"))]
    rest = [p for n, p in named if not n.startswith(("visual_tokenizer", "vte"))]
    opt = torch.optim.AdamW([{"params": visual, "mult": vis_mult}, {"params": rest, "mult": 1.0}], lr=lr,
                            betas=args.optim.betas, weight_decay=args.optim.weight_decay)
    data, t0, ema = TaskData(DataArgs(image_size=64)), time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"] * lr_lambda(step, steps, args.optim.warmup_frac, args.optim.min_lr_frac)
        batch = data.batch("vqa", step * batch_size, batch_size)
        n_shape = batch_size if step < env("SHAPE_FIRST", 0) else round(env("SHAPE_FRAC", 0.0) * batch_size)
        if n_shape:  # shape questions from their own index range, in place of the first rows
            batch[:n_shape] = [data.world.vqa(10**7 + step * batch_size + k, kind="shape") for k in range(n_shape)]
        loss = losses.vqa_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(visual + rest, args.optim.grad_clip or 1.0)
        opt.step()
        opt.zero_grad()
        ema = loss.item() if ema is None else 0.97 * ema + 0.03 * loss.item()
        if (step + 1) % 100 == 0:
            print(variant, step + 1, round(ema, 4), f"{time.time() - t0:.0f}s", flush=True)
    model.eval()
    report = evaluate_model(model, n=120, tasks=("vqa",))["vqa"]
    print(json.dumps({"variant": variant, "steps": steps, "loss": ema,
                      "vqa": report["overall"]["value"],
                      "kinds": {k: round(v["value"], 2) for k, v in report.items() if k != "overall"}}), flush=True)


if __name__ == "__main__":
    main()
