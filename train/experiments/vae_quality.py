"""How well a checkpoint's VAE reconstructs held-out shapes scenes, to compare `prep_vae` runs (README,
"A better VAE did not lift generation": the recipe with half the reconstruction error generated no better).

    python -m train.experiments.vae_quality ovis_u1/default_model runs/vae_s1/final [--n 256]

For each checkpoint: mean squared error of encode (posterior mean) then decode on `n` held-out
text-to-image scenes (pixels in [-1, 1]), and the share of scenes the scene reader reads back exactly
from the reconstruction (same objects, centres within 1/16 of the side). The scenes are the world's
held-out split, seed 0, the same for every checkpoint.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ovis_u1 import OvisU1
from ovis_u1.generation import pixels_to_images
from ovis_u1.shapes import ShapesWorld
from ovis_u1.shapes.evaluate import scenes_match
from ovis_u1.shapes.reader import read_scene
from train.losses import images_to_tensor

READ_BACK_TOLERANCE = 1 / 16


@torch.no_grad()
def vae_quality(model: OvisU1, n: int = 256, batch_size: int = 32, size: int = 64) -> dict:
    world = ShapesWorld(size=size, seed=0, split="heldout")
    scenes = [world.t2i_scene(i)[0] for i in range(n)]
    vae = model.vae.eval()
    squared, read_back = 0.0, 0
    for start in range(0, n, batch_size):
        chunk = scenes[start:start + batch_size]
        x = images_to_tensor([s.render() for s in chunk], model.device)
        rec = vae.decode(vae.encode(x)).float()
        squared += float((rec - x).pow(2).mean(dim=(1, 2, 3)).sum())
        for scene, image in zip(chunk, pixels_to_images(rec)):
            read_back += scenes_match(read_scene(image).scene, scene, tol=READ_BACK_TOLERANCE)
    return {"n": n, "mse": squared / n, "read_back": read_back / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.experiments.vae_quality", description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories (the package's format)")
    p.add_argument("--n", type=int, default=256, help="held-out scenes per checkpoint")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n must be at least 1, got {a.n}")
    for path in a.checkpoints:
        q = vae_quality(OvisU1.from_pretrained(path), n=a.n)
        print(f"{path}: n={q['n']} mse={q['mse']:.5f} read_back={q['read_back']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
