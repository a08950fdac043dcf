"""Users' own data as JSONL, one record a line, image paths relative to the JSONL file's folder:

    {"type": "t2i", "image": "a.png", "caption": "..."}
    {"type": "vqa", "images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                          {"from": "gpt", "value": "..."}]}
    {"type": "vqa", "images": ["a.png"], "question": "...", "answer": "..."}
    {"type": "edit", "source": "a.png", "instruction": "...", "target": "b.png"}

A VQA conversation is human and gpt turns in alternation (turns before the first human one are ignored); its last
exchange becomes the sample's question and answer and the earlier ones its history, and training puts
the loss on every answer. "<image>" placeholders are dropped from the questions (the processor places
the images at the start of the first turn itself). `write_jsonl` exports world samples in this
format, as an example to copy.

Reading is in two steps so a training set costs little memory: `scan_jsonl` parses every line and reads
only each image's header (size, format), skipping and counting what cannot be used; `materialise` decodes
one record's images when a batch needs them, resized to the training size. `load_jsonl` does both at once.
"""

from __future__ import annotations

import json
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ovis_u1.shapes.world import EditSample, Spec, T2ISample, VQASample

Sample = T2ISample | VQASample | EditSample
# Images above this are skipped from their header, before any decoding (the bound load_image applies).
MAX_IMAGE_PIXELS = 64_000_000


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One usable line of a JSONL file, its images not yet decoded. `images`: t2i (image,), vqa the
    question's images, edit (source, target)."""

    kind: str
    images: tuple[Path, ...]
    text: str  # caption, question or instruction
    answer: str = ""
    history: tuple[tuple[str, str], ...] = ()
    spec: Spec | None = None
    line: int = 0


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise _Skip("missing_fields")
    return value


class _Probe:
    """Checks image files from their headers alone, once per path."""

    def __init__(self, root: Path, max_pixels: int):
        self.root, self.max_pixels = root, max_pixels
        self.seen: dict[Path, str | None] = {}

    def __call__(self, rel) -> Path:
        if not isinstance(rel, str) or not rel:
            raise _Skip("missing_fields")
        path = self.root / rel
        if path not in self.seen:
            self.seen[path] = self._problem(path)
        if self.seen[path] is not None:
            raise _Skip(self.seen[path])
        return path

    def _problem(self, path: Path) -> str | None:
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # a folder, a pipe: nothing to decode
                return "missing_file"
        except (OSError, ValueError):
            return "missing_file"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
        except Image.DecompressionBombError:
            return "too_large"
        except Exception:  # PIL reports unknown or corrupt headers as OSError, ValueError or SyntaxError
            return "unreadable_image"
        if w < 1 or h < 1:
            return "unreadable_image"
        return "too_large" if w * h > self.max_pixels else None


def _exchanges(record: dict) -> list[tuple[str, str]]:
    """The record's (question, answer) exchanges, oldest first."""
    turns = record.get("conversations")
    if turns is None:
        return [(_text(record, "question"), _text(record, "answer"))]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise _Skip("missing_fields")
    while turns and turns[0].get("from") != "human":  # a system prompt or an opening greeting
        turns = turns[1:]
    if not turns or len(turns) % 2 or any(t.get("from") != ("human", "gpt")[k % 2] for k, t in enumerate(turns)):
        raise _Skip("missing_fields")
    pairs = [(re.sub(r"<image>\s*", "", _text(q, "value")).strip(), _text(a, "value"))
             for q, a in zip(turns[::2], turns[1::2])]
    if any(not q or "<image>" in a for q, a in pairs):
        raise _Skip("missing_fields")
    return pairs


def _parse(record, probe: _Probe, line: int) -> Record:
    if not isinstance(record, dict):
        raise _Skip("malformed_json")
    kind = record.get("type")
    if kind == "t2i":
        caption, spec = _text(record, "caption"), record.get("spec")
        try:
            spec = Spec.from_dict(spec) if spec else None
        except (KeyError, TypeError, AttributeError, ValueError):
            raise _Skip("missing_fields") from None
        return Record("t2i", (probe(record.get("image")),), caption, spec=spec, line=line)
    if kind == "vqa":
        *history, (question, answer) = _exchanges(record)
        paths = record.get("images", [record["image"]] if "image" in record else None)
        if not isinstance(paths, list) or not paths:
            raise _Skip("missing_fields")
        return Record("vqa", tuple(probe(p) for p in paths), question, answer, tuple(history), line=line)
    if kind == "edit":
        instruction = _text(record, "instruction")
        return Record("edit", (probe(record.get("source")), probe(record.get("target"))), instruction, line=line)
    raise _Skip("unknown_type")


