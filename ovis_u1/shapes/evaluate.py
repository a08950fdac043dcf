"""Evaluators for the shapes world: a mini-GenEval for text-to-image, VQA exact match, edit success.

The scoring functions take images and predictions only, so they are independent of any model; every
reported figure is a dict {"value", "n", "ci95": [lo, hi]} with a Wilson 95% interval.
`evaluate_model` is a convenience driver for a model with `text_to_image(prompts, seed=)`,
`answer(question, images=)` and `edit(image, instruction, seed=)`.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Collection

import numpy as np
from PIL import Image

from ovis_u1.shapes.reader import read_scene
from ovis_u1.shapes.world import (
    EDIT_KINDS,
    GENEVAL_CATEGORIES,
    VQA_KINDS,
    Obj,
    Scene,
    ShapesWorld,
    Spec,
    relations,
    sample_spec,
)

EDIT_TOLERANCE = 1 / 8  # an edited object may sit this fraction of the side away from its target


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (stays inside [0, 1], sane at k = 0 or n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def figure(k: float, n: int) -> dict:
    return {"value": k / n if n else float("nan"), "n": n, "ci95": list(wilson_interval(k, n))}


# ------------------------------------------------------------------------------------ mini-GenEval

def geneval_prompts(n: int, seed: int = 0) -> list[tuple[str, Spec]]:
    """n prompts cycling through GenEval's six categories, in the captions' training forms: counting and
    position without colours ("three squares"), as GenEval's are."""
    rng = np.random.default_rng([seed, 0x6E7A])
    cats = GENEVAL_CATEGORIES
    specs = [sample_spec(rng, cats[i % len(cats)], colored=False) for i in range(n)]
    return [(spec.caption(), spec) for spec in specs]


def spec_satisfied(objects: list[Obj], spec: Spec) -> bool:
    """Exactly the spec's objects (no others, so large specks and unknown blobs fail), in its relation."""
    slots = [(k, item) for k, item in enumerate(spec.items) for _ in range(item.count)]
    if len(objects) != len(slots):
        return False
    for order in itertools.permutations(objects):
        if all(o.shape == it.shape and it.color in (None, o.color) for o, (_, it) in zip(order, slots)):
            if spec.relation is None:
                return True
            # Relation specs have one object per item; check items[0] against items[1].
            a, b = (next(o for o, (k, _) in zip(order, slots) if k == j) for j in (0, 1))
            if spec.relation in relations(a, b):
                return True
    return False


def geneval_correct(image: Image.Image | np.ndarray, spec: Spec) -> bool:
    return spec_satisfied(read_scene(image).objects, spec)


