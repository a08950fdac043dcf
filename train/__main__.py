"""python -m train [--recipe NAME|PATH] [--resume] [key=value ...]

Examples:
  python -m train --recipe default                      # the shipped default model, all stages (CPU, 1.5-2.2 h)
  python -m train --recipe paper step_scale=0.01 batch_scale=0.01 out_dir=runs/paper_small
  python -m train --recipe default --resume             # continue the last run exactly where it stopped
  accelerate launch -m train --recipe paper             # several GPUs (DDP; FSDP via `accelerate config`)
"""

from __future__ import annotations

import argparse
import sys

from .config import resolve
from .trainer import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="a recipe name in train/recipes or a YAML path")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's latest checkpoint")
    p.add_argument("overrides", nargs="*", help="settings as key=value, e.g. stages.stage0.steps=100")
    a = p.parse_args(argv)
    try:
        args = resolve(a.recipe, a.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(args, resume=a.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