def _scan(path: Path, max_pixels: int) -> tuple[list[Record], Counter, dict[str, int]]:
    records: list[Record] = []
    skipped: Counter = Counter()
    first_line: dict[str, int] = {}
    probe = _Probe(path.parent, max_pixels)
    # Binary lines, decoded one at a time: one line of bad UTF-8 is one skipped record, not a failed load.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                records.append(_parse(json.loads(line), probe, line_no))
            except (_Skip, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                # RecursionError: JSON nested deeper than the parser goes (e.g. 100k "[")
                reason = e.reason if isinstance(e, _Skip) else "not_utf8" if isinstance(e, UnicodeDecodeError) \
                    else "malformed_json"
                skipped[reason] += 1
                first_line.setdefault(reason, line_no)
    return records, skipped, first_line


def _warn_skipped(path: Path, skipped: Counter, first_line: dict[str, int], kept: int) -> None:
    if skipped:
        detail = ", ".join(f"{r}: {c} (first at line {first_line[r]})" for r, c in skipped.most_common())
        warnings.warn(f"{path}: skipped {sum(skipped.values())} of {sum(skipped.values()) + kept} "
                      f"records: {detail}", stacklevel=3)


def scan_jsonl(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[Record], dict[str, int]]:
    """-> (records, skipped reason -> count), decoding no image. Bad records are skipped, never raised:
    invalid UTF-8, malformed or too deeply nested JSON, missing fields, unknown type, missing image files,
    unreadable image headers, images over `max_pixels`; one warning summarises them."""
    path = Path(path)
    records, skipped, first_line = _scan(path, max_pixels)
    _warn_skipped(path, skipped, first_line, len(records))
    return records, dict(skipped)


def _decode(path: Path, size: int | None, square: bool) -> Image.Image:
    try:
        with Image.open(path) as im:
            if size is not None:
                im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that is enough
            image = ImageOps.exif_transpose(im).convert("RGB")
    except Exception:  # a header that read fine over data that does not (truncated, corrupt)
        raise _Skip("unreadable_image") from None
    if size is None:
        return image
    # Generation targets are size x size (centre-cropped to a square); understanding images keep their
    # aspect ratio, the longer side at `size`.
    if square:
        return ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
    return ImageOps.contain(image, (size, size), Image.Resampling.BICUBIC)


class UnusableRecord(ValueError):
    """A record whose images could not be decoded although their headers read fine."""


def materialise(record: Record, size: int | None = None) -> Sample:
    """The record as a sample with decoded RGB images, resized for training when `size` is given."""
    try:
        images = [_decode(p, size, square=record.kind != "vqa") for p in record.images]
    except _Skip as e:
        raise UnusableRecord(f"line {record.line}: {e.reason}") from None
    if record.kind == "t2i":
        return T2ISample(images[0], record.text, record.spec)
    if record.kind == "vqa":
        return VQASample(images, record.text, record.answer, list(record.history))
    return EditSample(images[0], record.text, images[1])


def load_jsonl(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[Sample], dict[str, int]]:
    """-> (samples, skipped reason -> count): `scan_jsonl` and every image decoded at its own size (small
    sets; training decodes lazily through `materialise`). One warning summarises the skipped records."""
    path = Path(path)
    records, skipped, first_line = _scan(path, max_pixels)
    samples = []
    for r in records:
        try:
            samples.append(materialise(r))
        except UnusableRecord:
            skipped["unreadable_image"] += 1
            first_line["unreadable_image"] = min(first_line.get("unreadable_image", r.line), r.line)
    _warn_skipped(path, skipped, first_line, len(samples))
    return samples, dict(skipped)


def write_jsonl(samples: list[Sample], folder: str | Path) -> Path:
    """Write samples as PNG files plus folder/data.jsonl (the format `load_jsonl` reads); -> its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def save(image: Image.Image, name: str) -> str:
        image.save(folder / name)
        return name

    records = []
    for i, s in enumerate(samples):
        if isinstance(s, T2ISample):
            record = {"type": "t2i", "image": save(s.image, f"{i:05d}.png"), "caption": s.caption}
            if s.spec is not None:
                record["spec"] = s.spec.to_dict()
        elif isinstance(s, VQASample):
            exchanges = [*s.history, (s.question, s.answer)]
            turns = [{"from": f, "value": v} for q, a in exchanges for f, v in (("human", q), ("gpt", a))]
            turns[0]["value"] = "<image>\n" * len(s.images) + turns[0]["value"]
            images = [save(im, f"{i:05d}_{j}.png") for j, im in enumerate(s.images)]
            record = {"type": "vqa", "images": images, "conversations": turns}
        elif isinstance(s, EditSample):
            record = {"type": "edit", "source": save(s.source, f"{i:05d}_source.png"),
                      "instruction": s.instruction, "target": save(s.target, f"{i:05d}_target.png")}
        else:
            raise TypeError(f"cannot export {type(s).__name__}")
        records.append(json.dumps(record))
    out = folder / "data.jsonl"
    out.write_text("\n".join(records) + "\n", encoding="utf-8")
    return out
