"""Training stages as data: which components train, on which tasks, for how many steps at which batch
size and learning rate. `PAPER_STAGES` is the paper's recipe table (the Ovis-U1 report, arXiv 2506.23044);
the `prep_*` stages stand in for the pretrained models the paper starts from (a frozen VAE and a
language model). Components are the names of `OvisU1.components()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ovis_u1.shapes.world import TRAIN_VQA_KINDS

COMPONENTS = ("vision", "adapter", "vte", "llm", "refiner", "decoder", "vae")
TASKS = ("t2i", "edit", "vqa", "lm", "vae", "cells")


@dataclass
class StageArgs:
    name: str = "stage"
    trainable: list[str] = field(default_factory=list)
    tasks: dict[str, float] = field(default_factory=dict)  # task -> share of the batch
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    # The VQA questions' kinds and their shares (shapes world only), e.g. {relation: 0.75, side: 0.25};
    # "mix" stands for the world's usual mixture. Empty: the usual mixture throughout.
    vqa_kinds: dict[str, float] = field(default_factory=dict)
    # Decay of an exponential moving average of the stage's trainable weights (0: none). The stage then
    # ends by putting the averaged weights in the model, so the next stage and the export start from
    # them; the last trained weights are kept beside, in out_dir/raw/<stage>.safetensors.
    ema: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a stage's name must be a non-empty string, got {self.name!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"stage {self.name!r}: {name} must be an integer, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
            raise ValueError(f"stage {self.name!r}: lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.trainable, list) or not isinstance(self.tasks, dict) or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf")
                for w in self.tasks.values()):
            raise ValueError(f"stage {self.name!r}: trainable must be a list of components and tasks a mapping of "
                             f"task to a positive share, got {self.trainable!r} and {self.tasks!r}")
        bad = [c for c in self.trainable if c not in COMPONENTS]
        if bad or not self.trainable:
            raise ValueError(f"stage {self.name!r}: trainable must name components from {COMPONENTS}, got "
                             f"{self.trainable}")
        bad_tasks = [t for t in self.tasks if t not in TASKS]
        if bad_tasks or not self.tasks:
            raise ValueError(f"stage {self.name!r}: tasks must come from {TASKS}, got {list(self.tasks)}")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"stage {self.name!r}: need steps >= 0, batch_size >= 1, lr > 0; got "
                             f"{self.steps}, {self.batch_size}, {self.lr}")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0 <= self.ema < 1:
            raise ValueError(f"stage {self.name!r}: ema is the averaging decay, a number in [0, 1) (0 for none, "
                             f"e.g. 0.999), got {self.ema!r}")
        kinds = ("mix", *TRAIN_VQA_KINDS)
        if not isinstance(self.vqa_kinds, dict) or any(
                k not in kinds or isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf")
                for k, w in self.vqa_kinds.items()):
            raise ValueError(f"stage {self.name!r}: vqa_kinds must map question kinds from {kinds} to positive "
                             f"shares, got {self.vqa_kinds!r}")

    def split_batch(self, batch_size: int) -> dict[str, int]:
        """Rows per task for a mixed-task batch (largest-remainder rounding, every task at least 1)."""
        total = sum(self.tasks.values())
        raw = {t: batch_size * w / total for t, w in self.tasks.items()}
        rows = {t: max(1, int(r)) for t, r in raw.items()}
        for t in sorted(raw, key=lambda t: raw[t] - int(raw[t]), reverse=True):
            if sum(rows.values()) >= batch_size:
                break
            rows[t] += 1
        return rows


# The paper's table. Stage 1-2 "adapter" includes the visual embedding table it feeds; stages 4-5 steps,
# batch and lr are not published (*unverified*): the values here are placeholders of the same order.
PAPER_STAGES = [
    StageArgs("prep_vae", ["vae"], {"vae": 1.0}, steps=2000, batch_size=64, lr=1e-4),
    StageArgs("prep_lm", ["llm"], {"lm": 1.0}, steps=2000, batch_size=256, lr=3e-4),
    StageArgs("stage0", ["refiner", "decoder"], {"t2i": 1.0}, steps=500, batch_size=1024, lr=1e-4),
    StageArgs("stage1", ["adapter", "vte"], {"vqa": 1.0, "t2i": 1.0, "edit": 1.0}, steps=1500,
              batch_size=8192, lr=5e-4),
    StageArgs("stage2", ["vision", "adapter", "vte"], {"vqa": 1.0, "t2i": 1.0, "edit": 1.0}, steps=2600,
              batch_size=8192, lr=1e-4),
    StageArgs("stage3", ["vision", "adapter", "vte", "llm"], {"vqa": 1.0}, steps=23000, batch_size=2240,
              lr=5e-5),
    StageArgs("stage4", ["refiner", "decoder"], {"t2i": 1.0}, steps=5000, batch_size=1024, lr=5e-5),
    StageArgs("stage5", ["refiner", "decoder"], {"t2i": 1.0, "edit": 1.0}, steps=5000, batch_size=1024,
              lr=5e-5),
]
