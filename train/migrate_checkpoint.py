"""Bring a checkpoint trained before the parity fixes to the published conventions, outputs unchanged.

Two conventions changed when the package was made to match the published implementation exactly:

1. The generation condition was [hidden_states[-2], hidden_states[-1]]; the published code concatenates
   [hidden_states[-1], hidden_states[-2]]. The condition only enters the refiner through two linear layers
   (`input_embedder` and the context embedder's first layer), so swapping their input-column halves gives
   the same refiner output from the new condition.
2. Image indicator -301-k took VTE row V-4+k; the published code uses V-5+k, and row V-5 is also the last
   visual word's. The four indicator rows move down by one. To free row V-5 without changing what the
   visual tokens mean, the visual word the model uses least (the smallest largest probability over
   `calibration_images`) is first swapped into the last word column (the head's linear row, its LayerNorm
   weight and bias, and its VTE row together: softmax is indifferent to the order of its columns). That
   word's own row is then lost, so a visual embedding moves by at most its probability times the row
   change, which `migrate` reports.

    python -m train.migrate_checkpoint OLD_DIR NEW_DIR
"""

from __future__ import annotations

import argparse
import copy

import torch

from ovis_u1.model import OvisU1
from ovis_u1.prompts import INDICATOR_IDS


@torch.no_grad()
def swap_condition_halves(model: OvisU1) -> None:
    d = model.config.llm.hidden_size
    context = [model.refiner.c_embedder.linear_1] if model.refiner.cfg.depth else []  # depth 0 has none
    for linear in (model.refiner.input_embedder, *context):
        w = linear.weight
        w.copy_(torch.cat([w[:, d:], w[:, :d]], dim=1))


@torch.no_grad()
def word_usage(model: OvisU1, images) -> torch.Tensor:
    """[V - indicators] largest probability each visual word gets over the images' visual tokens."""
    from ovis_u1.images import image_patches
    usage = None
    for im in images:
        patches, grid = image_patches(im, model.config)
        probs = model.visual_tokens([patches], [grid])[:, :-len(INDICATOR_IDS)].amax(dim=0)
        usage = probs if usage is None else torch.maximum(usage, probs)
    return usage


@torch.no_grad()
def move_indicator_rows(model: OvisU1, calibration_images) -> float:
    """Indicator rows V-4+k -> V-5+k; returns the largest probability of the word whose row is given up."""
    head_linear, head_norm = model.visual_tokenizer.head[0], model.visual_tokenizer.head[1]
    vte = model.vte.weight
    n_ind = len(INDICATOR_IDS)
    last = vte.shape[0] - n_ind - 1  # V-5: the last word column, the first indicator's new row
    usage = word_usage(model, calibration_images)
    least = int(usage.argmin())
    for t in (head_linear.weight, head_norm.weight, head_norm.bias, vte):
        t[[least, last]] = t[[last, least]].clone()
    vte[last:last + n_ind] = vte[last + 1:last + 1 + n_ind].clone()
    return float(usage[least])


def migrate(model: OvisU1, calibration_images) -> tuple[OvisU1, float]:
    """A migrated copy of `model` and the largest probability the given-up visual word had."""
    model = copy.deepcopy(model)
    swap_condition_halves(model)
    lost = move_indicator_rows(model, calibration_images)
    return model, lost


def shapes_calibration_images(n: int = 256, seed: int = 0) -> list:
    """Scenes of the shapes world and white blanks (text-to-image's ViT input) at the sizes the model sees."""
    from PIL import Image

    from ovis_u1.shapes.world import ShapesWorld
    world = ShapesWorld(64, seed, split="train")
    scenes = [world.vqa_scenes(i)[0][0].render() for i in range(n)]
    return scenes + [Image.new("RGB", (s, s), (255, 255, 255)) for s in (32, 64)]


def fill_new_generation_fields(model: OvisU1, old_dir) -> list[str]:
    """Generation fields added with the parity fixes (edit sizing, ViT caps, noise) take the values of the
    checkpoint's preset, which reproduce its old behaviour, where its config.json does not state them."""
    import dataclasses
    import json
    from pathlib import Path

    from ovis_u1.config import PRESETS, get_preset
    raw = json.loads((Path(old_dir) / "config.json").read_text())
    stated = raw.get("config", {}).get("generation", {})
    if model.config.preset not in PRESETS:
        return []
    preset = get_preset(model.config.preset).generation
    filled = [f.name for f in dataclasses.fields(preset) if f.name not in stated]
    for name in filled:
        setattr(model.config.generation, name, getattr(preset, name))
    return filled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="checkpoint saved before the parity fixes")
    ap.add_argument("new", help="where to save the migrated checkpoint")
    args = ap.parse_args(argv)
    old = OvisU1.from_pretrained(args.old)
    filled = fill_new_generation_fields(old, args.old)
    if filled:
        print(f"generation fields set from preset {old.config.preset!r}: {', '.join(filled)}")
    new, lost = migrate(old, shapes_calibration_images())
    new.save_pretrained(args.new)
    print(f"migrated {args.old} -> {args.new}; the visual word given up had probability <= {lost:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
