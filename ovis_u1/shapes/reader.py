"""Programmatic scene reader: turns an image (generated or rendered) back into a list of objects.

Pipeline: nearest-palette pixel classes (white + 6 colours, 'unknown' when far from all) ->
8-connected components per class (run-length union-find, numpy + plain Python) -> specks dropped ->
shape by IoU with ideal templates stretched to the bounding box (the template IoU of a square is the
box fill ratio; circle pi/4 and triangle 1/2 against it) -> position from the centroid.
Renders of `world.Scene` are read exactly; blurry or noisy model outputs degrade gracefully.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ovis_u1.shapes.world import COLORS, MIN_FRAC, WHITE, Obj, Scene

CLASS_NAMES = ("white", *COLORS, "unknown")
PALETTE = np.array([WHITE, *COLORS.values()], np.float32)  # class k = CLASS_NAMES[k]; unknown = len
UNKNOWN = len(PALETTE)
MAX_DIST = 80.0  # RGB distance beyond which a pixel is no palette colour (blend of two, or off-palette)
SPECK_FRAC = 0.25  # components under this fraction of the smallest object's area are specks
MIN_IOU = 0.7  # a component matching no shape template this well is an "unknown" shape


@dataclass
class Reading:
    objects: list[Obj]
    size: int
    specks: int = 0  # ignored palette-coloured components (too small or too thin)
    unknown_pixels: int = 0  # pixels far from every palette colour
    matches: list[float] = field(default_factory=list)  # per object: IoU with its shape template

    @property
    def scene(self) -> Scene:
        return Scene(list(self.objects), self.size)


def classify_pixels(rgb: np.ndarray, max_dist: float = MAX_DIST) -> np.ndarray:
    """H W 3 -> H W class indices into CLASS_NAMES.

    Each pixel goes to the nearest of white and the six colours, measured along the white-to-colour
    blend lines: a pixel at least halfway from white to a colour is that colour, one short of halfway
    is white, and one farther than `max_dist` from every blend line is UNKNOWN. For a flat render this
    is plain nearest-palette; for a blurred one the halfway rule puts each edge where the sharp edge
    was (plain nearest-palette distance would turn the blended rim into 'unknown' and shrink shapes).
    """
    p = rgb[..., :3].astype(np.float32) - PALETTE[0]  # H W 3, relative to white
    v = PALETTE[1:] - PALETTE[0]  # 6 3 white -> colour
    t = np.clip(p @ v.T / (v * v).sum(-1), 0, 1)  # H W 6 position along each blend line
    d2 = ((p[..., None, :] - t[..., None] * v) ** 2).sum(-1)  # H W 6 squared distance to the line
    best = d2.argmin(-1)
    t_best = np.take_along_axis(t, best[..., None], -1)[..., 0]
    cls = np.where(t_best >= 0.5, best + 1, 0)
    cls[np.take_along_axis(d2, best[..., None], -1)[..., 0] > max_dist * max_dist] = UNKNOWN
    return cls


def label_components(cls: np.ndarray, background: int = 0) -> tuple[np.ndarray, list[int]]:
    """8-connected components of equal class, background excluded -> (H W labels, -1 = none; classes)."""
    height, width = cls.shape
    parent: list[int] = []

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    runs, prev = [], []  # runs: (row, start, stop, id); prev: previous row's (start, stop, class, id)
    for y in range(height):
        row = cls[y]
        edges = (np.flatnonzero(np.diff(row)) + 1).tolist()
        cur, k = [], 0
        for s, e in zip([0, *edges], [*edges, width]):
            c = int(row[s])
            if c == background:
                continue
            rid = len(parent)
            parent.append(rid)
            while k < len(prev) and prev[k][1] < s:  # previous runs ending left of s - 1 cannot touch
                k += 1
            j = k
            while j < len(prev) and prev[j][0] <= e:  # diagonal contact: [s-1, e] overlaps [ps, pe)
                if prev[j][2] == c:
                    parent[find(rid)] = find(prev[j][3])
                j += 1
            cur.append((s, e, c, rid))
            runs.append((y, s, e, rid))
        prev = cur
    labels = np.full(cls.shape, -1, np.int64)
    ids: dict[int, int] = {}
    classes: list[int] = []
    for y, s, e, rid in runs:
        root = find(rid)
        if root not in ids:
            ids[root] = len(classes)
            classes.append(int(cls[y, s]))
        labels[y, s:e] = ids[root]
    return labels, classes


def _interior(cls: np.ndarray) -> np.ndarray:
    """Pixels whose whole 3x3 neighbourhood has their class (a one-step erosion of every class)."""
    h, w = cls.shape
    padded = np.pad(cls, 1, constant_values=-1)
    same = np.ones(cls.shape, bool)
    for dy in range(3):
        for dx in range(3):
            same &= padded[dy:dy + h, dx:dx + w] == cls
    return same


def _templates(w: int, h: int) -> dict[str, np.ndarray]:
    """Ideal upright shapes stretched to a w x h box, in the box's pixel-centre coordinates."""
    u = (np.arange(w) + 0.5)[None, :] / w - 0.5
    v = (np.arange(h) + 0.5)[:, None] / h
    return {"square": np.ones((h, w), bool), "circle": u * u + (v - 0.5) ** 2 <= 0.25,
            "triangle": np.abs(u) <= v / 2}


