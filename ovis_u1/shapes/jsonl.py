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
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image

from ovis_u1.shapes.world import EditSample, Spec, T2ISample, VQASample

Sample = T2ISample | VQASample | EditSample


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise _Skip("missing_fields")
    return value


def _image(root: Path, rel) -> Image.Image:
    if not isinstance(rel, str):
        raise _Skip("missing_fields")
    path = root / rel
    if not path.is_file():
        raise _Skip("missing_file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception:  # PIL reports corrupt files as OSError, ValueError or even SyntaxError
        raise _Skip("unreadable_image") from None


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


def _parse(record, root: Path) -> Sample:
    if not isinstance(record, dict):
        raise _Skip("malformed_json")
    kind = record.get("type")
    if kind == "t2i":
        caption, spec = _text(record, "caption"), record.get("spec")
        try:
            spec = Spec.from_dict(spec) if spec else None
        except (KeyError, TypeError, AttributeError):
            raise _Skip("missing_fields") from None
        return T2ISample(_image(root, record.get("image")), caption, spec)
    if kind == "vqa":
        *history, (question, answer) = _exchanges(record)
        paths = record.get("images", [record["image"]] if "image" in record else None)
        if not isinstance(paths, list) or not paths:
            raise _Skip("missing_fields")
        return VQASample([_image(root, p) for p in paths], question, answer, history)
    if kind == "edit":
        instruction = _text(record, "instruction")
        return EditSample(_image(root, record.get("source")), instruction, _image(root, record.get("target")))
    raise _Skip("unknown_type")


def load_jsonl(path: str | Path) -> tuple[list[Sample], dict[str, int]]:
    """-> (samples, skipped reason -> count). Bad records are skipped, never raised: malformed JSON,
    missing fields, unknown type, missing or unreadable image files; one warning summarises them."""
    path = Path(path)
    samples: list[Sample] = []
    skipped: Counter = Counter()
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(_parse(json.loads(line), path.parent))
            except (_Skip, json.JSONDecodeError) as e:
                reason = e.reason if isinstance(e, _Skip) else "malformed_json"
                skipped[reason] += 1
                first_line.setdefault(reason, line_no)
    if skipped:
        detail = ", ".join(f"{r}: {c} (first at line {first_line[r]})" for r, c in skipped.most_common())
        warnings.warn(f"{path}: skipped {sum(skipped.values())} of {sum(skipped.values()) + len(samples)} "
                      f"records: {detail}", stacklevel=2)
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