def score_geneval(images: list, specs: list[Spec]) -> dict:
    """Per-category accuracy and "overall" = mean over the categories present (GenEval's convention);
    overall's interval treats that mean as a proportion over all n images."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} specs")
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, spec in zip(images, specs):
        hits[spec.category].append(geneval_correct(image, spec))
    order = [c for c in GENEVAL_CATEGORIES if c in hits] + sorted(set(hits) - set(GENEVAL_CATEGORIES))
    report = {c: figure(sum(hits[c]), len(hits[c])) for c in order}
    n = len(specs)
    mean = float(np.mean([report[c]["value"] for c in order])) if order else float("nan")
    report["overall"] = {"value": mean, "n": n, "ci95": list(wilson_interval(mean * n if n else 0, n))}
    return report


# ---------------------------------------------------------------------------------- VQA and edits

def vqa_accuracy(preds: list[str], answers: list[str]) -> dict:
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} answers")
    return figure(sum(p.strip().lower() == a.strip().lower() for p, a in zip(preds, answers)), len(answers))


def scenes_match(found: Scene, target: Scene, tol: float = EDIT_TOLERANCE, free: Collection[int] = ()) -> bool:
    """Same multiset of (shape, colour) and, per kind, a pairing with centres within `tol` x side
    (positions are compared as fractions of each scene's side, so sizes may differ). Target objects whose
    indices are in `free` may sit anywhere (see `unplaced_objects`)."""
    def key(o: Obj) -> tuple[str, str]:
        return o.shape, o.color

    if sorted(map(key, found.objects)) != sorted(map(key, target.objects)):
        return False
    for kind in set(map(key, target.objects)):
        a = [(o.cx / found.size, o.cy / found.size) for o in found.objects if key(o) == kind]
        b = [(o.cx / target.size, o.cy / target.size, i in free) for i, o in enumerate(target.objects)
             if key(o) == kind]
        if not any(all(anywhere or (abs(p[0] - x) <= tol and abs(p[1] - y) <= tol)
                       for p, (x, y, anywhere) in zip(perm, b))
                   for perm in itertools.permutations(a)):
            return False
    return True


def unplaced_objects(kind: str, source: Scene, target: Scene) -> tuple[int, ...]:
    """Indices of the target's objects whose place the instruction does not name: the new object of an
    "add" edit ("add a green triangle" says nothing of where), which the generator put at a random free
    spot. Every other edit kind fixes every position (a move goes against the named border)."""
    if kind != "add":
        return ()
    return tuple(i for i, o in enumerate(target.objects) if o not in source.objects)


def edit_parts(found: Scene, source: Scene, target: Scene, kind: str,
               tol: float = EDIT_TOLERANCE) -> tuple[bool, bool]:
    """Where an edit went wrong, in two parts: (kept, effect). kept: every object the edit should leave
    alone is still there (same shape and colour within `tol`); effect: what the edit asks for happened,
    i.e. each new or changed object is there (an added one anywhere) and each object it replaces, moves or
    removes is gone from its old place. Extra objects elsewhere count against neither part."""
    def present(o: Obj, anywhere: bool = False) -> bool:
        return any(f.shape == o.shape and f.color == o.color and (anywhere or (
            abs(f.cx / found.size - o.cx / target.size) <= tol and abs(f.cy / found.size - o.cy / target.size) <= tol))
            for f in found.objects)

    def count(objects: list[Obj], o: Obj) -> int:
        return sum((f.shape, f.color) == (o.shape, o.color) for f in objects)

    kept = all(present(o) for o in target.objects if o in source.objects)
    new = [o for o in target.objects if o not in source.objects]
    gone = [o for o in source.objects if o not in target.objects]
    if kind == "add":  # anywhere, but as one more object: one of the same kind already there does not count
        placed = all(count(found.objects, o) >= count(target.objects, o) for o in new)
    else:
        placed = all(present(o) for o in new)
    return kept, placed and not any(present(o) for o in gone)


def edit_success(edited_images: list, target_scenes: list[Scene], tol: float = EDIT_TOLERANCE,
                 free: list[Collection[int]] | None = None) -> dict:
    """Share of edited images whose read scene matches the target; free[i] as in `scenes_match`."""
    if len(edited_images) != len(target_scenes):
        raise ValueError(f"{len(edited_images)} images for {len(target_scenes)} targets")
    free = free or [()] * len(target_scenes)
    hits = sum(scenes_match(read_scene(im).scene, t, tol, f) for im, t, f in zip(edited_images, target_scenes, free))
    return figure(hits, len(target_scenes))


# ------------------------------------------------------------------------------------------ driver

def one_image(out) -> Image.Image:
    """The image of a single-image call: `edit` and `text_to_image` return a list for a list input."""
    return out[0] if isinstance(out, (list, tuple)) else out


def _by_kind(score, kinds: list[str], order: tuple[str, ...], *columns: list) -> dict:
    """{"overall": score(*columns)} plus one score per kind, in `order`, on that kind's rows."""
    report = {"overall": score(*columns)}
    for kind in (k for k in order if k in kinds):
        pick = [i for i, k in enumerate(kinds) if k == kind]
        report[kind] = score(*([col[i] for i in pick] for col in columns))
    return report


def _share(hits: list[bool]) -> dict:
    return figure(sum(hits), len(hits))


def vqa_report(model, world: ShapesWorld, n: int, batch_size: int, kinds_order: tuple[str, ...],
                history_p: float) -> dict:
    """Exact-match accuracy on n held-out questions, kinds cycled, each after its earlier turns (if any)."""
    preds, answers, kinds = [], [], []
    for start in range(0, n, batch_size):
        samples = []
        for i in range(start, min(n, start + batch_size)):
            kinds.append(kinds_order[i % len(kinds_order)])
            samples.append(world.vqa_conversation(i, history_p, kinds[-1]))
        preds += model.answer([s.question for s in samples], images=[s.images for s in samples],
                              history=[s.history for s in samples])
        answers += [s.answer for s in samples]
    return _by_kind(vqa_accuracy, kinds, kinds_order, preds, answers)


def evaluate_model(model, n: int = 60, seed: int = 0, size: int = 64, batch_size: int = 8,
                   tasks: tuple[str, ...] = ("geneval", "vqa", "followup", "edit"), **sampling) -> dict:
    """Mini-GenEval on n prompts, then n held-out VQA samples, n follow-up questions and n held-out edits
    (kinds cycled, so each kind gets its own figure as well as the overall one; edits also report the two
    parts of `edit_parts`, "kept_intact" and "effect"). A follow-up is a
    single-image question asked after one or two earlier exchanges about the image (with their true
    answers). `sampling` (mode, num_inference_steps, guidance_scale, image_guidance_scale) goes to
    text_to_image and edit."""
    report: dict = {}
    world = ShapesWorld(size, seed, split="heldout")
    if "geneval" in tasks:
        prompts = geneval_prompts(n, seed)
        images: list = []
        for start in range(0, n, batch_size):
            chunk = [p for p, _ in prompts[start:start + batch_size]]
            images += list(model.text_to_image(chunk, seed=seed + start, progress=False, **sampling))
        report["geneval"] = score_geneval(images, [s for _, s in prompts])
    if "vqa" in tasks:
        report["vqa"] = vqa_report(model, world, n, batch_size, VQA_KINDS, history_p=0.0)
    if "followup" in tasks:
        report["followup"] = vqa_report(model, world, n, batch_size,
                                         tuple(k for k in VQA_KINDS if k != "compare"), history_p=1.0)
    if "edit" in tasks:
        hits, kept, effect, kinds = [], [], [], []
        edit_kwargs = {k: v for k, v in sampling.items() if k != "guidance_scale"}
        if "edit_guidance_scale" in sampling:
            edit_kwargs["guidance_scale"] = edit_kwargs.pop("edit_guidance_scale")
        for i in range(n):
            kinds.append(EDIT_KINDS[i % len(EDIT_KINDS)])
            source, instruction, target = world.edit_scenes(i, kinds[-1])
            found = read_scene(one_image(model.edit(source.render(), instruction, seed=seed + i, progress=False,
                                                    **edit_kwargs))).scene
            hits.append(scenes_match(found, target, free=unplaced_objects(kinds[-1], source, target)))
            parts = edit_parts(found, source, target, kinds[-1])
            kept.append(parts[0])
            effect.append(parts[1])
        report["edit"] = {**_by_kind(_share, kinds, EDIT_KINDS, hits),
                          "kept_intact": _share(kept), "effect": _share(effect)}
    return report


def sample_grid(model, seed: int = 0, columns: int = 6, scale: int = 2, **sampling) -> Image.Image:
    """A captioned picture for people: a row of text-to-image results (one per GenEval category) and a row
    of edits (source, then result, per edit kind), drawn at `scale`x with the prompts underneath."""
    from PIL import ImageDraw
    prompts = geneval_prompts(columns, seed)
    t2i = model.text_to_image([p for p, _ in prompts], seed=seed, progress=False, **sampling)
    world = ShapesWorld(64, seed, split="heldout")
    edit_kwargs = {k: v for k, v in sampling.items() if k not in ("guidance_scale", "edit_guidance_scale")}
    pairs = []
    for i, kind in enumerate(EDIT_KINDS[:columns // 2]):
        source, instruction, _ = world.edit_scenes(i, kind)
        src = source.render()
        pairs += [(src, "source"), (one_image(model.edit(src, instruction, seed=seed + i, progress=False,
                                                          **edit_kwargs)), instruction)]
    cells = [(im, p) for im, (p, _) in zip(t2i, prompts)] + pairs
    side, label = 64 * scale, 30
    rows = (len(cells) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * side, rows * (side + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (im, text) in enumerate(cells):
        x, y = (k % columns) * side, (k // columns) * (side + label)
        canvas.paste(im.resize((side, side), Image.Resampling.NEAREST), (x, y))
        draw.rectangle([x, y, x + side - 1, y + side - 1], outline=(200, 200, 200))
        words, lines = text.split(), [""]
        for w in words:
            lines[-1] = f"{lines[-1]} {w}".strip() if len(lines[-1]) + len(w) < 22 else lines[-1]
            if not lines[-1].endswith(w):
                lines.append(w)
        draw.multiline_text((x + 3, y + side + 2), "\n".join(lines[:2]), fill=(40, 40, 40), spacing=1)
    return canvas


def format_report(report: dict) -> str:
    """A markdown table: figure, value, 95% CI, n."""
    rows = ["| task | figure | value | 95% CI | n |", "|---|---|---|---|---|"]
    for task, figures in report.items():
        for name, f in figures.items():
            if isinstance(f, dict) and "value" in f:
                lo, hi = f["ci95"]
                rows.append(f"| {task} | {name} | {f['value']:.3f} | [{lo:.2f}, {hi:.2f}] | {f['n']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    import time

    p = argparse.ArgumentParser(prog="python -m ovis_u1.shapes.evaluate",
                                description="Evaluate a checkpoint on held-out shapes-world scenes.")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
    p.add_argument("--n", type=int, default=120, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="exact", choices=["exact", "fast", "plain"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--edit-guidance", type=float, default=None)
    p.add_argument("--image-guidance", type=float, default=None)
    p.add_argument("--tasks", default="geneval,vqa,followup,edit")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--grid", default=None, help="also save a PNG of generated and edited held-out samples")
    a = p.parse_args(argv)
    from ovis_u1.model import OvisU1
    model = OvisU1.from_pretrained(a.checkpoint)
    sampling = {"mode": a.mode}
    for key, value in (("num_inference_steps", a.steps), ("guidance_scale", a.guidance),
                       ("edit_guidance_scale", a.edit_guidance), ("image_guidance_scale", a.image_guidance)):
        if value is not None:
            sampling[key] = value
    t0 = time.perf_counter()
    report = evaluate_model(model, n=a.n, seed=a.seed, tasks=tuple(a.tasks.split(",")), **sampling)
    report["meta"] = {"checkpoint": a.checkpoint or "default", "n": a.n, "seed": a.seed, **sampling,
                      "seconds": round(time.perf_counter() - t0, 1)}
    print(format_report({k: v for k, v in report.items() if k != "meta"}))
    print(json.dumps(report["meta"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    if a.grid:
        sample_grid(model, seed=a.seed, **sampling).save(a.grid)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
