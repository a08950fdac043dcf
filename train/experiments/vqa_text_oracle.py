"""VQA with each image replaced by its text description: can the LLM alone learn the reasoning?

Trains only the LLM from the stage-2 boundary checkpoint (see vqa_stage3) on colour, shape, count,
describe and compare questions (relation needs positions, which a description lacks) and prints held-out
accuracy per kind (n=20 each).

    CKPT=runs/default/checkpoints/step_0004100 python -m train.experiments.vqa_text_oracle 2400
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ovis_u1.prompts import pad_batch, understanding_example
from ovis_u1.shapes.world import ShapesWorld, describe
from train.config import resolve
from train.losses import IGNORE_ID
from train.trainer import load_checkpoint, lr_lambda

KINDS = ("color", "shape", "count", "describe", "compare")
CKPT = os.environ.get("CKPT", "runs/default/checkpoints/step_0004100")


def described(scenes, question: str) -> str:
    if len(scenes) == 1:
        return f"{describe(scenes[0])}. {question}"
    return f"{describe(scenes[0])}; then {describe(scenes[1])}. {question}"


def text_batch(world: ShapesWorld, start: int, n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(start, start + n):
        scenes, question, answer = world.vqa_scenes(i, KINDS[i % len(KINDS)])
        out.append((described(scenes, question), answer))
    return out


def text_loss(model, batch: list[tuple[str, str]]) -> torch.Tensor:
    rows, labels = zip(*(understanding_example(model.tokenizer, q, a, 0) for q, a in batch))
    ids, attn = pad_batch(list(rows), model.tokenizer.pad_token_id, side="right")
    lab, _ = pad_batch(list(labels), IGNORE_ID, side="right")
    return model.llm(input_ids=ids, attention_mask=attn, labels=lab, use_cache=False).loss


def train_llm_on_text(model, args, steps: int, lr: float, seed: int = 0, batch_size: int = 32) -> None:
    params = list(model.llm.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=args.optim.betas, weight_decay=args.optim.weight_decay)
    world, t0, ema = ShapesWorld(64, seed, "train"), time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_lambda(step, steps, args.optim.warmup_frac, args.optim.min_lr_frac)
        loss = text_loss(model, text_batch(world, step * batch_size, batch_size))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        ema = loss.item() if ema is None else 0.97 * ema + 0.03 * loss.item()
        if (step + 1) % 100 == 0:
            print("text", step + 1, round(ema, 4), f"{time.time() - t0:.0f}s", flush=True)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    steps, lr = int(sys.argv[1]), float(os.environ.get("LR", 5e-4))
    args = resolve("default", [])
    model, *_ = load_checkpoint(Path(CKPT), args)
    model.requires_grad_(False)
    model.llm.requires_grad_(True)
    train_llm_on_text(model, args, steps, lr)
    model.eval()
    heldout, ok = ShapesWorld(64, 0, "heldout"), dict.fromkeys(KINDS, 0)
    for i in range(100):
        scenes, question, answer = heldout.vqa_scenes(i, KINDS[i % len(KINDS)])
        ok[KINDS[i % len(KINDS)]] += model.answer(described(scenes, question)).strip() == answer
    print(json.dumps({k: v / 20 for k, v in ok.items()}), flush=True)


if __name__ == "__main__":
    main()
