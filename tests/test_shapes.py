"""Shapes world: determinism, caption/answer/edit correctness checked through the reader, the reader's
exactness, the evaluators, and JSONL import/export."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ovis_u1.shapes import (
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
    T2ISample,
    VQASample,
    describe,
    edit_parts,
    edit_success,
    evaluate_model,
    geneval_prompts,
    load_jsonl,
    random_scene,
    read_scene,
    relations,
    scene_for_spec,
    scenes_match,
    score_geneval,
    spec_satisfied,
    unplaced_objects,
    vqa_accuracy,
    wilson_interval,
    world_text_corpus,
    write_jsonl,
)

NUMBERS = ("zero", "one", "two", "three", "four")
PHRASE_RELATION = {"to the left of": "left of", "to the right of": "right of", "above": "above",
                   "below": "below"}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _kinds(objects) -> list[tuple[str, str]]:
    return sorted((o.shape, o.color) for o in objects)


def _same_objects(read, truth, tol: float = 1.0) -> bool:
    """Same multiset of kinds, and every true object has a read twin within tol px and the same size."""
    if _kinds(read) != _kinds(truth):
        return False
    return all(any((r.shape, r.color) == (t.shape, t.color) and abs(r.cx - t.cx) <= tol and
                   abs(r.cy - t.cy) <= tol and abs(r.size - t.size) <= tol for r in read) for t in truth)


def _referent(objects, ref: str):
    """The single object a 'the [colour] shape' phrase names."""
    words = ref.split()
    hits = [o for o in objects if o.shape == words[-1] and (len(words) == 1 or o.color == words[0])]
    assert len(hits) == 1, (ref, objects)
    return hits[0]


# ------------------------------------------------------------------------------------ determinism

def test_same_seed_same_samples_and_splits_differ():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in range(4):
        sa, sb = a.t2i(i), b.t2i(i)
        assert sa.caption == sb.caption and np.array_equal(_pixels(sa.image), _pixels(sb.image))
        va, vb = a.vqa(i), b.vqa(i)
        assert (va.question, va.answer) == (vb.question, vb.answer)
        assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(va.images, vb.images))
        ea, eb = a.edit(i), b.edit(i)
        assert ea.instruction == eb.instruction and np.array_equal(_pixels(ea.target), _pixels(eb.target))

    def fingerprint(world: ShapesWorld) -> list:
        return [(world.t2i_scene(i)[0].objects, world.edit_scenes(i)[1]) for i in range(6)]

    base = fingerprint(ShapesWorld(seed=3))
    assert fingerprint(ShapesWorld(seed=4)) != base
    assert fingerprint(ShapesWorld(seed=3, split="heldout")) != base
    assert world_text_corpus(50, seed=1) == world_text_corpus(50, seed=1) != world_text_corpus(50, seed=2)
    with pytest.raises(ValueError):
        ShapesWorld(split="test")


def test_renders_are_flat_palette_images():
    image = _pixels(ShapesWorld(size=96).t2i(0, "scene").image)
    palette = {(255, 255, 255), *COLORS.values()}
    assert image.shape == (96, 96, 3) and {tuple(p) for p in image.reshape(-1, 3)} <= palette


# ----------------------------------------------------------------------------------- text-to-image

def test_captions_and_articles():
    scene = Scene([Obj("circle", "red", 10, 10, 14), Obj("circle", "red", 40, 10, 14),
                   Obj("square", "orange", 20, 40, 14)])
    assert describe(scene) == "two red circles and an orange square"
    assert describe(Scene([])) == "an empty canvas"
    world = ShapesWorld(seed=0)
    forms = {c: world.t2i_scene(0, c)[1] for c in T2I_CATEGORIES}
    assert re.fullmatch(r"an? (circle|square|triangle)", forms["single_object"])
    assert re.fullmatch(r"an? \w+ (circle|square|triangle)", forms["colors"])
    assert re.fullmatch(r"(two|three|four) (\w+ )?(circles|squares|triangles)", forms["counting"])
    assert re.fullmatch(r"an? \w+ and an? \w+", forms["two_object"])


@pytest.mark.parametrize("category", T2I_CATEGORIES)
def test_t2i_scene_satisfies_its_caption(category):
    world = ShapesWorld(seed=1)
    for i in range(40):
        scene, caption, spec = world.t2i_scene(i, category)
        assert caption == spec.caption() and spec.category == category
        reading = read_scene(scene.render())
        assert spec_satisfied(reading.objects, spec), (caption, reading.objects)
        assert len(scene.objects) == sum(item.count for item in spec.items)  # nothing extra
        if category == "scene":
            assert caption == describe(reading.scene)
        if spec.relation:
            a, b = scene.objects[:2]
            assert relations(a, b) == {spec.relation}


# ------------------------------------------------------------------------------------------ reader

@pytest.mark.parametrize("size,n", [(64, 300), (128, 150)])
def test_reader_reads_generator_images_exactly(size, n):
    for seed in range(n):
        scene = random_scene(np.random.default_rng([seed, size]), size)
        reading = read_scene(scene.render())
        assert reading.specks == 0 and reading.unknown_pixels == 0
        assert _same_objects(reading.objects, scene.objects), (seed, scene.objects, reading.objects)


def test_reader_tolerates_blur_and_noise_and_flags_the_unknown():
    ok = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        scene = random_scene(rng, 64)
        blurred = np.asarray(scene.render().filter(ImageFilter.GaussianBlur(1)), float)
        noisy = np.clip(blurred + rng.normal(0, 10, blurred.shape), 0, 255).astype(np.uint8)
        ok += _kinds(read_scene(noisy).objects) == _kinds(scene.objects)
    assert ok >= 38
    canvas = np.full((64, 64, 3), 255, np.uint8)
    canvas[10:30, 10:30] = 90  # an off-palette grey square: an object of unknown colour
    canvas[50, 50] = COLORS["red"]  # a one-pixel speck: ignored but counted
    reading = read_scene(canvas)
    assert [(o.shape, o.color) for o in reading.objects] == [("square", "unknown")] and reading.specks == 1


# ------------------------------------------------------------------------------------------- VQA

def _answer_from_readings(readings, question: str) -> str:
    """Answer a world question from the reader's view of the images, independently of the generator."""
    objs = readings[0].objects
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return _referent(objs, m[1]).color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (hit,) = [o for o in objs if o.color == m[1]]
        return hit.shape
    if question == "How many objects are there?":
        return NUMBERS[len(objs)]
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return NUMBERS[sum(o.color == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return NUMBERS[sum(o.shape == m[1] for o in objs)]
    if m := re.fullmatch(r"Is the (\w+ \w+) (to the left of|to the right of|above|below) the (\w+ \w+)\?",
                         question):
        holds = PHRASE_RELATION[m[2]] in relations(_referent(objs, m[1]), _referent(objs, m[3]))
        return "yes" if holds else "no"
    if question == "Describe the image.":
        return describe(readings[0].scene)
    if m := re.fullmatch(r"Is the (\w+ \w+) (on the left or on the right|at the top or at the bottom)\?", question):
        hit, size = _referent(objs, m[1]), readings[0].scene.size
        if m[2].startswith("on"):
            return "left" if hit.cx < size / 2 else "right"
        return "top" if hit.cy < size / 2 else "bottom"
    if m := re.fullmatch(r"Which image has (more|fewer) (\w+)s\?", question):
        ka, kb = (sum(o.shape == m[2] for o in r.objects) for r in readings)
        assert ka != kb
        return "the first image" if (ka > kb) == (m[1] == "more") else "the second image"
    if m := re.fullmatch(r"Which image has an? (\w+) (\w+)\?", question):
        has = [any((o.color, o.shape) == (m[1], m[2]) for o in r.objects) for r in readings]
        assert sum(has) == 1
        return "the first image" if has[0] else "the second image"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("kind", [*VQA_KINDS, "side"])  # "side": a training aid, outside the evaluated kinds
def test_vqa_answers_agree_with_the_reader(kind):
    world = ShapesWorld(seed=2)
    answers = Counter()
    for i in range(40):
        sample = world.vqa(i, kind)
        assert sample.answer == sample.answer.strip().lower()
        assert len(sample.images) == (2 if kind == "compare" else 1)
        readings = [read_scene(im) for im in sample.images]
        assert _answer_from_readings(readings, sample.question) == sample.answer, sample.question
        answers[sample.answer] += 1
    assert len(answers) > 1


def test_vqa_conversations_continue_about_the_same_image():
    world = ShapesWorld(seed=2)
    with_history, forms = 0, Counter()
    for i in range(120):
        sample, plain = world.vqa_conversation(i, 0.5), world.vqa(i)
        assert (sample.question, sample.answer) == (plain.question, plain.answer)  # the final turn is sample i's
        assert world.vqa_conversation(i, 0.5).history == sample.history  # deterministic
        assert world.vqa_conversation(i, 0.0).history == []
        if sample.history:
            with_history += 1
            assert len(sample.images) == 1 and 1 <= len(sample.history) <= 2
            reading = read_scene(sample.images[0])
            for q, a in sample.history:
                assert _answer_from_readings([reading], q) == a, q
                forms[re.sub("|".join(["circle", "square", "triangle", *COLORS]), "X", q)] += 1
    assert 35 <= with_history <= 65  # about half of the single-image ones (most samples are)
    assert len(forms) == 6, forms  # every form: three counts, the description, a colour, a shape


# ------------------------------------------------------------------------------------------ edits

def _box(o: Obj, pad: int = 1) -> tuple[slice, slice]:
    half = o.size / 2 + pad
    return slice(max(0, int(o.cy - half)), int(o.cy + half) + 1), slice(max(0, int(o.cx - half)),
                                                                          int(o.cx + half) + 1)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_target_differs_exactly_as_instructed(kind):
    world = ShapesWorld(seed=5)
    for i in range(30):
        sample = world.edit(i, kind)
        src, tgt = read_scene(sample.source).objects, read_scene(sample.target).objects
        ins, size = sample.instruction, sample.source.width
        changed_src, changed_tgt = [], []  # objects the instruction touches, before and after
        if m := re.fullmatch(r"make the ((?:\w+ )?\w+) (\w+)", ins):
            old = _referent(src, m[1])
            assert m[2] in COLORS and m[2] != old.color
            changed_src, changed_tgt = [old], [Obj(old.shape, m[2], old.cx, old.cy, old.size)]
        elif m := re.fullmatch(r"remove the ((?:\w+ )?\w+)", ins):
            changed_src = [_referent(src, m[1])]
        elif m := re.fullmatch(r"add an? (\w+) (\w+)", ins):
            (new,) = [o for o in tgt if not any(_same_objects([o], [s]) for s in src)]
            assert (new.color, new.shape) == (m[1], m[2])
            changed_tgt = [new]
        elif m := re.fullmatch(r"turn the ((?:\w+ )?\w+) into a (\w+)", ins):
            old = _referent(src, m[1])
            assert m[2] in SHAPES and m[2] != old.shape
            changed_src, changed_tgt = [old], [Obj(m[2], old.color, old.cx, old.cy, old.size)]
        elif m := re.fullmatch(r"move the ((?:\w+ )?\w+) to the (left|right|top|bottom)", ins):
            old = _referent(src, m[1])
            (new,) = [o for o in tgt if not any(_same_objects([o], [s]) for s in src)]
            assert (new.shape, new.color, new.size) == (old.shape, old.color, old.size)
            along, across = ("cx", "cy") if m[2] in ("left", "right") else ("cy", "cx")
            edge = new.size / 2 if m[2] in ("left", "top") else size - new.size / 2
            assert abs(getattr(new, along) - edge) <= size / 16  # against that border
            assert getattr(new, across) == getattr(old, across)
            assert abs(getattr(new, along) - getattr(old, along)) >= size / 4
            changed_src, changed_tgt = [old], [new]
        else:
            raise AssertionError(f"unexpected instruction {ins!r}")
        kept = [o for o in src if o not in changed_src]
        assert _same_objects(tgt, kept + changed_tgt), (ins, src, tgt)
        # Outside the touched objects' boxes the two images are pixel-identical.
        outside = np.ones((size, size), bool)
        for o in changed_src + changed_tgt:
            outside[_box(o)] = False
        assert np.array_equal(_pixels(sample.source)[outside], _pixels(sample.target)[outside])


# ------------------------------------------------------------------------------------- evaluators

def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)  # by score-test inversion
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_geneval_is_one_on_ground_truth_and_low_on_blank_images():
    prompts = geneval_prompts(60, seed=0)
    specs = [s for _, s in prompts]
    assert Counter(s.category for s in specs) == {c: 10 for c in GENEVAL_CATEGORIES}
    assert all(p == s.caption() for p, s in prompts)
    rng = np.random.default_rng(0)
    truth = [scene_for_spec(rng, s, 64).render() for s in specs]
    report = score_geneval(truth, specs)
    assert report["overall"]["value"] == 1.0 and report["overall"]["n"] == 60
    assert all(report[c] == {"value": 1.0, "n": 10, "ci95": pytest.approx([0.7225, 1.0], abs=1e-4)}
               for c in GENEVAL_CATEGORIES)
    blank = [Image.new("RGB", (64, 64), "white")] * 60
    assert score_geneval(blank, specs)["overall"]["value"] == 0.0
    shuffled = score_geneval(truth[1:] + truth[:1], specs)  # every image answers a different prompt
    assert shuffled["overall"]["value"] < 0.3


def test_vqa_accuracy_and_edit_success():
    fig = vqa_accuracy([" Red", "two", "yes "], ["red", "three", "yes"])
    assert fig["value"] == pytest.approx(2 / 3) and fig["n"] == 3 and len(fig["ci95"]) == 2
    world = ShapesWorld(seed=9, split="heldout")
    edits = [world.edit_scenes(i, EDIT_KINDS[i % len(EDIT_KINDS)]) for i in range(15)]
    targets = [t for _, _, t in edits]
    assert edit_success([t.render() for t in targets], targets)["value"] == 1.0
    assert edit_success([s.render() for s, _, _ in edits], targets)["value"] == 0.0
    upscaled = [t.render().resize((128, 128), Image.NEAREST) for t in targets]  # positions are relative
    assert edit_success(upscaled, targets)["value"] == 1.0



def test_an_added_object_may_go_anywhere_but_the_rest_must_stay():
    """"add a green triangle" names no place: the new object counts wherever it lands (the generator's
    spot is one random choice); every object the edit should keep must still be where it was."""
    import dataclasses

    from ovis_u1.shapes.world import fits_on_canvas
    world = ShapesWorld(seed=3, split="heldout")
    for i in range(12):
        source, _, target = world.edit_scenes(i, "add")
        free = unplaced_objects("add", source, target)
        assert [target.objects[k] for k in free] == [o for o in target.objects if o not in source.objects]
        assert len(free) == 1 and all(unplaced_objects(k, source, target) == () for k in EDIT_KINDS if k != "add")
        new, kept = target.objects[free[0]], [o for o in target.objects if o in source.objects]
        spots = [dataclasses.replace(new, cx=x, cy=y) for x in range(12, 53, 4) for y in range(12, 53, 4)]
        elsewhere = next(o for o in spots
                         if fits_on_canvas(o, kept, 64) and max(abs(o.cx - new.cx), abs(o.cy - new.cy)) > 16)
        moved_new = read_scene(Scene([*kept, elsewhere], 64).render()).scene
        assert scenes_match(moved_new, target, free=free) and not scenes_match(moved_new, target)
        assert edit_success([Scene([*kept, elsewhere], 64).render()], [target], free=[free])["value"] == 1.0
        # An object the edit should have kept, moved by more than the tolerance, fails either way.
        shifted = [dataclasses.replace(o, cx=64 - o.cx) if abs(64 - 2 * o.cx) > 16 else o for o in kept]
        if shifted != kept and all(fits_on_canvas(o, [p for p in [*shifted, new] if p is not o], 64) for o in shifted):
            moved_kept = read_scene(Scene([*shifted, new], 64).render()).scene
            assert not scenes_match(moved_kept, target, free=free)



def test_edit_parts_split_a_failed_edit_into_kept_and_effect():
    """The target has both parts; the unchanged source keeps everything and does nothing of the edit;
    an image with the edit done but a kept object dropped has the effect and not the rest."""
    world = ShapesWorld(seed=5, split="heldout")
    for i in range(20):
        kind = EDIT_KINDS[i % len(EDIT_KINDS)]
        source, _, target = world.edit_scenes(i, kind)
        assert edit_parts(read_scene(target.render()).scene, source, target, kind) == (True, True)
        assert edit_parts(read_scene(source.render()).scene, source, target, kind) == (True, False)
        kept = [o for o in target.objects if o in source.objects]
        if kept:
            dropped = Scene([o for o in target.objects if o is not kept[0]], 64)
            assert edit_parts(read_scene(dropped.render()).scene, source, target, kind) == (False, True)
    # Adding a red circle beside a red circle: the old one does not count as the added one.
    source = Scene([Obj("circle", "red", 16, 16, 14), Obj("square", "blue", 48, 48, 14)], 64)
    target = Scene([*source.objects, Obj("circle", "red", 48, 16, 14)], 64)
    assert edit_parts(read_scene(source.render()).scene, source, target, "add") == (True, False)
    elsewhere = Scene([*source.objects, Obj("circle", "red", 16, 48, 14)], 64)
    assert edit_parts(read_scene(elsewhere.render()).scene, source, target, "add") == (True, True)


class _FakeModel:
    """Stands in for OvisU1: blank images, a constant answer, and edits that change nothing."""

    def text_to_image(self, prompts, seed=0, **sampling):
        return [Image.new("RGB", (64, 64), "white") for _ in prompts]

    def answer(self, question, images=(), history=None):
        self.histories = history
        return "yes" if isinstance(question, str) else ["yes"] * len(question)

    def edit(self, image, instruction, seed=0, **sampling):
        return [image]


def test_evaluate_model_reports_figures():
    fake = _FakeModel()
    report = evaluate_model(fake, n=12, seed=0)
    assert report["geneval"]["overall"]["value"] == 0.0 and report["geneval"]["overall"]["n"] == 12
    assert set(report["vqa"]) == {"overall", *VQA_KINDS} and report["vqa"]["overall"]["n"] == 12
    # follow-ups: single-image kinds only, each asked after 1-2 earlier turns
    assert set(report["followup"]) == {"overall", *(k for k in VQA_KINDS if k != "compare")}
    assert report["followup"]["overall"]["n"] == 12 and all(1 <= len(h) <= 2 for h in fake.histories)
    edit = report["edit"]["overall"]
    assert (edit["value"], edit["n"]) == (0.0, 12) and edit["ci95"] == pytest.approx([0.0, 0.2425], abs=1e-4)
    # An edit that returns its input keeps everything and does none of what was asked.
    assert set(report["edit"]) == {"overall", *EDIT_KINDS, "kept_intact", "effect"}
    assert report["edit"]["kept_intact"]["value"] == 1.0 and report["edit"]["effect"]["value"] == 0.0


# ------------------------------------------------------------------------------------------- JSONL

def test_jsonl_round_trip(tmp_path):
    world = ShapesWorld(seed=4)
    samples = [world.t2i(0), world.vqa(0, "color"), world.vqa(1, "compare"), world.edit(0)]
    path = write_jsonl(samples, tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, skipped = load_jsonl(path)
    assert skipped == {} and [type(s) for s in loaded] == [T2ISample, VQASample, VQASample, EditSample]
    t2i, vqa1, vqa2, edit = loaded
    assert t2i.caption == samples[0].caption and t2i.spec == samples[0].spec
    assert np.array_equal(_pixels(t2i.image), _pixels(samples[0].image))
    assert (vqa2.question, vqa2.answer, len(vqa2.images)) == (samples[2].question, samples[2].answer, 2)
    assert vqa1.question == samples[1].question
    assert edit.instruction == samples[3].instruction
    assert np.array_equal(_pixels(edit.target), _pixels(samples[3].target))


def test_jsonl_keeps_every_turn_of_a_conversation(tmp_path):
    world = ShapesWorld(seed=4)
    sample = next(s for i in range(20) if len((s := world.vqa_conversation(i, 1.0)).history) == 2)
    (loaded,), _ = load_jsonl(write_jsonl([sample], tmp_path / "data"))
    assert (loaded.history, loaded.question, loaded.answer) == (sample.history, sample.question, sample.answer)
    record = json.loads((tmp_path / "data" / "data.jsonl").read_text())
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt"] * 3
    assert record["conversations"][0]["value"].startswith("<image>\n")
    bad = [[{"from": "human", "value": "Q?"}, {"from": "human", "value": "Q2?"}],  # no answer between
           [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2?"}],
           [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]]  # an empty question
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"type": "vqa", "image": "ok.png", "conversations": c}) for c in bad))
    with pytest.warns(UserWarning, match="skipped 3 of 3"):
        assert load_jsonl(path) == ([], {"missing_fields": 3})


