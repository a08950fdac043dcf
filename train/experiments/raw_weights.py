"""A run's exported model with one stage's last trained weights in place of their moving average, so the
two can be scored side by side on the same draws (README, "Weight averaging").

    python -m train.experiments.raw_weights runs/X stage5 runs/X/final_raw
    python -m ovis_u1.shapes.evaluate --checkpoint runs/X/final_raw --n 60 --mode exact

A stage with `ema` set ends by putting the average in the model and keeps the weights it trained last in
`<out_dir>/raw/<stage>.safetensors`. The export is `<out_dir>/final` unless the run named another
(`--export`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

from ovis_u1 import OvisU1


def with_raw_weights(export: Path, raw: Path, out: Path) -> int:
    """Write `export` with the tensors of `raw` swapped in to `out`; returns how many tensors changed."""
    if not raw.exists():
        raise FileNotFoundError(f"{raw} not found: the stage kept no raw weights (was its ema set?)")
    model = OvisU1.from_pretrained(export)
    tensors = load_file(raw)
    _missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise RuntimeError(f"{raw} has tensors the model at {export} lacks: {unexpected[:5]}")
    model.eval().save_pretrained(out)
    return len(tensors)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.experiments.raw_weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the run's out_dir")
    p.add_argument("stage", help="the stage whose last trained weights to use, e.g. stage5")
    p.add_argument("out", type=Path, help="where to write the model")
    p.add_argument("--export", type=Path, default=None, help="the run's export (default: RUN/final)")
    args = p.parse_args(argv)
    n = with_raw_weights(args.export or args.run / "final", args.run / "raw" / f"{args.stage}.safetensors", args.out)
    print(f"wrote {args.out}: the export with {args.stage}'s last trained weights ({n} tensors) in place of "
          "their average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
