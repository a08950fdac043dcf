"""The trainer: stage freezing, exact resume after a kill, atomic checkpoints, 2-process accelerate,
LoRA, own-data JSONL, config resolution. Tiny preset, a few steps each."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ovis_u1.model import OvisU1
from tests.web_battery import png_header_only
from train.config import resolve
from train.stages import PAPER_STAGES, StageArgs
from train.trainer import latest_checkpoint, save_checkpoint, set_trainable, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_model_fresh(make_tiny):
    return make_tiny(0)


def _cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "train", "--recipe", "smoke", "progress=false", "threads=1", *overrides]


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["global_step"]: r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("stage", PAPER_STAGES, ids=lambda s: s.name)
def test_each_stage_trains_exactly_its_components(stage: StageArgs, tiny_model_fresh):
    model = tiny_model_fresh
    names = set(set_trainable(model, stage))
    for comp, module in model.components().items():
        params = {n for n, _ in module.named_parameters()}
        flags = {p.requires_grad for p in module.parameters()}
        assert flags == {comp in stage.trainable}, f"{stage.name}: {comp} has requires_grad {flags}"
        assert params  # every component has parameters
    n_expected = sum(p.numel() for c in stage.trainable for p in model.components()[c].parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if n in names) == n_expected


def test_paper_table_is_the_published_recipe():
    by_name = {s.name: s for s in PAPER_STAGES}
    assert (by_name["stage0"].trainable, by_name["stage0"].steps, by_name["stage0"].batch_size,
            by_name["stage0"].lr) == (["refiner", "decoder"], 500, 1024, 1e-4)
    assert (by_name["stage1"].steps, by_name["stage1"].batch_size, by_name["stage1"].lr) == (1500, 8192, 5e-4)
    assert set(by_name["stage1"].tasks) == {"vqa", "t2i", "edit"} and "vision" not in by_name["stage1"].trainable
    assert by_name["stage2"].trainable == ["vision", "adapter", "vte"] and by_name["stage2"].steps == 2600
    assert by_name["stage3"].tasks == {"vqa": 1.0} and "llm" in by_name["stage3"].trainable
    assert (by_name["stage3"].steps, by_name["stage3"].batch_size, by_name["stage3"].lr) == (23000, 2240, 5e-5)
    assert by_name["stage5"].tasks.keys() == {"t2i", "edit"}


def test_mixed_batch_split():
    s = StageArgs("s", ["adapter"], {"vqa": 1.0, "t2i": 1.0, "edit": 1.0}, batch_size=10)
    rows = s.split_batch(10)
    assert sum(rows.values()) == 10 and min(rows.values()) >= 3


def test_config_resolution_and_errors(tmp_path):
    args = resolve("smoke", ["stages.stage0.steps=7", "optim.grad_clip=0.5", "data.image_size=32"])
    assert {s.name: s for s in args.stages}["stage0"].steps == 7
    assert args.optim.grad_clip == 0.5 and args.data.image_size == 32
    with pytest.raises(ValueError, match="unknown setting"):
        resolve("smoke", ["optim.nope=1"])
    with pytest.raises(ValueError, match="no stage"):
        resolve("smoke", ["stages.stage9.steps=1"])
    with pytest.raises(FileNotFoundError, match="built-in recipes"):
        resolve("does-not-exist")
    for bad_fraction in ("data.vqa_history=1.5", "data.cond_dropout=-0.1"):
        with pytest.raises(ValueError, match=r"must be a number in \[0, "):
            resolve("smoke", [bad_fraction])
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16', 'auto'\], got 'fp16'"):
        resolve("smoke", ["precision=fp16"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: x, trainable: [wings], tasks: {t2i: 1.0}}\n")
    from train.trainer import scaled_stages
    with pytest.raises(ValueError, match="trainable must name components"):
        scaled_stages(resolve(str(bad)))


def test_full_recipe_runs_and_saves_everything(tmp_path):
    out = tmp_path / "run"
    args = resolve("smoke", [f"out_dir={out}", "progress=false", "threads=1"])
    export = train(args)
    model = OvisU1.from_pretrained(export)
    assert model.config.preset == "tiny"
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert next(r["stage"] for r in recs) == "prep_vae" and recs[-1]["stage"] == "stage5"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert (out / "loss.png").stat().st_size > 1000
    ck = latest_checkpoint(out)
    assert json.loads((ck / "train_config.json").read_text())["preset"] == "tiny"  # resolved config saved
    # The VAE preparation step calibrates the latent shift/scale it hands to every later stage.
    assert model.config.vae.scaling_factor != 1.0


def test_resume_after_kill_gives_the_same_losses(tmp_path):
    # With a weight average on, so the resumed run must also carry the average on exactly.
    stage = ["only_stages=[stage0]", "stages.stage0.steps=24", "stages.stage0.ema=0.9", "ckpt_every=4",
             "log_every=1"]
    ref = tmp_path / "ref"  # uninterrupted, in this process (the killed run needs a process of its own)
    train(resolve("smoke", [f"out_dir={ref}", "progress=false", "threads=1", *stage]))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(f"out_dir={killed}", *stage), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and latest_checkpoint(killed) is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = json.loads((latest_checkpoint(killed) / "state.json").read_text())["global_step"]
    assert 0 < resumed_from < 24, "the run must be killed mid-stage"
    subprocess.run(_cmd(f"out_dir={killed}", *stage, "--resume"), check=True, env=_env(), cwd=ROOT,
                   capture_output=True)
    a, b = _losses(ref), _losses(killed)
    assert sorted(b) == sorted(a) == list(range(1, 25))
    assert all(a[k] == b[k] for k in a), {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    ref_weights, killed_weights = (load_file(d / "final" / "model.safetensors") for d in (ref, killed))
    assert all(torch.equal(ref_weights[k], killed_weights[k]) for k in ref_weights)
    # The export holds the average; the last trained weights are kept beside it.
    raw = load_file(ref / "raw" / "stage0.safetensors")
    assert raw and all(k.startswith(("refiner.", "decoder.")) for k in raw)
    assert any(not torch.equal(raw[k], ref_weights[k]) for k in raw)
    # The tool that swaps them back in, to score the two side by side.
    from train.experiments.raw_weights import with_raw_weights
    assert with_raw_weights(ref / "final", ref / "raw" / "stage0.safetensors", tmp_path / "raw_model") == len(raw)
    swapped = OvisU1.from_pretrained(tmp_path / "raw_model").state_dict()
    assert all(torch.equal(swapped[k], raw[k]) for k in raw)
    with pytest.raises(FileNotFoundError, match="ema set"):
        with_raw_weights(ref / "final", ref / "raw" / "stage4.safetensors", tmp_path / "none")


def test_weight_average_warms_up_then_follows_its_decay():
    from train.trainer import WeightAverage
    layer = torch.nn.Linear(2, 1, bias=False)
    layer.weight.data.fill_(0.0)
    average = WeightAverage(layer, decay=0.5)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]):
        layer.weight.data.fill_(value)
        average.update(n)
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * value
        assert average.shadow["weight"][0, 0].item() == pytest.approx(expected)
    assert decay == 0.5  # the warm-up reached the set decay within these steps
    average.copy_to_model()
    assert layer.weight[0, 0].item() == pytest.approx(expected)
    with pytest.raises(RuntimeError, match="another stage"):
        average.load({"other": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"ema is the averaging decay"):
        resolve("smoke", ["stages.stage0.ema=1.0"])


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, tiny_model_fresh, monkeypatch):
    from train import trainer
    from train.trainer import TrainState
    args = resolve("smoke", [f"out_dir={tmp_path}"])
    gen = torch.Generator().manual_seed(0)
    good = save_checkpoint(tmp_path, tiny_model_fresh, None, TrainState(global_step=3), args, gen, keep=2)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(trainer, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, tiny_model_fresh, None, TrainState(global_step=6), args, gen, keep=2)
    assert latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "checkpoints" / "step_0000006").exists()
    _model, state, *_ = trainer.load_checkpoint(good, args)
    assert state.global_step == 3


def test_two_process_accelerate_run(tmp_path):
    """torchrun with 2 ranks over gloo on CPU; both ranks step, rank 0 writes the log and the model."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "train", "--recipe", "smoke", "progress=false", "threads=1", "cpu=true", f"out_dir={out}",
           "only_stages=[stage0,stage3]"]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    # samples/s is computed over both ranks' rows: batch 4 split 2 + 2
    assert {r["stage"] for r in recs} == {"stage0", "stage3"}
    assert OvisU1.from_pretrained(out / "final").config.preset == "tiny"


