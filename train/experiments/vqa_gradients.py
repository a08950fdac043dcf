"""What gradient the visual side gets under the answer loss, against a direct shape label on the same ViT.

From the stage-2 boundary checkpoint (see vqa_stage3), with stage 3's trainable set:
- answer loss (stage-3 VQA batches, and batches of shape questions only): per component, the gradient
  norm relative to the weights' norm, and how consistent the direction is from batch to batch (mean
  pairwise cosine of the per-batch gradients; ~0 means each batch pushes somewhere else);
- direct label: a linear shape head on the max-pooled ViT features of one-object scenes, fitted first
  with the ViT frozen; then the ViT's gradient under that head's cross-entropy, measured the same way;
- alignment: cosine between the mean ViT gradient of the shape questions and of the direct label;
- attenuation through the adapter: gradient norm per token at the LLM input (visual embeddings), at the
  softmax logits and at the merged ViT features;
- paired, per sample: one-object scenes asked "What shape is the <colour> object?", each image's ViT
  gradient under the answer loss and under the direct label. A batch's mean gradient is mostly the
  image-independent part (at the stage-2 boundary: say a shape word at all), so this splits it off: the
  common share (|mean|^2 / mean |g|^2); of the image-specific rest, the between-class share (chance:
  (classes - 1) / (n - 1)); and how well the two losses agree on which way each shape should move the
  ViT (cosine of the per-class mean deviations).

    python -m train --recipe default 'only_stages=[prep_vae,prep_lm,prep_text,stage0,stage1,stage2]' \
        out_dir=runs/to_stage2                          # the stage-2 boundary, ~30 min on 2 cores
    CKPT=runs/to_stage2/checkpoints/step_0004100 python -m train.experiments.vqa_gradients [batches]

Later points of stage 3 (the README quotes 4,100, 4,500 and 4,700): continue that run into the recipe's
stage 3 with `python -m train --recipe default --resume out_dir=runs/to_stage2 ckpt_every=100
keep_checkpoints=40`, stop it when the step is reached, and point CKPT at that step's checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ovis_u1.model as model_module
from ovis_u1.images import image_patches
from ovis_u1.prompts import VISUAL_ATOM_ID
from ovis_u1.shapes import SHAPES, ShapesWorld, VQASample, random_scene
from ovis_u1.shapes.world import shape_question  # the world's own template, so the wording matches training
from train import losses
from train.config import DataArgs, resolve
from train.data import TaskData
from train.experiments.vqa_text_oracle import CKPT
from train.trainer import load_checkpoint, set_trainable

GROUPS = {"vit": "visual_tokenizer.backbone.", "adapter": "visual_tokenizer.head.", "vte": "vte.", "llm": "llm."}


def grads_by_group(model) -> dict[str, torch.Tensor]:
    out = {}
    for group, prefix in GROUPS.items():
        gs = [p.grad.flatten() for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        if gs:
            out[group] = torch.cat(gs).clone()
    return out


def weight_norms(model) -> dict[str, float]:
    return {g: float(torch.cat([p.detach().flatten() for n, p in model.named_parameters()
                                if n.startswith(prefix)]).norm()) for g, prefix in GROUPS.items()}


def consistency(vectors: list[torch.Tensor]) -> float:
    """Mean pairwise cosine between per-batch gradients."""
    cos = [float(F.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(vectors, 2)]
    return float(np.mean(cos))


@contextlib.contextmanager
def keeping_visual_embeds(saved: dict):
    """While active, every multimodal embedding keeps its gradient: saved["embeds"] [B, L, D] and
    saved["atoms"], the mask of its visual-token positions."""
    plain_embed = model_module.embed_multimodal

    def embed_keeping_grad(llm, vte, input_ids, visual_probs):
        out = plain_embed(llm, vte, input_ids, visual_probs)
        out.retain_grad()
        saved["embeds"], saved["atoms"] = out, input_ids == VISUAL_ATOM_ID
        return out

    model_module.embed_multimodal = embed_keeping_grad
    try:
        yield saved
    finally:
        model_module.embed_multimodal = plain_embed


def answer_grads(model, batches) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]]:
    per_group: dict[str, list[torch.Tensor]] = {}
    attenuation = {"embeds": [], "logits": [], "features": []}
    vt = model.visual_tokenizer
    saved = {}

    def keep(name):
        def hook(_module, _inp, out):
            t = out if isinstance(out, torch.Tensor) else out[0]
            t.retain_grad()
            saved[name] = t
        return hook

    handles = [vt.backbone.register_forward_hook(keep("features")), vt.head.register_forward_hook(keep("logits"))]
    try:
        for samples in batches:
            model.zero_grad(set_to_none=True)
            saved.clear()
            with keeping_visual_embeds(saved):
                loss = losses.vqa_loss(model, samples)
            loss.backward()
            for g, v in grads_by_group(model).items():
                per_group.setdefault(g, []).append(v)
            # Mean gradient norm per visual token (LLM input rows), per logit row, per ViT patch feature.
            attenuation["embeds"].append(float(saved["embeds"].grad[saved["atoms"]].norm(dim=-1).mean()))
            attenuation["logits"].append(float(saved["logits"].grad.norm(dim=-1).mean()))
            attenuation["features"].append(float(saved["features"].grad.norm(dim=-1).mean()))
    finally:
        for h in handles:
            h.remove()
    return per_group, {k: float(np.mean(v)) for k, v in attenuation.items() if v}


def shape_batches(cfg, n_batches: int, batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        scenes = [random_scene(rng, 64, n=1) for _ in range(batch_size)]
        patches, grids = zip(*[image_patches(s.render(), cfg) for s in scenes])
        labels = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
        out.append((torch.cat(patches), list(grids), labels))
    return out


def pooled_features(model, patches, grids) -> torch.Tensor:
    feats = model.visual_tokenizer.backbone(patches.to(model.device, model.dtype), grids)
    return feats.view(len(grids), -1, feats.shape[-1]).amax(dim=1)


def by_class(labels: list[str]) -> dict[str, list[int]]:
    """Sample indices per shape that occurs."""
    return {c: idx for c in SHAPES if (idx := [i for i, lab in enumerate(labels) if lab == c])}


def class_share(gs: torch.Tensor, classes: dict[str, list[int]]) -> float:
    """Between-class share of the image-specific gradient: sum_c n_c |mean_c - mean|^2 / sum_i |g_i - mean|^2.

    About (classes - 1) / (n - 1) when the gradients carry no class information, 1 when they are all class."""
    dev = gs - gs.mean(0)
    between = sum(len(idx) * dev[idx].mean(0).norm() ** 2 for idx in classes.values())
    return float(between / (dev.norm(dim=1) ** 2).sum())


def paired(model, head, n: int, seed: int) -> dict:
    cfg, rng = model.config, np.random.default_rng(seed)
    answer, embeds, direct, labels = [], [], [], []
    with keeping_visual_embeds({}) as saved:
        for _ in range(n):
            scene = random_scene(rng, 64, n=1)
            obj, image = scene.objects[0], scene.render()
            model.zero_grad(set_to_none=True)
            losses.vqa_loss(model, [VQASample([image], shape_question(obj.color), obj.shape)]).backward()
            answer.append(grads_by_group(model)["vit"])
            embeds.append(saved["embeds"].grad[saved["atoms"]].flatten().clone())
            p, grid = image_patches(image, cfg)
            model.zero_grad(set_to_none=True)
            target = torch.tensor([SHAPES.index(obj.shape)])
            F.cross_entropy(head(pooled_features(model, p, [grid])), target).backward()
            direct.append(grads_by_group(model)["vit"])
            labels.append(obj.shape)
    answer, embeds, direct = torch.stack(answer), torch.stack(embeds), torch.stack(direct)
    classes = by_class(labels)
    out = {"chance_class_share": (len(SHAPES) - 1) / (n - 1)}
    for name, gs in (("answer_vit", answer), ("answer_embeds", embeds), ("direct_vit", direct)):
        out[name] = {"common_share": float(gs.mean(0).norm() ** 2 / (gs.norm(dim=1) ** 2).mean()),
                     "class_share": class_share(gs, classes)}
    da, dd = answer - answer.mean(0), direct - direct.mean(0)
    out["answer_vs_direct_class_cosine"] = {
        c: float(F.cosine_similarity(da[idx].mean(0), dd[idx].mean(0), dim=0)) for c, idx in classes.items()}
    return out


def main() -> None:
    torch.set_num_threads(2)
    n_batches = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    torch.manual_seed(0)
    args = resolve("default", [])
    model, *_ = load_checkpoint(Path(CKPT), args)
    set_trainable(model, next(s for s in args.stages if s.name == "stage3"))
    norms = weight_norms(model)
    data, world = TaskData(DataArgs(image_size=64)), ShapesWorld(64, 0, split="train")
    report: dict = {"checkpoint": CKPT, "batches": n_batches}

    mixed = [data.batch("vqa", i * 32, 32) for i in range(n_batches)]
    shape_q = [[world.vqa(10_000 + i * 32 + k, kind="shape") for k in range(32)] for i in range(n_batches)]
    for name, batches in (("answer_all", mixed), ("answer_shape", shape_q)):
        grads, att = answer_grads(model, batches)
        report[name] = {g: {"grad/weight": float(torch.stack([v.norm() for v in vs]).mean()) / norms[g],
                            "consistency": consistency(vs)} for g, vs in grads.items()}
        report[name]["attenuation_per_token"] = att
        if name == "answer_shape":
            mean_answer_vit = torch.stack(grads["vit"]).mean(0)

    # Direct label: fit a linear head on frozen pooled features, then take the ViT's gradient under it.
    cfg = model.config
    train_b, test_b = shape_batches(cfg, 20, 32, seed=1), shape_batches(cfg, n_batches, 32, seed=2)
    head = torch.nn.Linear(cfg.vision.hidden_size, len(SHAPES))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    with torch.no_grad():
        train_feats = [(pooled_features(model, p, g), y) for p, g, y in train_b]
    for _ in range(10):
        for f, y in train_feats:
            opt.zero_grad()
            F.cross_entropy(head(f), y).backward()
            opt.step()
    with torch.no_grad():
        acc = float(np.mean([(head(pooled_features(model, p, g)).argmax(-1) == y).float().mean().item()
                             for p, g, y in test_b]))
    vit_grads = []
    for p, g, y in test_b:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(head(pooled_features(model, p, g)), y).backward()
        vit_grads.append(grads_by_group(model)["vit"])
    report["direct_shape"] = {"probe_accuracy": acc,
                              "vit": {"grad/weight": float(torch.stack([v.norm() for v in vit_grads]).mean())
                                      / norms["vit"], "consistency": consistency(vit_grads)}}
    report["alignment_vit"] = float(F.cosine_similarity(mean_answer_vit, torch.stack(vit_grads).mean(0), dim=0))
    report["paired"] = paired(model, head, n=48, seed=3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
