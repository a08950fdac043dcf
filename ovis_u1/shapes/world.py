"""The synthetic shapes world: flat-coloured circles, squares and triangles on a white canvas.

Everything is a pure function of a `np.random.Generator`, so a seed fixes a sample exactly. Images are
drawn without anti-aliasing (every pixel is white or one palette colour), which lets `reader.read_scene`
recover a generator scene exactly and makes every caption, answer and edit checkable by program.

Coordinates are pixels with pixel i spanning [i, i+1); `Obj.cx, Obj.cy` is the centre of the object's
bounding square and y grows downwards, so "above" means a smaller cy.

Templates (articles follow the next word: "an orange circle"; numbers are words, two..four):
  text-to-image, by category   single_object "a circle" | colors "a red circle" | counting "three squares",
      "three blue squares" | two_object "a circle and a triangle" | color_attr "a yellow triangle and a
      green circle" | position "a circle to the left of a square", "a red circle above a blue circle"
      (to the left of / to the right of / above / below) | scene: `describe` of a random scene
  questions -> answers   "What color is the triangle?" -> "red" | "What shape is the blue object?" ->
      "circle" | "How many squares are there?", "How many red objects are there?", "How many objects are
      there?" -> "zero".."four" | "Is the red circle to the left of the blue square?" -> "yes"/"no" |
      "Describe the image." -> `describe` | two images: "Which image has more circles?", "... fewer
      circles?", "Which image has a red square?" -> "the first image"/"the second image"
  edit instructions   "make the circle blue" | "remove the red square" | "add a green triangle" | "turn the
      square into a circle" (colour and box kept) | "move the circle to the left" (left/right/top/bottom:
      against that border); "the circle" when its shape is unique, else "the red circle" when that is
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)
# Fixed, well separated flat colours (closest pair: yellow/orange, ~70 apart in RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                    "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MIN_FRAC, MAX_FRAC = 1 / 5, 1 / 3  # object side as a fraction of the canvas side
MAX_OBJECTS = 4
POSITION_THRESHOLD = 0.1  # GenEval's: offsets shrink by this fraction of the two box sizes

# GenEval's six categories, plus "scene" (a canonical description of a random scene), training only.
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
T2I_CATEGORIES = (*GENEVAL_CATEGORIES, "scene")
VQA_KINDS = ("color", "shape", "count", "relation", "describe", "compare")
# Question kinds a training stage can ask for by name: the evaluated six plus "side" (which half of the
# image an object is in: one half of a relation question), a training aid outside the usual mix.
TRAIN_VQA_KINDS = (*VQA_KINDS, "side")
EDIT_KINDS = ("recolor", "remove", "add", "replace", "move")


# ----------------------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES ("unknown" only in a reader's output)
    color: str  # one of COLOR_NAMES ("unknown" only in a reader's output)
    cx: float  # centre of the bounding square
    cy: float
    size: float  # side of the bounding square; a triangle spans it fully (apex top-centre, base bottom)

    def mask(self, canvas: int) -> np.ndarray:
        """Boolean canvas x canvas mask of the pixels whose centres fall inside the shape."""
        c = np.arange(canvas) + 0.5
        dx, dy = c[None, :] - self.cx, c[:, None] - self.cy
        half = self.size / 2
        if self.shape == "square":
            return (np.abs(dx) < half) & (np.abs(dy) < half)
        if self.shape == "circle":
            return dx * dx + dy * dy <= half * half
        if self.shape == "triangle":
            depth = dy + half  # distance below the apex
            return (depth > 0) & (depth < self.size) & (np.abs(dx) <= depth / 2)
        raise ValueError(f"cannot draw shape {self.shape!r}")


@dataclass
class Scene:
    objects: list[Obj]
    size: int = 64

    def render(self) -> Image.Image:
        canvas = np.full((self.size, self.size, 3), 255, np.uint8)
        for obj in self.objects:
            canvas[obj.mask(self.size)] = COLORS[obj.color]
        return Image.fromarray(canvas)


def cell_objects(scene: Scene, rows: int, cols: int) -> list[Obj | None]:
    """For each cell of a rows x cols grid over the canvas (raster order), the object covering most of its
    pixels, or None where the cell is empty: what a visual token of that cell should name."""
    masks = [o.mask(scene.size) for o in scene.objects]
    ys = [round(r * scene.size / rows) for r in range(rows + 1)]
    xs = [round(c * scene.size / cols) for c in range(cols + 1)]
    out = []
    for r in range(rows):
        for c in range(cols):
            cover = [int(m[ys[r]:ys[r + 1], xs[c]:xs[c + 1]].sum()) for m in masks]
            best = max(range(len(cover)), key=cover.__getitem__, default=None)
            out.append(None if best is None or cover[best] == 0 else scene.objects[best])
    return out


def relations(a: Obj, b: Obj) -> set[str]:
    """GenEval's relative position of a to b: {"left of", "above", ...}, possibly two or none."""
    offset = np.array([a.cx - b.cx, a.cy - b.cy], float)
    norm = float(np.linalg.norm(offset))
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (a.size + b.size), 0) * np.sign(offset)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def _clearly(a: Obj, b: Obj, relation: str) -> bool:
    """The relation holds and its axis dominates 2:1, so no perpendicular relation can hold too."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
    sign = -1 if relation in ("left of", "above") else 1
    return along * sign > 0 and abs(along) >= 2 * abs(across) and relations(a, b) == {relation}


# ------------------------------------------------------------------------------------------- text

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(shape: str, color: str | None = None, count: int = 1) -> str:
    """'a circle', 'an orange square', 'three blue triangles'."""
    noun = " ".join(w for w in (color, shape + ("s" if count != 1 else "")) if w)
    return f"{_article(noun) if count == 1 else NUMBER_WORDS[count]} {noun}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _groups(pairs: list[tuple[str, str]]) -> list[tuple[str, str, int]]:
    """(shape, colour, count) of identical objects in canonical order: shape, then palette colour
    (a reader's "unknown" sorts last)."""
    def rank(seq: tuple[str, ...], x: str) -> int:
        return seq.index(x) if x in seq else len(seq)

    counts = Counter(pairs)
    order = sorted(counts, key=lambda k: (rank(SHAPES, k[0]), rank(COLOR_NAMES, k[1]), k))
    return [(shape, color, counts[shape, color]) for shape, color in order]


def describe(scene: Scene) -> str:
    """Canonical caption, e.g. 'two red circles and a blue square'."""
    groups = _groups([(o.shape, o.color) for o in scene.objects])
    if not groups:
        return "an empty canvas"
    return _join([phrase(shape, color, count) for shape, color, count in groups])


@dataclass(frozen=True)
class SpecItem:
    shape: str
    color: str | None = None  # None: any colour
    count: int = 1


@dataclass(frozen=True)
class Spec:
    """What a text-to-image caption demands: exactly these objects (no others), and items[0]
    `relation` items[1] when a relation is given."""

    category: str
    items: tuple[SpecItem, ...]
    relation: str | None = None

    def caption(self) -> str:
        parts = [phrase(it.shape, it.color, it.count) for it in self.items]
        if self.relation:
            return f"{parts[0]} {RELATION_PHRASES[self.relation]} {parts[1]}"
        return _join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        return cls(d["category"], tuple(SpecItem(**it) for it in d["items"]), d.get("relation"))


# ----------------------------------------------------------------------------------------- layout

def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _pick_other(rng: np.random.Generator, seq, *exclude):
    return _pick(rng, [x for x in seq if x not in exclude])


def _gap(canvas: int) -> int:
    """Clear pixels kept between objects and from the border, so components never touch."""
    return max(2, round(canvas / 32))


def _side_range(canvas: int) -> tuple[int, int]:
    return math.ceil(canvas * MIN_FRAC), math.floor(canvas * MAX_FRAC)


def _random_side(rng: np.random.Generator, canvas: int) -> int:
    lo, hi = _side_range(canvas)
    return int(rng.integers(lo, hi + 1))


def _random_obj(rng: np.random.Generator, canvas: int, shape: str, color: str, side: int) -> Obj:
    # Integer box corners keep the rasterisation symmetric about the centre.
    m = _gap(canvas)
    x0, y0 = rng.integers(m, canvas - m - side + 1, size=2)
    return Obj(shape, color, int(x0) + side / 2, int(y0) + side / 2, side)


def _apart(a: Obj, b: Obj, gap: int) -> bool:
    reach = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def fits_on_canvas(obj: Obj, others: list[Obj], canvas: int) -> bool:
    """Whether `obj` lies inside the canvas's margin and keeps the world's gap to each of `others`."""
    lo, hi = _gap(canvas) + obj.size / 2, canvas - _gap(canvas) - obj.size / 2
    inside = lo <= obj.cx <= hi and lo <= obj.cy <= hi
    return inside and all(_apart(obj, o, _gap(canvas)) for o in others)


def _layout(rng: np.random.Generator, canvas: int, kinds: list[tuple[str, str, int]],
            accept: Callable[[list[Obj]], bool] | None = None, attempts: int = 300) -> list[Obj]:
    """Place (shape, colour, side) objects at random without overlap; `accept` filters whole layouts."""
    lo, _ = _side_range(canvas)
    for attempt in range(attempts):
        objs: list[Obj] = []
        for shape, color, side in kinds:
            side = lo if attempt >= attempts // 2 else side  # a crowded canvas: fall back to small objects
            for _ in range(50):
                obj = _random_obj(rng, canvas, shape, color, side)
                if fits_on_canvas(obj, objs, canvas):
                    objs.append(obj)
                    break
            else:
                break
        else:
            if accept is None or accept(objs):
                return objs
    raise RuntimeError(f"could not lay out {kinds} on a {canvas}px canvas")


def _scene(rng: np.random.Generator, canvas: int, pairs: list[tuple[str, str]],
           accept: Callable[[list[Obj]], bool] | None = None) -> Scene:
    kinds = [(shape, color, _random_side(rng, canvas)) for shape, color in pairs]
    return Scene(_layout(rng, canvas, kinds, accept), canvas)


def _random_pairs(rng: np.random.Generator, n: int, shapes=SHAPES,
                  colors=COLOR_NAMES) -> list[tuple[str, str]]:
    return [(_pick(rng, shapes), _pick(rng, colors)) for _ in range(n)]


def random_scene(rng: np.random.Generator, size: int = 64, n: int | None = None) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n is None else n
    return _scene(rng, size, _random_pairs(rng, n))


# ---------------------------------------------------------------------------------- text-to-image

def sample_spec(rng: np.random.Generator, category: str | None = None, colored: bool | None = None) -> Spec:
    """A caption spec of a category. `colored` (None: random) picks the coloured form of the
    categories that have both ("three squares" / "three blue squares"; likewise position)."""
    category = category or _pick(rng, T2I_CATEGORIES)
    colored = bool(rng.random() < 0.5) if colored is None else colored
    s1 = _pick(rng, SHAPES)
    s2 = _pick_other(rng, SHAPES, s1)
    c1 = _pick(rng, COLOR_NAMES)
    c2 = _pick_other(rng, COLOR_NAMES, c1)
    if category == "single_object":
        return Spec(category, (SpecItem(s1),))
    if category == "colors":
        return Spec(category, (SpecItem(s1, c1),))
    if category == "counting":
        return Spec(category, (SpecItem(s1, c1 if colored else None, int(rng.integers(2, MAX_OBJECTS + 1))),))
    if category == "two_object":
        return Spec(category, (SpecItem(s1), SpecItem(s2)))
    if category == "color_attr":
        return Spec(category, (SpecItem(s1, c1), SpecItem(s2, c2)))
    if category == "position":
        # Coloured pairs may share a shape ("a red circle above a blue circle"); plain ones may not.
        second = SpecItem(_pick(rng, SHAPES), c2) if colored else SpecItem(s2)
        return Spec(category, (SpecItem(s1, c1 if colored else None), second), _pick(rng, RELATIONS))
    if category == "scene":
        groups = _groups(_random_pairs(rng, int(rng.integers(1, MAX_OBJECTS + 1))))
        return Spec(category, tuple(SpecItem(*g) for g in groups))
    raise ValueError(f"unknown text-to-image category {category!r}")


def scene_for_spec(rng: np.random.Generator, spec: Spec, size: int = 64) -> Scene:
    """A random scene that satisfies `spec` exactly; a count of one shape shares colour and size."""
    kinds = []
    for item in spec.items:
        color, side = item.color or _pick(rng, COLOR_NAMES), _random_side(rng, size)
        kinds += [(item.shape, color, side)] * item.count
    accept = (lambda objs: _clearly(objs[0], objs[1], spec.relation)) if spec.relation else None
    return Scene(_layout(rng, size, kinds, accept), size)


def sample_t2i(rng: np.random.Generator, category: str | None = None, size: int = 64,
               colored: bool | None = None) -> tuple[Scene, str, Spec]:
    spec = sample_spec(rng, category, colored)
    return scene_for_spec(rng, spec, size), spec.caption(), spec


# ---------------------------------------------------------------------------------- understanding
# The question templates, shared by the generators below and `scene_question`.
DESCRIBE_QUESTION = "Describe the image."


def _color_question(shape: str) -> str:
    return f"What color is the {shape}?"


def shape_question(color: str) -> str:
    return f"What shape is the {color} object?"


def _count_question(by: str, value: str | None = None) -> str:
    if by == "total":
        return "How many objects are there?"
    return f"How many {value}s are there?" if by == "shape" else f"How many {value} objects are there?"


def _vqa_color(rng, size):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    others = _random_pairs(rng, int(rng.integers(0, MAX_OBJECTS)), shapes=[s for s in SHAPES if s != shape])
    return [_scene(rng, size, [(shape, color), *others])], _color_question(shape), color


def _vqa_shape(rng, size):
    shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
    others = _random_pairs(rng, int(rng.integers(0, MAX_OBJECTS)),
                           colors=[c for c in COLOR_NAMES if c != color])
    return [_scene(rng, size, [(shape, color), *others])], shape_question(color), shape


def _counted(rng, size, k, by: str, value: str | None) -> Scene:
    """A scene with exactly k objects of shape/colour `value` (by="shape"/"color") and 0+ others."""
    m = int(rng.integers(max(0, 1 - k), MAX_OBJECTS - k + 1))
    if by == "shape":
        rest = [s for s in SHAPES if s != value]
        pairs = _random_pairs(rng, k, shapes=[value]) + _random_pairs(rng, m, shapes=rest)
    else:
        rest = [c for c in COLOR_NAMES if c != value]
        pairs = _random_pairs(rng, k, colors=[value]) + _random_pairs(rng, m, colors=rest)
    order = rng.permutation(len(pairs))
    return _scene(rng, size, [pairs[i] for i in order])


def _vqa_count(rng, size):
    by = _pick(rng, ("shape", "color", "total"))
    if by == "total":
        k = int(rng.integers(1, MAX_OBJECTS + 1))
        return [random_scene(rng, size, k)], _count_question(by), NUMBER_WORDS[k]
    k = int(rng.integers(0, MAX_OBJECTS + 1))
    value = _pick(rng, SHAPES if by == "shape" else COLOR_NAMES)
    return [_counted(rng, size, k, by, value)], _count_question(by, value), NUMBER_WORDS[k]


def _vqa_relation(rng, size):
    a = (_pick(rng, SHAPES), _pick(rng, COLOR_NAMES))
    b = (_pick(rng, SHAPES), _pick_other(rng, COLOR_NAMES, a[1]))
    extra = [p for p in _random_pairs(rng, int(rng.integers(0, 2))) if p not in (a, b)]
    true = _pick(rng, RELATIONS)
    scene = _scene(rng, size, [a, b, *extra], accept=lambda objs: _clearly(objs[0], objs[1], true))
    swap = bool(rng.random() < 0.5)
    x, y = scene.objects[1::-1] if swap else scene.objects[:2]
    holds = OPPOSITE[true] if swap else true
    asked = holds if rng.random() < 0.5 else _pick_other(rng, RELATIONS, holds)  # yes half the time
    question = f"Is the {x.color} {x.shape} {RELATION_PHRASES[asked]} the {y.color} {y.shape}?"
    return [scene], question, "yes" if asked in relations(x, y) else "no"


def _vqa_side(rng, size):
    """Which half one object is in ("Is the red circle on the left or on the right?" -> "left"): a
    diagnostic kind, not in VQA_KINDS (the first half of a relation question: find an object, read where)."""
    a = (_pick(rng, SHAPES), _pick(rng, COLOR_NAMES))
    extra = [p for p in _random_pairs(rng, int(rng.integers(0, 3))) if p != a]
    axis = _pick(rng, ("x", "y"))
    scene = _scene(rng, size, [a, *extra],
                   accept=lambda objs: abs(getattr(objs[0], "c" + axis) - size / 2) >= size / 8)
    x = scene.objects[0]
    if axis == "x":
        question, answer = "on the left or on the right", "left" if x.cx < size / 2 else "right"
    else:
        question, answer = "at the top or at the bottom", "top" if x.cy < size / 2 else "bottom"
    return [scene], f"Is the {x.color} {x.shape} {question}?", answer


def _vqa_describe(rng, size):
    scene = random_scene(rng, size)
    return [scene], DESCRIBE_QUESTION, describe(scene)


def _vqa_compare(rng, size):
    how = _pick(rng, ("more", "fewer", "has"))
    if how == "has":
        shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
        others = [p for p in _random_pairs(rng, MAX_OBJECTS) if p != (shape, color)]
        with_it = _scene(rng, size, [(shape, color), *others[:int(rng.integers(0, MAX_OBJECTS))]])
        without = _scene(rng, size, others[:int(rng.integers(1, len(others) + 1))] if others else
                         [(_pick_other(rng, SHAPES, shape), color)])
        first = bool(rng.random() < 0.5)
        scenes = [with_it, without] if first else [without, with_it]
        question = f"Which image has {phrase(shape, color)}?"
    else:
        shape = _pick(rng, SHAPES)
        ka, kb = (int(k) for k in rng.choice(MAX_OBJECTS + 1, size=2, replace=False))
        scenes = [_counted(rng, size, ka, "shape", shape), _counted(rng, size, kb, "shape", shape)]
        first = (ka > kb) == (how == "more")
        question = f"Which image has {how} {shape}s?"
    return scenes, question, "the first image" if first else "the second image"


_VQA = {"color": _vqa_color, "shape": _vqa_shape, "count": _vqa_count, "relation": _vqa_relation,
        "describe": _vqa_describe, "compare": _vqa_compare, "side": _vqa_side}


def scene_question(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    """A (question, answer) about an existing scene, in the world's VQA forms: a count, the description,
    or the colour or shape of an object its shape or colour singles out."""
    objs = scene.objects
    by_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    by_color = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    forms = ["total", "shape", "color", "describe"] + ["color_of"] * bool(by_shape) + ["shape_of"] * bool(by_color)
    form = _pick(rng, forms)
    if form == "total":
        return _count_question("total"), NUMBER_WORDS[len(objs)]
    if form == "shape":
        shape = _pick(rng, SHAPES)
        return _count_question("shape", shape), NUMBER_WORDS[sum(o.shape == shape for o in objs)]
    if form == "color":
        color = _pick(rng, COLOR_NAMES)
        return _count_question("color", color), NUMBER_WORDS[sum(o.color == color for o in objs)]
    if form == "describe":
        return DESCRIBE_QUESTION, describe(scene)
    if form == "color_of":
        obj = _pick(rng, by_shape)
        return _color_question(obj.shape), obj.color
    obj = _pick(rng, by_color)
    return shape_question(obj.color), obj.shape


def sample_vqa(rng: np.random.Generator, kind: str | None = None,
               size: int = 64) -> tuple[list[Scene], str, str]:
    """(scenes, question, answer); answers are short, lowercase and exact."""
    return _VQA[kind or _pick(rng, VQA_KINDS)](rng, size)


# ---------------------------------------------------------------------------------------- editing

def _refer(rng, scene: Scene, i: int) -> str | None:
    """'the circle' when its shape is unique (half the time), else 'the red circle' if that is unique."""
    obj = scene.objects[i]
    if sum(o.shape == obj.shape for o in scene.objects) == 1 and rng.random() < 0.5:
        return f"the {obj.shape}"
    if sum((o.shape, o.color) == (obj.shape, obj.color) for o in scene.objects) == 1:
        return f"the {obj.color} {obj.shape}"
    return None


def _with(scene: Scene, i: int, obj: Obj | None) -> Scene:
    objs = list(scene.objects)
    if obj is None:
        del objs[i]
    else:
        objs[i] = obj
    return Scene(objs, scene.size)


def _edit(rng, size, kind):
    """One attempt at an edit of `kind`; None when the drawn scene does not allow it."""
    lo = {"remove": 2}.get(kind, 1)
    hi = MAX_OBJECTS - 1 if kind == "add" else MAX_OBJECTS
    src = random_scene(rng, size, int(rng.integers(lo, hi + 1)))
    if kind == "add":
        shape, color = _pick(rng, SHAPES), _pick(rng, COLOR_NAMES)
        side = _random_side(rng, size)
        for _ in range(50):
            new = _random_obj(rng, size, shape, color, side)
            if fits_on_canvas(new, src.objects, size):
                return src, f"add {phrase(shape, color)}", Scene([*src.objects, new], size)
        return None
    i = int(rng.integers(len(src.objects)))
    obj, ref = src.objects[i], _refer(rng, src, i)
    if ref is None:
        return None
    if kind == "recolor":
        color = _pick_other(rng, COLOR_NAMES, obj.color)
        return src, f"make {ref} {color}", _with(src, i, dataclasses.replace(obj, color=color))
    if kind == "remove":
        return src, f"remove {ref}", _with(src, i, None)
    if kind == "replace":
        shape = _pick_other(rng, SHAPES, obj.shape)
        return src, f"turn {ref} into {phrase(shape)}", _with(src, i, dataclasses.replace(obj, shape=shape))
    if kind == "move":
        # "To the left" means against the left border (keeping the gap), so the target is exact.
        side = _pick(rng, ("left", "right", "top", "bottom"))
        edge = _gap(size) + obj.size / 2 if side in ("left", "top") else size - _gap(size) - obj.size / 2
        moved = dataclasses.replace(obj, **{"cx" if side in ("left", "right") else "cy": edge})
        others = [o for j, o in enumerate(src.objects) if j != i]
        if abs(moved.cx - obj.cx) + abs(moved.cy - obj.cy) < size / 4 or not fits_on_canvas(moved, others, size):
            return None
        return src, f"move {ref} to the {side}", _with(src, i, moved)
    raise ValueError(f"unknown edit kind {kind!r}")


def sample_edit(rng: np.random.Generator, kind: str | None = None,
                size: int = 64) -> tuple[Scene, str, Scene]:
    """(source, instruction, target): the target differs from the source only by the instruction."""
    kind = kind or _pick(rng, EDIT_KINDS)
    for _ in range(200):
        out = _edit(rng, size, kind)
        if out is not None:
            return out
    raise RuntimeError(f"could not sample a {kind!r} edit")


# ------------------------------------------------------------------------------------ samples/world

@dataclass
class T2ISample:
    image: Image.Image
    caption: str
    spec: Spec | None = None


@dataclass
class VQASample:
    images: list[Image.Image]
    question: str
    answer: str
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # earlier (question, answer)s


@dataclass
class EditSample:
    source: Image.Image
    instruction: str
    target: Image.Image


@dataclass
class CellSample:
    """An image and its scene, for learning to name the object in each cell (`cell_objects`)."""
    image: Image.Image
    scene: Scene


_SPLITS = {"train": 0, "heldout": 1}
_TASKS = {"t2i": 0, "vqa": 1, "edit": 2, "mixed": 3, "cells": 4}


class ShapesWorld:
    """Indexable, deterministic sample streams: sample i of a task is drawn from a generator seeded by
    (seed, split, task, i), so splits never share a seed and any index is reproducible in isolation.

    `t2i/vqa/edit(i)` return rendered samples; `t2i_scene/vqa_scenes/edit_scenes(i)` return the same
    sample's Scene objects (for evaluation). Passing `category`/`kind` draws a different sample.
    """

    def __init__(self, size: int = 64, seed: int = 0, split: str = "train"):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        self.size, self.seed, self.split = size, seed, split

    def rng(self, task: str, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLITS[self.split], _TASKS[task], i])

    def draw(self, task: str, i: int) -> float:
        """A uniform number in [0, 1) for sample i of a task, from a stream of its own (a training mix's
        choices, which must not change the sample's own draws)."""
        return float(np.random.default_rng([self.seed, _SPLITS[self.split], _TASKS[task], i, 2]).random())

    def t2i_scene(self, i: int, category: str | None = None) -> tuple[Scene, str, Spec]:
        return sample_t2i(self.rng("t2i", i), category, self.size)

    def vqa_scenes(self, i: int, kind: str | None = None) -> tuple[list[Scene], str, str]:
        return sample_vqa(self.rng("vqa", i), kind, self.size)

    def edit_scenes(self, i: int, kind: str | None = None) -> tuple[Scene, str, Scene]:
        return sample_edit(self.rng("edit", i), kind, self.size)

    def t2i(self, i: int, category: str | None = None) -> T2ISample:
        scene, caption, spec = self.t2i_scene(i, category)
        return T2ISample(scene.render(), caption, spec)

    def vqa(self, i: int, kind: str | None = None) -> VQASample:
        scenes, question, answer = self.vqa_scenes(i, kind)
        return VQASample([s.render() for s in scenes], question, answer)

    def vqa_conversation(self, i: int, history_p: float, kind: str | None = None) -> VQASample:
        """`vqa(i, kind)` (same images, question and answer), where a single-image sample gets one or two
        earlier exchanges about its image with probability `history_p` (drawn from their own stream, so
        the final question stays sample i's)."""
        scenes, question, answer = self.vqa_scenes(i, kind)
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], _TASKS["vqa"], i, 1])
        history = []
        if len(scenes) == 1 and rng.random() < history_p:
            history = [scene_question(rng, scenes[0]) for _ in range(int(rng.integers(1, 3)))]
        return VQASample([s.render() for s in scenes], question, answer, history)

    def edit(self, i: int, kind: str | None = None) -> EditSample:
        source, instruction, target = self.edit_scenes(i, kind)
        return EditSample(source.render(), instruction, target.render())

    def cells(self, i: int) -> CellSample:
        scene = random_scene(self.rng("cells", i), self.size)
        return CellSample(scene.render(), scene)

    def mixed(self, i: int, weights: dict[str, float] | None = None) -> T2ISample | VQASample | EditSample:
        """Sample i of a task mixture (default: equal weights over t2i, vqa, edit)."""
        weights = weights or {"t2i": 1.0, "vqa": 1.0, "edit": 1.0}
        tasks, p = list(weights), np.array(list(weights.values()), float)
        task = tasks[int(self.rng("mixed", i).choice(len(tasks), p=p / p.sum()))]
        return getattr(self, task)(i)


def world_text_corpus(n: int, seed: int = 0) -> list[str]:
    """n lines of world text (captions, "question answer" pairs, edit instructions) for pretraining a
    small language model and fitting its tokenizer."""
    rng = np.random.default_rng([seed, 99])
    lines = []
    for i in range(n):
        task = i % 3
        if task == 0:
            lines.append(sample_spec(rng).caption())
        elif task == 1:
            _, question, answer = sample_vqa(rng)
            lines.append(f"{question} {answer}")
        else:
            lines.append(sample_edit(rng)[1])
    return lines