def test_lora_trains_only_adapters_and_merges(tmp_path):
    out = tmp_path / "lora"
    args = resolve("smoke", [f"out_dir={out}", "progress=false", "threads=1", "lora.enabled=true",
                             "only_stages=[stage0,stage3]", "lora.rank=4"])
    from train.data import TaskData
    from train.lora import apply_lora, lora_parameters
    from train.trainer import build_model
    model = build_model(args, TaskData(args.data))
    names = set_trainable(model, next(s for s in args.stages if s.name == "stage0"), lora_enabled=True)
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[0] for n in names} == {"decoder", "refiner"}
    export = train(args)
    merged = OvisU1.from_pretrained(export)
    assert not any("lora" in k for k in merged.state_dict())
    apply_lora(merged, args.lora)
    assert lora_parameters(merged.decoder)


def test_shapes_vqa_data_holds_conversations_and_the_loss_reads_them(make_tiny):
    from train.data import TaskData
    from train.losses import vqa_loss
    some, none = (TaskData(resolve("smoke", [f"data.vqa_history={p}"]).data) for p in (1.0, 0.0))
    batch = some.batch("vqa", 0, 6)
    assert all(bool(s.history) == (len(s.images) == 1) for s in batch) and any(s.history for s in batch)
    assert not any(s.history for s in none.batch("vqa", 0, 6))
    assert [s.question for s in batch] == [s.question for s in none.batch("vqa", 0, 6)]
    model = make_tiny()
    torch.manual_seed(0)
    # the earlier answers carry loss too, so the conversation's loss differs from the single turn's
    assert vqa_loss(model, batch).item() != pytest.approx(vqa_loss(model, none.batch("vqa", 0, 6)).item())


