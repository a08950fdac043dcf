"""The shapes world: deterministic synthetic data for the small default model, its scene reader, the
evaluators (mini-GenEval, VQA, editing) and JSONL import/export of users' own data. numpy + PIL only."""

from ovis_u1.shapes.jsonl import load_jsonl, write_jsonl
from ovis_u1.shapes.reader import Reading, read_scene
from ovis_u1.shapes.world import (
    COLORS,
    EDIT_KINDS,
    GENEVAL_CATEGORIES,
    SHAPES,
    T2I_CATEGORIES,
    VQA_KINDS,
    EditSample,
    Obj,
    Scene,
    ShapesWorld,
    Spec,
    SpecItem,
    T2ISample,
    VQASample,
    describe,
    random_scene,
    relations,
    sample_edit,
    sample_spec,
    sample_t2i,
    sample_vqa,
    scene_for_spec,
    world_text_corpus,
)

__all__ = [
    "COLORS", "EDIT_KINDS", "GENEVAL_CATEGORIES", "SHAPES", "T2I_CATEGORIES", "VQA_KINDS", "EditSample",
    "Obj", "Reading", "Scene", "ShapesWorld", "Spec", "SpecItem", "T2ISample", "VQASample", "describe",
    "edit_parts", "edit_success", "evaluate_model", "geneval_correct", "geneval_prompts", "load_jsonl", "random_scene",
    "read_scene", "relations", "sample_edit", "sample_spec", "sample_t2i", "sample_vqa", "scene_for_spec",
    "scenes_match", "score_geneval", "spec_satisfied", "unplaced_objects", "vqa_accuracy", "wilson_interval",
    "world_text_corpus", "write_jsonl",
]

# The evaluators load on first use, so `python -m ovis_u1.shapes.evaluate` runs the module once (importing
# it here would put it in sys.modules before runpy executes it, and runpy warns about that).
_EVALUATE_NAMES = {"edit_parts", "edit_success", "evaluate_model", "geneval_correct", "geneval_prompts", "scenes_match",
                   "score_geneval", "spec_satisfied", "unplaced_objects", "vqa_accuracy", "wilson_interval"}


def __getattr__(name: str):
    if name in _EVALUATE_NAMES:
        from ovis_u1.shapes import evaluate
        return getattr(evaluate, name)
    raise AttributeError(f"module 'ovis_u1.shapes' has no attribute {name!r}")
