"""Stage-3 (understanding) variants from the stage-2 boundary checkpoint, scored on held-out VQA (n=120).

The README's "default model" section quotes these runs. The checkpoint is the one a recipe run leaves at
the end of stage 2 (global step 4,100 of `python -m train --recipe default` before the recipe gained
prep_vision, 4,700 since; copy it away before the trainer's keep=2 rotation removes it). Every arm trains
the paper's stage-3 components (vision, adapter, VTE and LLM) unless it says otherwise. Variants, by
environment variable:

    CKPT=runs/default/checkpoints/step_0004100 python -m train.experiments.vqa_stage3 base 600
    GAIN=8      the adapter's LayerNorm gain x8 (a sharper visual softmax)
    LR=1.5e-3   the stage's learning rate;  VISLR=4  vision, adapter and VTE at 4x that
    STRIDE=1    a 1x1 merge (4x the visual tokens; fresh adapter head);  VOCAB=2048  a larger visual vocabulary
    FREEZE_LLM=1  stage 3 trains the vision, adapter and VTE only
    WARM=1200   first 1,200 LLM-only steps on text-described scenes (see vqa_text_oracle), WLR its lr
    SHAPE_FRAC=0.5  that fraction of each batch is shape questions (the mix has ~1/6; see vqa_gradients)
    SHAPE_FIRST=600 the first 600 steps are shape questions only (a curriculum), then the usual mix
    KIND=compare every step's whole batch is that kind of question (a diagnostic: can the LLM learn it
                when nothing else competes?); KIND_STEPS=600 only the first 600 steps, then the usual mix
    SIDE_FRAC=0.25  that fraction of each batch asks which half an object is in ("Is the red circle on the
                left or on the right?", the diagnostic kind "side": one half of a relation question)
    DESCRIBE_FIRST=600 the same with descriptions ("a red circle and a blue square"), which name every
                object's colour and shape at once
    BYPASS=1    a diagnostic, not the architecture: no softmax, so each visual token's embedding is the
                head's LayerNorm output times the VTE / 128, a linear map of the merged ViT features
    ORACLE=grid a diagnostic without the ViT: each of an image's 16 tokens (a 16x16 px cell) is the
                average of the VTE rows for the colour and the shape of the object covering most of the
                cell (or a background row), read from the image exactly; tells whether perfectly clean
                per-cell tokens are enough for the LLM
    ORACLE=objects  the same with one token per object (colour, shape and the 4x4 cell of its centre;
                raster order) and "empty" rows after: tokens that each keep one whole object
    LABELS=400  first 400 steps of the visual tokenizer alone learning to emit the grid oracle's words
                (LABEL_LR; LAYOUT=grid_pos adds row and column words); then FREEZE_VIS=1 keeps it
                frozen in stage 3, LABEL_AUX=0.5 adds that label loss (weight 0.5, on the batch's
                images) to every stage-3 step

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
from ovis_u1.shapes import ShapesWorld
from ovis_u1.shapes.evaluate import evaluate_model, vqa_report
from ovis_u1.vision import VisualTokenizer
from train import losses
from train.config import DataArgs, resolve
from train.data import TaskData
from train.experiments import device_sync, steps_for_budget
from train.experiments.vqa_text_oracle import CKPT, train_llm_on_text
from train.stages import PAPER_STAGES
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


def cell_targets(rgb, n: int, vocab: int, layout: str = "grid") -> torch.Tensor:
    """Exact scene labels of one image (H W 3 uint8) as [n, vocab] distributions over visual words.

    grid: token k (a cell of a square grid) is 1/2 on the colour word and 1/2 on the shape word of the
    object covering most of the cell, or 1 on a background word. objects: token k is 1/3 on the colour,
    shape and centre-cell words of the k-th object in raster order, or 1 on an "empty" word. grid_pos:
    grid at half weight plus 1/4 on the cell's row and 1/4 on its column word. Words 0-5 are the
    colours, 6-8 the shapes, 9 the background, then n cells, "empty", the rows and the columns.
    """
    from ovis_u1.shapes.reader import read_scene
    from ovis_u1.shapes.world import COLOR_NAMES, SHAPES

    color_id = {c: i for i, c in enumerate(COLOR_NAMES)}
    shape_id = {s: len(COLOR_NAMES) + i for i, s in enumerate(SHAPES)}
    background = len(COLOR_NAMES) + len(SHAPES)
    cell_id = background + 1
    objects = read_scene(rgb).objects
    side = rgb.shape[0]
    cells = round(n ** 0.5)
    cell = side // cells
    out = torch.zeros(n, vocab)
    rows_id, cols_id = cell_id + n + 1, cell_id + n + 1 + cells
    if layout in ("grid", "grid_pos"):
        masks = [o.mask(side) for o in objects]
        for k in range(n):
            r, c = divmod(k, cells)
            cover = [m[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].sum() for m in masks]
            if not cover or max(cover) == 0:
                out[k, background] = 1.0
            else:
                o = objects[max(range(len(cover)), key=cover.__getitem__)]
                out[k, color_id[o.color]] = out[k, shape_id[o.shape]] = 0.5
            if layout == "grid_pos":  # half on the label, half on the cell's row and column words
                out[k] *= 0.5
                out[k, rows_id + r] = out[k, cols_id + c] = 0.25
    elif layout == "objects":
        objects = sorted(objects, key=lambda o: (int(o.cy // cell), o.cx))
        for k in range(n):
            if k < len(objects):
                o = objects[k]
                where = int(min(o.cy // cell, cells - 1)) * cells + int(min(o.cx // cell, cells - 1))
                for j in (color_id[o.color], shape_id[o.shape], cell_id + where):
                    out[k, j] = 1 / 3
            else:
                out[k, cell_id + n] = 1.0
    else:
        raise ValueError(f"layout must be grid, grid_pos or objects, got {layout!r}")
    return out


def oracle_tokens(tokenizer: VisualTokenizer, layout: str) -> None:
    """Replace the visual tokens by exact scene labels (see ORACLE above); the VTE rows still train."""
    from ovis_u1.images import patches_to_image

    adapter = tokenizer.adapter_cfg

    def forward(patches, grid_thws):
        out, start = [], 0
        for grid in grid_thws:
            count = grid[0] * grid[1] * grid[2]
            pixels = patches_to_image(patches[start:start + count].float().cpu(), grid, adapter.image_mean,
                                      adapter.image_std, adapter.hidden_stride)
            rgb = (pixels.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            out.append(cell_targets(rgb, count // adapter.hidden_stride**2, adapter.vocab_size, layout))
            start += count
        return torch.cat(out).to(patches.device, tokenizer.head[0].weight.dtype)
    tokenizer.forward = forward


def label_loss(model, images, layout: str = "grid") -> torch.Tensor:
    """Cross-entropy of the visual tokenizer's softmax against the labels of `images` (PIL) read back from
    them: the trainer's cells loss (train.losses.cells_loss) with a choice of layout."""
    import numpy as np
    logits, grids = losses.visual_word_logits(model, images)
    per_image = [t * h * w // model.config.adapter.hidden_stride ** 2 for t, h, w in grids]
    target = torch.cat([cell_targets(np.asarray(im.convert("RGB")), n, logits.shape[-1], layout)
                        for im, n in zip(images, per_image)])
    return -(target.to(logits.device) * logits.float().log_softmax(-1)).sum(-1).mean()


def pretrain_labels(model, data, steps: int, lr: float, batch_size: int = 32) -> None:
    """The visual tokenizer alone learns to emit the grid labels (LABELS steps; the others stay frozen)."""
    params = list(model.visual_tokenizer.parameters())
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0, ema = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_lambda(step, steps, 0.05, 0.1)
        images = [im for s in data.batch("vqa", 3 * 10**7 + step * batch_size, batch_size) for im in s.images]
        loss = label_loss(model, images[:batch_size], os.environ.get("LAYOUT", "grid"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % 50 == 0:
            print("labels", step + 1, round(ema, 4), f"{time.time() - t0:.0f}s", flush=True)
    for p, t in zip(params, trainable):
        p.requires_grad_(t)
    print("labels held-out token accuracy", round(label_accuracy(model), 4), flush=True)


@torch.no_grad()
def label_accuracy(model, n: int = 64) -> float:
    """Share of held-out grid tokens whose most likely words are exactly their label's (1 or 2) words."""
    import numpy as np

    from ovis_u1.images import image_patches
    from ovis_u1.shapes.world import ShapesWorld
    world, cfg, hits, total = ShapesWorld(64, 0, "heldout"), model.config, 0, 0
    for i in range(n):
        im = world.vqa(i).images[0]
        p, grid = image_patches(im, cfg)
        probs = model.visual_tokenizer(p.to(model.device, model.dtype), [grid]).float().cpu()
        target = cell_targets(np.asarray(im.convert("RGB")), probs.shape[0], probs.shape[1],
                              os.environ.get("LAYOUT", "grid"))
        for row, want in zip(probs, target):
            k = int((want > 0).sum())
            hits += set(row.topk(k).indices.tolist()) == set(want.nonzero()[:, 0].tolist())
            total += 1
    return hits / total


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
    if os.environ.get("ORACLE"):
        oracle_tokens(model.visual_tokenizer, os.environ["ORACLE"])
    if int(env("WARM", 0)):
        model.requires_grad_(False)
        model.llm.requires_grad_(True)
        train_llm_on_text(model, args, int(env("WARM", 0)), env("WLR", 1e-3), seed=7)
    # The paper's stage-3 components (vision, adapter, VTE, LLM), whatever the default recipe now freezes.
    set_trainable(model, next(s for s in PAPER_STAGES if s.name == "stage3"))
    if int(env("FREEZE_LLM", 0)):
        model.llm.requires_grad_(False)  # only the visual side learns to speak to the LLM
    if int(env("FREEZE_VIS", 0)):
        model.visual_tokenizer.requires_grad_(False)
    model.to(device)
    data = TaskData(DataArgs(image_size=64))
    if int(env("LABELS", 0)):
        pretrain_labels(model, data, int(env("LABELS", 0)), env("LABEL_LR", 1e-3))
    aux = env("LABEL_AUX", 0.0)

    def optimizer(m):
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        visual = [p for n, p in named if n.startswith(("visual_tokenizer", "vte"))]
        rest = [p for n, p in named if not n.startswith(("visual_tokenizer", "vte"))]
        return torch.optim.AdamW([{"params": visual, "mult": vis_mult}, {"params": rest, "mult": 1.0}], lr=lr,
                                 betas=args.optim.betas, weight_decay=args.optim.weight_decay)

    def one_kind(kind: str, stream: int, step: int, n: int) -> list:
        """n questions of one kind for this step, from that variant's own index range (stream x 10^7)."""
        return [data.world.vqa(stream * 10**7 + step * batch_size + k, kind=kind) for k in range(n)]

    def train_step(m, opt, step, steps) -> float:
        for g in opt.param_groups:
            g["lr"] = lr * g["mult"] * lr_lambda(step, steps, args.optim.warmup_frac, args.optim.min_lr_frac)
        if os.environ.get("KIND") and step < env("KIND_STEPS", 10**9):  # one kind only, the whole batch
            batch = one_kind(os.environ["KIND"], 3, step, batch_size)
        elif step < env("DESCRIBE_FIRST", 0):  # descriptions only, the whole batch
            batch = one_kind("describe", 2, step, batch_size)
        else:
            batch = data.batch("vqa", step * batch_size, batch_size)
        n_shape = batch_size if step < env("SHAPE_FIRST", 0) else round(env("SHAPE_FRAC", 0.0) * batch_size)
        if n_shape:  # shape questions in place of the first rows
            batch[:n_shape] = one_kind("shape", 1, step, n_shape)
        n_side = round(env("SIDE_FRAC", 0.0) * batch_size)
        if n_side:  # "which half is this object in" questions in place of the last rows
            batch[-n_side:] = one_kind("side", 4, step, n_side)
        loss = losses.vqa_loss(m, batch)
        if aux:
            loss = loss + aux * label_loss(m, [im for s in batch for im in s.images], os.environ.get("LAYOUT", "grid"))
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
    if os.environ.get("KIND") == "side" or env("SIDE_FRAC", 0.0):  # outside VQA_KINDS: scored on its own
        held_out = ShapesWorld(64, 0, split="heldout")
        report.update(side=vqa_report(model, held_out, 40, 8, ("side",), 0.0)["side"])
    print(json.dumps({"variant": variant, "steps": steps, "batch": batch_size, "loss": ema,
                      "vqa": report["overall"]["value"],
                      "kinds": {k: round(v["value"], 2) for k, v in report.items() if k != "overall"}}), flush=True)


if __name__ == "__main__":
    main()