def test_a_stage_can_ask_for_chosen_question_kinds():
    from train.data import TaskData
    data = TaskData(resolve("smoke", []).data)
    kinds = {"mix": 0.75, "side": 0.25}
    batch, again = data.batch("vqa", 0, 200, kinds), data.batch("vqa", 0, 200, kinds)
    side = [s for s in batch if re.search(r"on the left or on the right|at the top or at the bottom", s.question)]
    assert 30 <= len(side) <= 70  # 0.25 of 200, give or take the draw
    assert {s.answer for s in side} == {"left", "right", "top", "bottom"}
    assert [s.question for s in batch] == [s.question for s in again]  # deterministic by index
    # the other samples are exactly the usual stream's
    others = [(i, s.question) for i, s in enumerate(batch) if s not in side]
    assert all(data.sample("vqa", i).question == q for i, q in others)
    relation = data.batch("vqa", 0, 40, {"relation": 3, "side": 1})
    assert all(re.search(r"left of|right of|above|below|on the left or|at the top or", s.question) for s in relation)
    assert {s.answer for s in relation} >= {"yes", "no"}
    for bad, word in (("{relation: 1, wings: 1}", "wings"), ("{relation: 0}", "relation")):
        with pytest.raises(ValueError, match=rf"stage 'stage3': vqa_kinds must map question kinds .*{word}"):
            resolve("default", [f"stages.stage3.vqa_kinds={bad}"])
    with pytest.raises(ValueError, match="vqa_kinds choose shapes-world questions"):
        resolve("default", ["stages.stage3.vqa_kinds={side: 1}", "data.source=mine.jsonl"])


def test_preset_overrides_change_the_built_model(tmp_path):
    from ovis_u1.config import get_preset
    from train.trainer import override_config
    config = override_config(get_preset("tiny"), {"refiner.depth": 1, "llm.num_hidden_layers": 1})
    assert config.refiner.depth == 1 and config.llm.num_hidden_layers == 1
    assert get_preset("tiny").refiner.depth == 2  # presets are not changed in place
    with pytest.raises(ValueError, match="adapter has no field 'nope'"):
        override_config(get_preset("tiny"), {"adapter.nope": 1})
    with pytest.raises(ValueError, match=r"must be 'section\.field'"):
        override_config(get_preset("tiny"), {"wings.span": 1})
    args = resolve("smoke", ["preset_overrides={refiner.depth: 1}"])
    from train.data import TaskData
    from train.trainer import build_model
    model = build_model(args, TaskData(args.data))
    assert len(model.refiner.individual_token_refiner.blocks) == 1


