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

from ovis_u1.checkpoint import CheckpointError

from .config import SettingsError, resolve
from .trainer import RunError, train


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
        return _fail(e, 2)
    try:
        train(args, resume=a.resume)
    except (SettingsError, CheckpointError) as e:  # found once the data or the init checkpoint is read
        return _fail(e, 2)
    except RunError as e:
        return _fail(e, 1)
    return 0


def _fail(e: Exception, code: int) -> int:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
