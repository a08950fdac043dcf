"""Deterministic sample streams per task: sample i of a task is a pure function of (seed, i).

That is what makes `--resume` exact: the trainer only has to remember how many samples of each task it
has drawn. Sources: the shapes world (generated on the fly) or a user's JSONL file (ovis_u1.shapes.jsonl;
bad records are skipped with a count and a warning by its loader).
"""

from __future__ import annotations

import numpy as np

from ovis_u1.processing import t2i_prompts, understanding_prompt
from ovis_u1.shapes.jsonl import load_jsonl
from ovis_u1.shapes.world import EditSample, ShapesWorld, T2ISample, VQASample, world_text_corpus

from .config import DataArgs


class TaskData:
    def __init__(self, args: DataArgs):
        self.args = args
        self.world = ShapesWorld(size=args.image_size, seed=args.seed, split="train")
        self.own: dict[str, list] | None = None
        if args.source != "shapes":
            samples, self.skipped = load_jsonl(args.source)
            self.own = {"t2i": [s for s in samples if isinstance(s, T2ISample)],
                        "vqa": [s for s in samples if isinstance(s, VQASample)],
                        "edit": [s for s in samples if isinstance(s, EditSample)]}
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

    def _own(self, task: str, i: int):
        pool = self.own[task]
        if not pool:
            raise ValueError(f"the data file {self.args.source} has no usable {task!r} records, but the stage "
                             f"trains on {task!r}")
        # A fresh permutation every epoch, seeded by (seed, epoch): still a pure function of i.
        epoch, j = divmod(i, len(pool))
        order = np.random.default_rng([self.args.seed, epoch]).permutation(len(pool))
        return pool[order[j]]

    def sample(self, task: str, i: int, vqa_kinds: dict[str, float] | None = None):
        if task == "lm":
            corpus = self.corpus()
            return corpus[i % len(corpus)]
        if task == "vae":  # any image of the world: targets and edit sources alike
            s = self.sample("t2i" if i % 2 == 0 else "edit", i // 2)
            return s.image if isinstance(s, T2ISample) else s.source
        if task == "cells":  # needs each image's scene, which only the generator knows
            if self.own is not None:
                raise ValueError(f"the cells task needs shapes-world scenes, but data.source is {self.args.source}; "
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