def classify_shape(mask: np.ndarray, min_iou: float = MIN_IOU) -> tuple[str, float]:
    """Shape of a component cropped to its bounding box -> (best shape, its template IoU); the IoU
    uses the whole outline, so it separates shapes better than the box fill ratio alone."""
    h, w = mask.shape
    if not 0.7 <= w / h <= 1.45:  # even-sized triangles lose their apex row, so allow a little height loss
        return "unknown", 0.0
    ious = {name: float((mask & t).sum() / (mask | t).sum()) for name, t in _templates(w, h).items()}
    shape = max(ious, key=ious.get)
    return (shape, ious[shape]) if ious[shape] >= min_iou else ("unknown", ious[shape])


def read_scene(image: Image.Image | np.ndarray, max_dist: float = MAX_DIST,
               speck_frac: float = SPECK_FRAC) -> Reading:
    rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)[..., :3]
    height, width = rgb.shape[:2]
    cls = classify_pixels(rgb, max_dist)
    labels, classes = label_components(cls)
    n = len(classes)
    inside = labels >= 0
    lab = labels[inside]
    ys, xs = np.nonzero(inside)
    area = np.bincount(lab, minlength=n)
    mean_x = np.bincount(lab, xs, minlength=n) / np.maximum(area, 1)
    mean_y = np.bincount(lab, ys, minlength=n) / np.maximum(area, 1)
    x0, y0 = np.full(n, width), np.full(n, height)
    x1, y1 = np.zeros(n, int), np.zeros(n, int)
    np.minimum.at(x0, lab, xs)
    np.minimum.at(y0, lab, ys)
    np.maximum.at(x1, lab, xs + 1)
    np.maximum.at(y1, lab, ys + 1)
    interior = np.bincount(labels[_interior(cls) & inside], minlength=n)
    speck_area = speck_frac * 0.5 * (width * MIN_FRAC) ** 2  # a fraction of the smallest triangle

    objects, matches, specks = [], [], 0
    for i, c in enumerate(classes):
        # Thin components (blended rims, strokes) have no interior pixel and are never objects; an
        # off-palette blob must be solid throughout, since blurred edges leave bands of blends.
        if area[i] < speck_area or interior[i] < (speck_area if c == UNKNOWN else 1):
            specks += c != UNKNOWN
            continue
        box = (slice(y0[i], y1[i]), slice(x0[i], x1[i]))
        shape, match = classify_shape(labels[box] == i)
        cx, cy = float(mean_x[i]) + 0.5, float(mean_y[i]) + 0.5
        side = float(max(x1[i] - x0[i], y1[i] - y0[i]))
        if shape == "triangle":
            cy -= side / 6  # a triangle's centroid lies 2/3 down its box; report the box centre
        objects.append(Obj(shape, CLASS_NAMES[c], cx, cy, side))
        matches.append(match)
    return Reading(objects, width, specks, int((cls == UNKNOWN).sum()), matches)
