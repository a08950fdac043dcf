"""Deterministic sample streams per task: sample i of a task is a pure function of (seed, i).

That is what makes `--resume` exact: the trainer only has to remember how many samples of each task it
has drawn. Sources: the shapes world (generated on the fly) or a user's JSONL file (ovis_u1.shapes.jsonl;
bad records are skipped with a count and a warning by its scan). A JSONL file's images are decoded only
when a batch draws them, resized to `data.image_size` (generation images centre-cropped to a square), so
memory does not grow with the data set or the images' resolution.
"""

from __future__ import annotations

import warnings

import numpy as np

from ovis_u1.prompts import t2i_prompts, understanding_prompt
from ovis_u1.shapes.jsonl import UnusableRecord, materialise, scan_jsonl
from ovis_u1.shapes.world import ShapesWorld, T2ISample, world_text_corpus

from .config import DataArgs, SettingsError

OWN_TASKS = ("t2i", "vqa", "edit")


class TaskData:
    def __init__(self, args: DataArgs):
        self.args = args
        self.world = ShapesWorld(size=args.image_size, seed=args.seed, split="train")
        self.own: dict[str, list] | None = None
        self.skipped: dict[str, int] = {}
        self._unusable: set[tuple[str, int]] = set()  # (task, index in its pool): failed to decode
        if args.source != "shapes":
            try:
                records, self.skipped = scan_jsonl(args.source)
            except OSError as e:
                raise SettingsError(f"cannot read data.source {args.source!r}: {e.strerror or e}") from None
            if not records:
                raise SettingsError(f"data.source {args.source!r} has no usable records (skipped: "
                                    f"{self.skipped or 'none; the file holds no records'})")
            self.own = {t: [r for r in records if r.kind == t] for t in OWN_TASKS}
        self._corpus: list[str] | None = None

    def corpus(self) -> list[str]:
        """World text laid out as the LLM will see it: chat turns, generation prompts and plain lines."""
        if self._corpus is None:
            lines = world_text_corpus(self.args.lm_corpus_lines, seed=self.args.seed)
            out = []
            for i, line in enumerate(lines):
                if i % 3 == 0:
                    out.append(t2i_prompts(line)[0].replace("<image>\n", ""))
                elif i % 3 == 1:
                    out.append(understanding_prompt(line, 0) + "<|im_end|>\n")
                else:
                    out.append(line)
            self._corpus = out
        return self._corpus

    def require(self, tasks, stage: str) -> None:
        """Refuse, before training starts, a stage whose tasks the data cannot feed."""
        if self.own is None:
            return
        for task in tasks:
            if task == "cells":
                raise SettingsError(f"stage {stage!r} trains the cells task, which needs shapes-world scenes, but "
                                    f"data.source is {self.args.source}; drop it from the stage's tasks (or train "
                                    "on data.source=shapes)")
            have = len(self.own["t2i"]) + len(self.own["edit"]) if task == "vae" else len(self.own.get(task, ()))
            if task != "lm" and not have:
                raise SettingsError(f"stage {stage!r} trains on {task!r}, but the data file {self.args.source} has "
                                    f"no usable {task!r} records (counts: "
                                    f"{ {t: len(v) for t, v in self.own.items()} }, skipped: {self.skipped})")

    def _own(self, task: str, i: int):
        pool = self.own[task]
        if not pool:
            raise SettingsError(f"the data file {self.args.source} has no usable {task!r} records, but the stage "
                                f"trains on {task!r}")
        # A fresh permutation every epoch, seeded by (seed, epoch): still a pure function of i. A record whose
        # images fail to decode gives its place to the next one of the epoch (a pure function of the files).
        epoch, j = divmod(i, len(pool))
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(pool))
        for k in range(len(pool)):
            index = int(order[(j + k) % len(pool)])
            if (task, index) in self._unusable:
                continue
            try:
                return materialise(pool[index], self.args.image_size)
            except UnusableRecord as e:
                self._unusable.add((task, index))
                warnings.warn(f"{self.args.source} {e}: its images could not be decoded; skipped, the next "
                              "record takes its place", stacklevel=2)
        raise SettingsError(f"none of the {task!r} records of {self.args.source} has images that decode")

    def sample(self, task: str, i: int, vqa_kinds: dict[str, float] | None = None):
        if task == "lm":
            corpus = self.corpus()
            return corpus[i % len(corpus)]
        if task == "vae":  # any image of the world: targets and edit sources alike
            kind = "t2i" if i % 2 == 0 else "edit"
            if self.own is not None and not self.own[kind]:  # own data with one of the two kinds only
                kind = "edit" if kind == "t2i" else "t2i"
            s = self.sample(kind, i // 2)
            return s.image if isinstance(s, T2ISample) else s.source
        if task == "cells":  # needs each image's scene, which only the generator knows
            if self.own is not None:
                raise SettingsError(f"the cells task needs shapes-world scenes, but data.source is {self.args.source}; "
                                 "drop it from the stage's tasks (or train on data.source=shapes)")
            return self.world.cells(i)
        if self.own is not None:
            return self._own(task, i)
        if task == "vqa":
            return self.world.vqa_conversation(i, self.args.vqa_history, self._vqa_kind(i, vqa_kinds))
        return getattr(self.world, task)(i)

    def _vqa_kind(self, i: int, vqa_kinds: dict[str, float] | None) -> str | None:
        """The question kind of VQA sample i under a stage's kind weights (None: the world's usual mix),
        drawn from the sample's own mixing stream so the draw never shifts the question's."""
        if not vqa_kinds:
            return None
        kinds, weights = list(vqa_kinds), np.cumsum(list(vqa_kinds.values()))
        k = min(int(np.searchsorted(weights / weights[-1], self.world.draw("vqa", i), side="right")), len(kinds) - 1)
        return None if kinds[k] == "mix" else kinds[k]

    def batch(self, task: str, start: int, n: int, vqa_kinds: dict[str, float] | None = None) -> list:
        return [self.sample(task, start + k, vqa_kinds) for k in range(n)]