def test_jsonl_skips_bad_records_with_one_warning(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    lines = [
        {"type": "t2i", "image": "ok.png", "caption": "a red square"},  # 1: fine
        {"type": "t2i", "image": "missing.png", "caption": "x"},  # 2: missing file
        {"type": "t2i", "image": "corrupt.png", "caption": "x"},  # 3: unreadable
        '{"type": "t2i", "image": ',  # 4: malformed
        {"type": "vqa", "images": ["ok.png"], "question": "What color is it?", "answer": "red"},  # 5: fine
        {"type": "edit", "source": "ok.png", "target": "ok.png"},  # 6: no instruction
        {"type": "audio"},  # 7: unknown type
        {"type": "vqa", "image": "ok.png", "conversations": [{"from": "gpt", "value": "hi"},
                                                             {"from": "human", "value": "<image>\nQ?"},
                                                             {"from": "gpt", "value": "A"}]},  # 8: fine
        {"type": "edit", "source": "ok.png", "instruction": "make it blue", "target": "missing.png"},  # 9
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    with pytest.warns(UserWarning) as caught:
        samples, skipped = load_jsonl(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 6 of 9" in message and "missing_file: 2 (first at line 2)" in message
    assert skipped == {"missing_file": 2, "unreadable_image": 1, "malformed_json": 1, "missing_fields": 1,
                       "unknown_type": 1}
    assert [type(s) for s in samples] == [T2ISample, VQASample, VQASample]
    assert (samples[2].question, samples[2].answer, samples[2].history) == ("Q?", "A", [])


def test_cell_objects_name_the_object_covering_most_of_each_cell():
    from ovis_u1.shapes.world import Obj, Scene, cell_objects
    square = Obj("square", "red", 16, 16, 20)  # pixels 6..25: the four top-left 16 px cells
    circle = Obj("circle", "blue", 48, 47, 14)  # pixels 41..54: cells (2, 2), (2, 3), (3, 2), (3, 3)
    cells = cell_objects(Scene([square, circle]), 4, 4)
    assert [k for k, o in enumerate(cells) if o == square] == [0, 1, 4, 5]
    assert [k for k, o in enumerate(cells) if o == circle] == [10, 11, 14, 15]
    assert all(o is None for k, o in enumerate(cells) if k not in (0, 1, 4, 5, 10, 11, 14, 15))
    assert cell_objects(Scene([]), 2, 3) == [None] * 6
    # a cell split between two objects names the one with more pixels in it
    left, right = Obj("square", "red", 10, 8, 16), Obj("square", "green", 28, 8, 14)  # right: 21..34
    assert cell_objects(Scene([left, right], 32), 1, 1) == [left]
    assert cell_objects(Scene([left, right], 32), 2, 2)[:2] == [left, right]
    world = ShapesWorld(seed=3)
    sample = world.cells(5)
    assert np.array_equal(np.asarray(sample.image), np.asarray(sample.scene.render()))
    assert sample.scene == world.cells(5).scene and sample.scene != world.cells(6).scene