def test_lora_merge_keeps_outputs(make_tiny):
    from train.config import LoRAArgs
    from train.lora import apply_lora, lora_parameters, merge_lora
    model = make_tiny(0)
    apply_lora(model, LoRAArgs(rank=2))
    with torch.no_grad():
        for p in lora_parameters(model.decoder) + lora_parameters(model.llm):
            p.add_(torch.randn_like(p) * 0.1)
    before = model.text_to_image("a red circle", progress=False, output_type="latent", num_inference_steps=2)
    merge_lora(model)
    after = model.text_to_image("a red circle", progress=False, output_type="latent", num_inference_steps=2)
    assert not any("lora" in k for k in model.state_dict())
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("fixed_t", [None, 0.005])
def test_sample_prediction_trains_on_the_clean_latent_error(tiny_model_fresh, monkeypatch, fixed_t):
    """decoder.prediction="sample": the flow loss is the x0 error of the final layer's raw output, also for
    t below the decoder's min_t (where it divides by min_t, not t)."""
    from ovis_u1.decoder import latent_ids
    from ovis_u1.generation import encode_conditions, refine, vit_factor
    from ovis_u1.images import blank_image
    from ovis_u1.prompts import t2i_prompts
    from train import losses
    from train.losses import flow_loss

    if fixed_t is not None:
        assert fixed_t < tiny_model_fresh.decoder.cfg.min_t
        monkeypatch.setattr(losses, "sample_t", lambda n, device, generator=None: torch.full((n,), fixed_t))
    sample_t = losses.sample_t

    model = tiny_model_fresh
    cfg = model.decoder.cfg
    torch.manual_seed(0)
    x0 = torch.randn(2, 16, cfg.in_channels)  # an 8x8 latent grid, packed 2x2
    texts = [t2i_prompts(c, "")[0] for c in ("a red circle", "two squares")]
    cond, mask = encode_conditions(model, texts, [blank_image(32, 32, 32 * 32, vit_factor(model))] * 2)
    cfg.prediction = "sample"
    with torch.no_grad():
        loss = flow_loss(model, x0, cond, mask, (8, 8), generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_t(2, x0.device, g)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        txt, cls = refine(model, cond, mask)
        cfg.prediction = "velocity"  # the same weights, read raw: the predicted x0
        x0_hat = model.decoder(xt, latent_ids(2, 8, 8), txt, torch.zeros(*txt.shape[:2], 3), t, cls, txt_mask=mask)
        velocity_loss = flow_loss(model, x0, cond, mask, (8, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(x0_hat, x0))
    assert not torch.isclose(loss, velocity_loss)


@pytest.mark.filterwarnings("ignore:precision=bf16 on a cpu device without native bf16")
def test_bf16_precision_trains_like_float32(tmp_path):
    """precision=bf16 runs the losses under autocast: the same losses to bf16 rounding, float32 weights."""
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = resolve("smoke", [f"out_dir={out}", "progress=false", "threads=1", "log_every=1",
                                 "only_stages=[prep_lm,stage3,stage5]", "stages.prep_lm.steps=3",
                                 "stages.stage3.steps=3", "stages.stage5.steps=3", f"precision={precision}"])
        export = train(args)
        runs[precision] = (_losses(out), OvisU1.from_pretrained(export))
    (a, _), (b, bf16_model) = runs["fp32"], runs["bf16"]
    assert sorted(a) == sorted(b) == list(range(1, 10))
    assert all(abs(a[k] - b[k]) <= 0.05 * abs(a[k]) for k in a), {k: (a[k], b[k]) for k in a}
    assert any(a[k] != b[k] for k in a)  # it did run in bf16
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())


def test_auto_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    """An AVX2-only CPU emulates bf16 matmuls (~10x slower steps): "auto" trains in fp32 there, and an
    explicit bf16 is kept but warned about."""
    import train.trainer as trainer
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(trainer, "bf16_is_native", lambda device, native=native: native)
        assert trainer.resolve_precision("auto", cpu) == expected
        assert trainer.resolve_precision("fp32", cpu) == "fp32"
    with pytest.warns(UserWarning, match="without native bf16 matmuls"):
        assert trainer.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(trainer, "bf16_is_native", lambda device: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
def test_auto_precision_trains_as_it_resolves(tmp_path, monkeypatch, capsys, native):
    """A run with precision=auto says what it chose and trains exactly as a run given that precision."""
    import train.trainer as trainer
    monkeypatch.setattr(trainer, "bf16_is_native", lambda device: native)
    chosen = "bf16" if native else "fp32"
    losses = {}
    for precision in ("auto", chosen):
        out = tmp_path / precision
        train(resolve("smoke", [f"out_dir={out}", "progress=false", "threads=1", "log_every=1",
                                "only_stages=[stage5]", "stages.stage5.steps=2", f"precision={precision}"]))
        losses[precision] = _losses(out)
    assert f"precision auto -> {chosen}" in capsys.readouterr().out
    assert losses["auto"] == losses[chosen]


def test_recipe_time_estimates_every_stage(capsys):
    """The recipe-time benchmark prints each stage's step time x steps and a total that adds them up."""
    from train.experiments import recipe_time
    assert recipe_time.main(["--recipe", "smoke", "--steps", "3", "threads=1", "precision=auto"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("recipe smoke, precision auto -> ")
    stages = [line.split() for line in lines[1:-1]]
    assert [s[0] for s in stages] == [s.name for s in resolve("smoke").stages]
    assert all(float(s[1]) > 0 and s[3:5] == ["x", "2"] for s in stages)
    total = float(lines[-1].split()[1])
    assert total == pytest.approx(sum(float(s[-2]) for s in stages), abs=0.1)
    with pytest.raises(SystemExit):
        recipe_time.main(["--recipe", "smoke", "--steps", "2"])


def test_steps_for_budget(monkeypatch):
    """The step count that fits a budget comes from the median of the timed probe calls after warm-up."""
    import train.experiments as experiments
    clock = [0.0]
    durations = iter([5.0, 5.0, 0.2, 0.3, 0.2, 0.9, 0.2])  # two slow warm-ups, then a median of 0.2 s
    monkeypatch.setattr(experiments.time, "perf_counter", lambda: clock[0])
    calls = []

    def probe(i):
        calls.append(i)
        clock[0] += next(durations)

    steps, per_step = experiments.steps_for_budget(probe, 60.0, probe=7)
    assert calls == list(range(7)) and per_step == pytest.approx(0.2) and steps == 300
    with pytest.raises(ValueError, match="probe must be at least 3"):
        experiments.steps_for_budget(probe, 60.0, probe=2)


def test_cells_task_names_each_cells_object_and_needs_the_shapes_world(make_tiny, tmp_path):
    from ovis_u1.shapes.world import COLOR_NAMES, SHAPES, Obj, Scene
    from train.data import TaskData
    from train.losses import CELL_BACKGROUND_WORD, cell_targets, cells_loss
    target = cell_targets(Scene([Obj("triangle", "purple", 16, 16, 20)]), 4, 4, 40)
    assert target.shape == (16, 40) and torch.allclose(target.sum(-1), torch.ones(16))
    named = {COLOR_NAMES.index("purple"), len(COLOR_NAMES) + SHAPES.index("triangle")}
    for k in range(16):
        words = set(target[k].nonzero()[:, 0].tolist())
        assert words == (named if k in (0, 1, 4, 5) else {CELL_BACKGROUND_WORD})
    data = TaskData(resolve("smoke").data)
    model = make_tiny(0)
    model.requires_grad_(False)
    model.visual_tokenizer.requires_grad_(True)
    opt = torch.optim.Adam(model.visual_tokenizer.parameters(), lr=3e-3)
    batch = data.batch("cells", 0, 4)
    first = cells_loss(model, batch)
    for _ in range(15):  # the visual tokenizer alone can learn the words
        loss = cells_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert cells_loss(model, batch).item() < 0.5 * first.item()
    from ovis_u1.shapes import ShapesWorld, write_jsonl
    path = write_jsonl([ShapesWorld().t2i(0)], tmp_path / "data")
    own = TaskData(resolve("smoke", [f"data.source={path}"]).data)
    with pytest.raises(ValueError, match="cells task needs shapes-world scenes"):
        own.sample("cells", 0)


def test_fresh_model_with_another_checkpoints_vae(tmp_path):
    """fresh_with_vae: the recipe's seeded starting model, except the VAE (weights and calibration), which
    comes from the donor; a donor whose VAE has another shape is refused."""
    from train.data import TaskData
    from train.experiments.fresh_with_vae import fresh_with_vae, main
    from train.trainer import build_model
    donor_args = resolve("smoke", ["seed=1"])
    donor = build_model(donor_args, TaskData(donor_args.data))
    donor.config.vae.shift_factor, donor.config.vae.scaling_factor = 0.25, 1.5
    donor.save_pretrained(tmp_path / "donor")
    assert main(["--recipe", "smoke", "--vae-from", str(tmp_path / "donor"), "--out", str(tmp_path / "init")]) == 0
    got = OvisU1.from_pretrained(tmp_path / "init")
    args = resolve("smoke")
    fresh = build_model(args, TaskData(args.data))
    donor_state, fresh_state = donor.state_dict(), fresh.state_dict()
    for name, value in got.state_dict().items():
        want = donor_state[name] if name.startswith("vae.") else fresh_state[name]
        assert torch.equal(value, want), name
    assert not all(torch.equal(fresh_state[n], donor_state[n]) for n in fresh_state if n.startswith("vae."))
    assert (got.config.vae.shift_factor, got.config.vae.scaling_factor) == (0.25, 1.5)
    other = resolve("smoke", ["preset_overrides={vae.layers_per_block: 2}"])
    build_model(other, TaskData(other.data)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="VAE is not shaped like"):
        fresh_with_vae("smoke", str(tmp_path / "other"))


def test_vae_quality_tells_a_trained_vae_from_an_untrained_one(capsys):
    """vae_quality: the shipped model's trained VAE reads held-out scenes back and reconstructs them
    closely; the same preset's untrained VAE reads none back, at a far larger error."""
    from train.data import TaskData
    from train.experiments.vae_quality import main, vae_quality
    from train.trainer import build_model, calibrate_vae
    trained = vae_quality(OvisU1.from_pretrained(), n=16)
    args = resolve("default")
    data = TaskData(args.data)
    fresh = build_model(args, data)
    calibrate_vae(fresh, data, n=32)
    untrained = vae_quality(fresh, n=16)
    assert trained["n"] == untrained["n"] == 16
    assert trained["read_back"] >= 0.8 and untrained["read_back"] == 0.0
    assert trained["mse"] < 0.02 < untrained["mse"]
    assert main(["--n", "4", str(Path(__file__).parents[1] / "ovis_u1" / "default_model")]) == 0
    assert re.search(r"default_model: n=4 mse=0\.\d{5} read_back=\d\.\d{3}", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["--n", "0", "ovis_u1/default_model"])


# ---- hostile settings, data and disks (issue 32's battery) ------------------------------------------------
def _stage0(out: Path, *more: str) -> list[str]:
    return [f"out_dir={out}", "progress=false", "threads=1", "only_stages=[stage0]", "stages.stage0.steps=2",
            "log_every=1", *more]


def _run_main(capsys, *argv: str) -> tuple[int, str]:
    from train.__main__ import main
    code = main(["--recipe", "smoke", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return code, lines[-1]


@pytest.mark.parametrize("override, words", [
    ("ckpt_every=0", "ckpt_every must be an integer in [1"),
    ("log_every=0", "log_every must be an integer in [1"),
    ("stages.stage0.steps=abc", "stage 'stage0': steps must be an integer, got 'abc'"),
    ("data.source=/no/such/file.jsonl", "data.source '/no/such/file.jsonl' does not exist"),
    ("data.source=/", "data.source '/' is not a regular file"),
    ("seed=" + str(2**70), "seed must be an integer in [0, 4294967295]"),
    ("data.image_size=0", "data.image_size must be an integer in [32, 4096]"),
    ("data.image_size=40", "data.image_size must be a multiple of 16"),
    ("threads=-1", "threads must be an integer in [1"),
    ("init=/no/such/checkpoint", "init '/no/such/checkpoint' does not exist"),
    ("only_stages=[stage9]", "only_stages names unknown stages ['stage9']"),
    ("lora.rank=0", "lora.rank must be an integer in [1"),
    ("optim.grad_clip=.nan", "optim.grad_clip must be a number in [0, inf) (0 turns clipping off), got nan"),
    ("optim.betas=[0.9, 2]", "optim.betas must be two numbers in [0, 1)"),
    ("stages.stage0.lr=-1", "stage 'stage0': lr must be a finite number > 0"),
    ("data=7", "data must be a mapping"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, override, words):
    code, line = _run_main(capsys, f"out_dir={tmp_path / 'run'}", override)
    assert code == 2 and words in line, line
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_empty_or_useless_data_source(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, line = _run_main(capsys, f"out_dir={tmp_path / 'a'}", f"data.source={empty}")
    assert code == 2 and "is empty" in line
    useless = tmp_path / "useless.jsonl"
    useless.write_text('{"type": "t2i", "image": "gone.png", "caption": "x"}\n[1, 2]\n')
    with pytest.warns(UserWarning, match="skipped 2 of 2"):
        code, line = _run_main(capsys, f"out_dir={tmp_path / 'b'}", f"data.source={useless}")
    assert code == 2 and "no usable records" in line and "missing_file" in line


def test_two_trainers_and_a_fresh_run_never_share_a_run_folder(tmp_path):
    from train.trainer import RunError, lock_run
    out = tmp_path / "run"
    out.mkdir()
    held = lock_run(out)  # as a running trainer holds it
    try:
        with pytest.raises(RunError, match=rf"another trainer \(pid {os.getpid()}\) is running in"):
            train(resolve("smoke", _stage0(out)))
    finally:
        held.close()
    (out / "log.jsonl").write_text('{"global_step": 1, "stage": "stage0", "step": 1, "loss": 1.0}\n')
    with pytest.raises(RunError, match=r"already holds a run \(log\.jsonl\); continue it with --resume"):
        train(resolve("smoke", _stage0(out)))


def test_resume_mends_the_log_and_clears_stale_temps(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # A run killed before its first checkpoint: its log lines belong to no checkpoint.
    (out / "log.jsonl").write_text('{"global_step": 1, "stage": "stage0", "step": 1, "loss": 99.0}\n{"glob')
    train(resolve("smoke", _stage0(out)), resume=True)
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in recs] == [1, 2] and recs[0]["loss"] != 99.0
    # A torn last line (killed mid-write) and leftovers of a save killed midway, then --resume.
    with open(out / "log.jsonl", "a") as f:
        f.write('{"global_step": 3, "sta')
    stale = out / "checkpoints" / ".step_0000004.x1y2z3"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (out / "checkpoints" / ".latest.tmp").write_text("step_0000004")
    train(resolve("smoke", _stage0(out)), resume=True)
    assert [json.loads(x)["global_step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002"]


def test_a_nan_loss_stops_the_run_and_exports_nothing(tmp_path, monkeypatch):
    from train import trainer
    out = tmp_path / "run"

    def nan_loss(model, samples, generator, **kw):
        return trainer.TASK_LOSSES_REAL["t2i"](model, samples, generator, **kw) * float("nan")

    monkeypatch.setattr(trainer, "TASK_LOSSES_REAL", dict(trainer.TASK_LOSSES), raising=False)
    monkeypatch.setitem(trainer.TASK_LOSSES, "t2i", nan_loss)
    with pytest.raises(trainer.RunError, match=r"stage0 step 1 \(global step 1\): the loss is nan \(t2i nan\); "
                                               r"training stopped and nothing non-finite was saved"):
        train(resolve("smoke", _stage0(out)))
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_non_finite_weights_are_never_checkpointed_or_exported(tmp_path, monkeypatch):
    from train import trainer
    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "lr_lambda", lambda *a: float("nan"))  # every update writes NaN weights
    with pytest.raises(trainer.RunError, match=r"after stage0 step 1 \(global step 1\): \d+ weight tensor\(s\) "
                                               r"hold NaN or inf"):
        train(resolve("smoke", _stage0(out, "ckpt_every=1")))
    assert not (out / "final").exists() and latest_checkpoint(out) is None


def test_full_or_read_only_out_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from train import trainer
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, line = _run_main(capsys, *_stage0(blocker / "run"))
    assert code == 1 and "could not create the run folder" in line and "Not a directory" in line
    out = tmp_path / "run"
    real_save = trainer.save_file
    calls = []

    def full_after_first_checkpoint(tensors, path, *a, **k):
        calls.append(path)
        if any("step_0000002" in str(p) for p in calls):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, *a, **k)

    monkeypatch.setattr(trainer, "save_file", full_after_first_checkpoint)
    code, line = _run_main(capsys, *_stage0(out, "ckpt_every=1"))
    assert code == 1 and "could not save the checkpoint of step 2" in line and "No space left" in line
    assert "free some space, then continue with --resume" in line
    assert latest_checkpoint(out).name == "step_0000001"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_own_data_is_scanned_lazily_resized_and_skips_what_it_cannot_use(tmp_path):
    from PIL import Image

    from ovis_u1.shapes import ShapesWorld, write_jsonl
    from ovis_u1.shapes.jsonl import scan_jsonl
    from train.config import DataArgs
    from train.data import TaskData
    world = ShapesWorld()
    folder = tmp_path / "data"
    path = write_jsonl([world.t2i(i) for i in range(3)] + [world.edit(i) for i in range(2)]
                       + [world.vqa(i) for i in range(2)], folder)
    world.t2i(9).image.resize((80, 80)).save(folder / "odd.png")  # one image of another size
    Image.new("1", (8000, 8000), 1).save(folder / "huge.png")  # 64 MP, a few KB on disk
    (folder / "bomb.png").write_bytes(png_header_only(13000, 13000))  # 169 MP
    Image.new("RGB", (64, 64), "red").save(folder / "whole.png")
    (folder / "torn.png").write_bytes((folder / "whole.png").read_bytes()[:60])  # header fine, data cut
    lines = [json.dumps({"type": "t2i", "image": "odd.png", "caption": "an odd size"})]
    lines += [json.dumps({"type": "t2i", "image": "huge.png", "caption": "huge"})] * 12
    lines += [json.dumps({"type": "t2i", "image": "bomb.png", "caption": "bomb"})]
    lines += [json.dumps({"type": "edit", "source": "torn.png", "instruction": "x", "target": "whole.png"})]
    with open(path, "ab") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b'{"type": "t2i", "image": "odd.png", "caption": "\xff\xfe"}\n')  # invalid UTF-8
        f.write(b"[" * 100_000 + b"\n")  # nested deeper than any parser goes
    with pytest.warns(UserWarning, match="skipped 3 of 24") as caught:
        _records, skipped = scan_jsonl(path)
    assert skipped == {"too_large": 1, "not_utf8": 1, "malformed_json": 1}, str(caught[0].message)
    data = TaskData(DataArgs(source=str(path), image_size=32))
    assert len(data.own["t2i"]) == 16 and len(data.own["edit"]) == 3
    t2i = data.batch("t2i", 0, 16)
    assert {s.image.size for s in t2i} == {(32, 32)}  # the 80x80, the 64x64 and the 8000x8000 alike
    assert {s.caption for s in t2i} >= {"an odd size", "huge"}
    with pytest.warns(UserWarning, match="could not be decoded; skipped, the next record takes its place"):
        edits = data.batch("edit", 0, 3)
    assert all(s.source.size == s.target.size == (32, 32) for s in edits)
    assert all(s.instruction != "x" for s in edits)
    vqa = data.batch("vqa", 0, 2)
    assert all(max(im.size) == 32 for s in vqa for im in s.images)


def test_own_data_with_bad_records_and_mixed_sizes_trains_every_stage_that_uses_it(tmp_path):
    """Own JSONL data for each task, with an image of another size, a line that is not JSON, a missing image
    (both skipped when scanned, with a warning) and a corrupt one (skipped when drawn): every stage that
    reads it trains and the model is exported."""
    from ovis_u1.shapes import ShapesWorld, write_jsonl
    world = ShapesWorld()
    folder = tmp_path / "data"
    path = write_jsonl([world.t2i(i) for i in range(3)] + [world.vqa(i) for i in range(3)]
                       + [world.edit(i) for i in range(2)], folder)
    world.t2i(7).image.resize((80, 80)).save(folder / "odd.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG garbage")
    with open(path, "a") as f:
        f.write(json.dumps({"type": "edit", "source": "odd.png", "instruction": "keep it", "target": "odd.png"}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"type": "t2i", "image": "missing.png", "caption": "a red circle"}) + "\n")
        f.write(json.dumps({"type": "t2i", "image": "corrupt.png", "caption": "a red circle"}) + "\n")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped"):
        train(resolve("smoke", [f"out_dir={out}", "progress=false", "threads=1", f"data.source={path}",
                                "only_stages=[stage3,stage5]", "stages.stage5.steps=3", "stages.stage5.batch_size=6"]))
    assert (out / "final" / "model.safetensors").exists()


def test_an_export_target_it_cannot_replace_stops_the_run_before_training(tmp_path):
    from train.trainer import RunError
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("keep")
    with pytest.raises(RunError, match=r"export: .*work is a non-empty directory that holds no checkpoint"):
        train(resolve("smoke", _stage0(tmp_path / "run", f"export={work}")))
    assert not (tmp_path / "run" / "log.jsonl").exists() and (work / "thesis.tex").read_text() == "keep"


def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(resolve("smoke", _stage0(out)))
    (latest_checkpoint(out) / "model.safetensors").write_bytes(b"\x00 not safetensors")
    code, line = _run_main(capsys, *_stage0(out), "--resume")
    assert code == 1 and "cannot resume from" in line and "step_0000002" in line and "damaged" in line
