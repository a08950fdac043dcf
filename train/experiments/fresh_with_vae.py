"""A recipe's seeded starting model with another checkpoint's trained VAE put in: compare two recipes
without also comparing their VAEs.

    python -m train.experiments.fresh_with_vae --recipe default --vae-from ovis_u1/default_model \
        --out runs/init_with_vae 'preset_overrides={refiner.depth: 0}'
    python -m train --recipe default 'preset_overrides={refiner.depth: 0}' init=runs/init_with_vae \
        'only_stages=[prep_lm,prep_vision,prep_text,stage0,stage1,stage2,stage3,stage4,stage5]'

The same code and seed give another VAE on another CPU of this kind (README, "Understanding"), and a
worse VAE costs generation and editing far more than most recipe changes gain, so a comparison of two
recipes trained from scratch on different machines also compares VAEs. This writes the model
`train.trainer.build_model` would start the recipe from (seed, preset and `preset_overrides` as
resolved), with the VAE's weights and calibration (shift and scale) taken from `--vae-from`, in the
package's own format; train it with `init=` and every stage after `prep_vae`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ovis_u1 import OvisU1
from train.config import resolve
from train.data import TaskData
from train.trainer import build_model


def fresh_with_vae(recipe: str, vae_from: str, overrides: list[str] | None = None) -> OvisU1:
    args = resolve(recipe, overrides or [])
    if args.init:
        raise ValueError(f"the recipe starts from init={args.init!r}; this builds a fresh model, so drop init")
    model = build_model(args, TaskData(args.data))
    donor = OvisU1.from_pretrained(vae_from)
    if dataclasses.asdict(donor.config.vae) | {"shift_factor": 0, "scaling_factor": 0} != \
            dataclasses.asdict(model.config.vae) | {"shift_factor": 0, "scaling_factor": 0}:
        raise ValueError(f"{vae_from}'s VAE is not shaped like the {args.preset!r} preset's: "
                         f"{donor.config.vae} against {model.config.vae}")
    model.vae.load_state_dict(donor.vae.state_dict())
    cfg = model.config.vae  # shared with model.vae; in place, as train.trainer.calibrate_vae sets it
    cfg.shift_factor, cfg.scaling_factor = donor.config.vae.shift_factor, donor.config.vae.scaling_factor
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.experiments.fresh_with_vae", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", required=True, help="recipe name or YAML path")
    p.add_argument("--vae-from", required=True, help="checkpoint directory whose VAE to use")
    p.add_argument("--out", required=True, help="where to write the starting model")
    p.add_argument("overrides", nargs="*", help="a.b=c settings, as for python -m train")
    a = p.parse_args(argv)
    model = fresh_with_vae(a.recipe, a.vae_from, a.overrides)
    model.save_pretrained(a.out)
    print(f"wrote {a.out}: the {a.recipe} recipe's starting model with the VAE of {a.vae_from}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
