"""Hosted-Space entry point: the published Ovis-U1-3B in bfloat16 on CUDA, behind the main app's UI.

The Space runs `python spaces/app.py` (front matter `app_file`) from the repository root it is a copy
of, so the package and the main `app.py` sit one folder up. `OVIS_U1_CHECKPOINT` overrides the hub id
(or names a local directory). Importing this file loads nothing: `create_demo(model)` takes any model,
which is how the tests build the Space's UI around a tiny one without a GPU or a download.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# First on the path, ahead of this file's own folder: `import app` must find the main app, not this file.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import app  # noqa: E402  (the main app: build_ui, launch)
from ovis_u1.checkpoint import CHECKPOINT_ENV, load_model  # noqa: E402  (the app's and the CLI's loader)

MODEL_ENV = CHECKPOINT_ENV
MODEL_ID = os.environ.get(MODEL_ENV, "AIDC-AI/Ovis-U1-3B")


def load_published_model():
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("this Space needs a GPU; pick one in the Space settings (see README.md)")
    # On ZeroGPU the model is placed on CUDA at start-up; `spaces` attaches a GPU to each @spaces.GPU call.
    return load_model(MODEL_ID, device="cuda", dtype=torch.bfloat16)


def create_demo(model=None):
    return app.build_ui(model if model is not None else load_published_model(), title="Ovis-U1-3B")


if __name__ == "__main__":
    # Spaces route traffic to 0.0.0.0:7860; the queue still serves one generation at a time.
    app.launch(create_demo(), host="0.0.0.0", port=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
