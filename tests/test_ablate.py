"""The ablation studies: a model whose refiner has no blocks (depth 0) trains and generates; the
study driver composes, trains, scores, skips finished runs and resumes a killed one; the statistics on data
with known answers. Tiny preset, a few steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from ovis_u1.config import get_preset
from ovis_u1.model import OvisU1
from train import ablation_stats as st
from train.ablate import Paths, Settings, compose_init, rescore, run_studies, study_stages
from train.config import resolve
from train.trainer import latest_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
TINY_STUDY = dict(step_scale=0.004, batch_scale=0.25, n_geneval=6, n_loss=7, n_vqa=12)


def test_a_model_without_refiner_blocks_trains_saves_and_generates_differently(tmp_path):
    args = resolve("smoke", ["only_stages=[stage0]", "stages.stage0.steps=3", "progress=false", "threads=1",
                             f"out_dir={tmp_path / 'run'}", "preset_overrides={refiner.depth: 0}"])
    export = train(args)
    model = OvisU1.from_pretrained(export)
    assert model.config.refiner.depth == 0 and len(model.refiner.individual_token_refiner.blocks) == 0
    assert model.decoder.final_layer.linear.weight.abs().sum() > 0  # zero-initialised, so it trained
    # Against the published refiner with the same projection and decoder, the decoder gets another CLS.
    published = OvisU1(get_preset("tiny"), tokenizer=model.tokenizer)
    published.load_state_dict(model.state_dict(), strict=False)
    cond, mask = torch.randn(1, 4, model.config.refiner.in_dim), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        a, b = model.refiner(cond, mask), published.refiner(cond, mask)
    assert torch.equal(a.tokens, b.tokens)  # zero-initialised gates: the published blocks start as identities
    assert not torch.allclose(a.cls, b.cls)
    images = [m.eval().text_to_image("a red circle", seed=0, num_inference_steps=2, progress=False)
              for m in (model, published)]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_compose_init_refreshes_only_the_named_components(tmp_path, make_tiny):
    src = make_tiny(0)
    src.save_pretrained(tmp_path / "src")
    compose_init(tmp_path / "src", tmp_path / "a", ("decoder", "refiner"), 3, {"refiner.depth": 0})
    compose_init(tmp_path / "src", tmp_path / "b", ("decoder", "refiner"), 3, {})
    a, b = OvisU1.from_pretrained(tmp_path / "a"), OvisU1.from_pretrained(tmp_path / "b")
    assert a.config.refiner.depth == 0 and b.config.refiner.depth == 2
    for key, value in src.state_dict().items():
        if not key.startswith(("decoder.", "refiner.")):
            assert torch.equal(a.state_dict()[key], value) and torch.equal(b.state_dict()[key], value), key
    # Fresh, and the same fresh decoder in both arms of a seed whatever the refiner drew.
    assert not torch.equal(a.decoder.final_layer.linear.weight, src.decoder.final_layer.linear.weight)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if k.startswith("decoder."))
    with pytest.raises(ValueError, match="only components initialised afresh"):
        compose_init(tmp_path / "src", tmp_path / "c", ("decoder",), 0, {"refiner.depth": 0})


def test_study_stages_differ_only_where_the_arms_do():
    r = study_stages("refiner")
    assert r["published"] == r["none"] and r["published"][0].trainable == ["refiner", "decoder"]
    u = study_stages("unified")
    assert [s.name for s in u["prefix"]] == ["prep_lm", "prep_text", "stage0"]
    for a, b in zip(u["unified"], u["understanding"]):
        assert (a.name, a.trainable, a.steps, a.batch_size, a.lr) == (b.name, b.trainable, b.steps, b.batch_size, b.lr)
    assert [s.tasks for s in u["unified"][:2]] == [{"vqa": 1.0, "t2i": 1.0, "edit": 1.0}] * 2
    assert [s.tasks for s in u["understanding"]] == [{"vqa": 1.0}] * 3 == [u["unified"][2].tasks] * 3
    with pytest.raises(ValueError, match="unknown study"):
        study_stages("nope")


# ---- the driver --------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_source(tmp_path, make_tiny):
    make_tiny(0).save_pretrained(tmp_path / "src")
    return str(tmp_path / "src")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _steps(work: Path) -> list[int]:
    return [json.loads(ln)["global_step"] for ln in (work / "log.jsonl").read_text().splitlines()]


def test_study_resumes_a_killed_run_and_skips_finished_ones(tmp_path, tiny_source):
    paths = Paths(tmp_path / "runs", tmp_path / "results")
    settings = Settings(source=tiny_source, **{**TINY_STUDY, "step_scale": 0.02})  # a checkpoint every 2 steps
    total = round(study_stages("refiner")["published"][0].steps * 0.02)
    cmd = [sys.executable, "-m", "train.ablate", "--study", "refiner", "--seeds", "0", "--runs", str(paths.runs),
           "--results", str(paths.results), "--source", tiny_source,
           *(f"--{k.replace('_', '-')}={v}" for k, v in {**TINY_STUDY, "step_scale": 0.02}.items())]
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    work = paths.runs / "refiner" / "published_seed0"
    deadline = time.time() + 180
    while time.time() < deadline and latest_checkpoint(work) is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the trainer it started
    proc.wait()
    killed_at = json.loads((latest_checkpoint(work) / "state.json").read_text())["global_step"]
    assert 0 < killed_at < total, "the run must be killed mid-training"
    assert not (paths.results / "refiner" / "published_seed0.json").exists()

    log: list[str] = []
    run_studies(["refiner"], [0], paths, settings, threads=1, log=log.append)
    assert _steps(work) == sorted(set(_steps(work))) and _steps(work)[-1] == total  # resumed, nothing twice
    starts = (work / "train.log").read_text().split("training ['refiner', 'decoder']")
    assert len(starts) == 3 and "starting from scratch" not in starts[1]  # the second start resumed
    records = st.load_study(paths.results, "refiner")
    assert [(r["arm"], r["seed"]) for r in records] == [("published", 0), ("none", 0)]
    r = records[0]
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in {**TINY_STUDY, "step_scale": 0.02}.items())
    assert r["command"] == (f"python -m train.ablate --study refiner --seeds 0 --source {tiny_source}{flags} "
                            f"--results {paths.results} --runs {paths.runs}")
    assert len(r["samples"]["geneval"]["value"]) == 6 and len(r["samples"]["t2i_loss"]["value"]) == 7
    assert records[1]["config_changes"] == {"refiner.depth": 0}
    assert r["samples"]["t2i_loss"]["value"] != records[1]["samples"]["t2i_loss"]["value"]

    before = {p: p.stat().st_mtime_ns for p in paths.results.rglob("*.json")}
    log.clear()
    run_studies(["refiner"], [0], paths, None, threads=1, log=log.append)  # settings come from the study
    assert [m.split(":")[1].strip() for m in log] == ["done (" + str(paths.results / "refiner" / f"{a}_seed0.json")
                                                     + ")" for a in ("published", "none")]
    assert before == {p: p.stat().st_mtime_ns for p in paths.results.rglob("*.json")}
    with pytest.raises(ValueError, match="started with other settings"):
        run_studies(["refiner"], [0], paths, Settings(source=tiny_source), threads=1, log=log.append)

    # A metric added after a run finished is scored from its kept model; what it had must score the same.
    result = paths.results / "refiner" / "none_seed0.json"
    record = json.loads(result.read_text())
    gain = record["samples"].pop("prompt_gain")
    assert any(v != 0 for v in gain["value"])
    result.write_text(json.dumps(record))
    assert rescore("refiner", paths, 1, log.append) == [result]
    assert json.loads(result.read_text())["samples"]["prompt_gain"] == gain
    record["samples"]["t2i_loss"]["value"][0] += 0.1
    result.write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="scores differently now"):
        rescore("refiner", paths, 1, log.append)


def test_unified_study_shares_its_prefix(tmp_path, tiny_source):
    """Both arms start from one prefix run, trained once. One seed: pairing seeds across arms is
    test_study_summary_from_result_files' (a second seed cost two more trainings and scorings)."""
    paths = Paths(tmp_path / "runs", tmp_path / "results")
    run_studies(["unified"], [0], paths, Settings(source=tiny_source, **TINY_STUDY), threads=1, log=print)
    prefix = paths.runs / "unified" / "prefix"
    assert (prefix / "done").exists() and (prefix / "train.log").read_text().count("[prep_lm]") == 1
    src = OvisU1.from_pretrained(tiny_source).state_dict()
    start = OvisU1.from_pretrained(prefix / "init").state_dict()
    assert all(torch.equal(start[k], v) for k, v in src.items() if k.startswith(("vae.", "visual_tokenizer.")))
    assert not torch.equal(start["llm.model.embed_tokens.weight"], src["llm.model.embed_tokens.weight"])
    summary = st.study_summary(paths.results, "unified", n_boot=200)
    assert summary["seeds"] == {"unified": [0], "understanding": [0]}
    assert set(summary["metrics"]) == {"vqa", "followup"} and summary["metrics"]["vqa"]["paired"]["n_seeds"] == 1



def test_refiner_study_can_start_both_arms_from_the_source_decoder(tmp_path, tiny_source):
    paths = Paths(tmp_path / "runs", tmp_path / "results")
    settings = Settings(source=tiny_source, decoder_start="source", **TINY_STUDY)
    run_studies(["refiner"], [0], paths, settings, threads=1, log=print)
    src = OvisU1.from_pretrained(tiny_source).state_dict()
    for arm in ("published", "none"):
        start = OvisU1.from_pretrained(paths.runs / "refiner" / f"{arm}_seed0" / "init").state_dict()
        assert all(torch.equal(start[k], v) for k, v in src.items() if k.startswith("decoder."))
        assert not torch.equal(start["refiner.input_embedder.weight"], src["refiner.input_embedder.weight"])
        record = json.loads((paths.results / "refiner" / f"{arm}_seed0.json").read_text())
        assert record["fresh_per_seed"] == ["refiner"] and record["settings"]["decoder_start"] == "source"
    with pytest.raises(ValueError, match="decoder_start must be"):
        run_studies(["refiner"], [0], Paths(tmp_path / "r2", tmp_path / "s2"),
                    Settings(source=tiny_source, decoder_start="warm"), threads=1, log=print)

# ---- the statistics ----------------------------------------------------------------------------------------
def test_run_score_is_the_mean_of_the_kind_means():
    assert st.run_score({"kind": ["a", "a", "a", "b"], "value": [1, 1, 0, 0]}) == pytest.approx((2 / 3 + 0) / 2)
    assert st.run_score({"kind": ["a", "b"] * 5, "value": [1, 0] * 5}) == 0.5
    with pytest.raises(ValueError, match="as many kinds as values"):
        st.run_score({"kind": ["a"], "value": [1, 0]})


def test_resampling_keeps_each_kind_in_its_place():
    kinds = ["a"] * 3 + ["b"] * 5
    idx = st.resample_within_kinds(kinds, 50, np.random.default_rng(0))
    assert idx.shape == (50, 8) and set(idx[:, :3].ravel()) == {0, 1, 2} and set(idx[:, 3:].ravel()) == {3, 4, 5, 6, 7}


def test_tests_on_known_differences():
    assert st.sign_flip_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 8)  # the smallest p with 3 seeds
    assert st.sign_flip_p(np.array([1.0, -1.0])) == 1.0
    assert st.sign_flip_p(np.array([0.1, 0.2, 0.3, -0.05, 0.4])) == pytest.approx(4 / 32)
    d = np.array([0.05, 0.07, 0.06, 0.04])
    assert st.paired_t_p(d) == pytest.approx(float(scipy_stats.ttest_rel(d + 1, np.ones(4)).pvalue))
    assert st.paired_t_p(np.array([0.1, 0.1])) == 0.0 and st.paired_t_p(np.zeros(3)) == 1.0
    assert np.isnan(st.paired_t_p(np.array([0.3])))


def test_intervals_cover_sample_and_seed_variation():
    rng = np.random.default_rng(0)
    kinds = ["x", "y"] * 200
    base = (rng.random(400) < 0.5).astype(float)
    same = np.stack([base] * 4)  # four seeds that agree: only the samples vary
    s = st.arm_summary(same, kinds, n_boot=2000)
    half = (s["ci95"][1] - s["ci95"][0]) / 2
    assert s["mean"] == pytest.approx(base.mean()) and half == pytest.approx(1.96 * 0.5 / np.sqrt(400), rel=0.2)
    spread = np.stack([(rng.random(400) < p).astype(float) for p in (0.2, 0.4, 0.6, 0.8)])
    wide = st.arm_summary(spread, kinds, n_boot=2000)
    assert wide["ci95"][1] - wide["ci95"][0] > 4 * half  # seeds that disagree widen the interval
    assert wide["per_seed"] == pytest.approx(list(spread.mean(axis=1)))
    # A constant paired difference is certain; one sample-level flip per seed moves each seed's own interval.
    p = st.paired_summary(same + 0.0, same * 0.0, kinds, n_boot=500)
    assert p["mean"] == pytest.approx(base.mean()) and p["t_test_p"] == 0.0 and p["sign_flip_p"] == 0.125
    assert all(d["ci95"][0] < d["diff"] < d["ci95"][1] for d in p["per_seed"])
    zero = st.paired_summary(same, same, kinds, n_boot=200)
    assert zero["mean"] == 0 and zero["ci95"] == [0.0, 0.0] and zero["t_test_p"] == 1.0
    with pytest.raises(ValueError, match="same seeds and samples"):
        st.paired_summary(same, same[:2], kinds)


def _record(tmp: Path, arm: str, seed: int, values: list[int], kinds: list[str]) -> None:
    folder = tmp / "toy"
    folder.mkdir(exist_ok=True)
    (folder / f"{arm}_seed{seed}.json").write_text(json.dumps(
        {"study": "toy", "arm": arm, "arms": ["on", "off"], "seed": seed,
         "samples": {"vqa": {"kind": kinds, "value": values}}}))


def test_study_summary_from_result_files(tmp_path):
    kinds = ["a", "b"] * 4
    for seed, (on, off) in enumerate([([1] * 8, [0] * 8), ([1] * 6 + [0] * 2, [0] * 8), ([1] * 8, [1] + [0] * 7)]):
        _record(tmp_path, "on", seed, on, kinds)
        _record(tmp_path, "off", seed, off, kinds)
    _record(tmp_path, "on", 3, [1] * 8, kinds)  # a seed the other arm has not reached yet: not paired
    s = st.study_summary(tmp_path, "toy", n_boot=300)
    assert s["arms"] == ["on", "off"] and s["seeds"] == {"on": [0, 1, 2, 3], "off": [0, 1, 2]}
    vqa = s["metrics"]["vqa"]
    assert vqa["arms"]["on"]["per_seed"] == pytest.approx([1, 0.75, 1, 1])
    assert vqa["paired"]["seeds"] == [0, 1, 2]
    assert [d["diff"] for d in vqa["paired"]["per_seed"]] == pytest.approx([1, 0.75, 0.875])
    assert vqa["arms"]["off"]["by_kind"]["a"]["per_seed"] == pytest.approx([0, 0, 0.25])
    text = st.summary_markdown(tmp_path, ["toy", "empty"])
    assert "| VQA accuracy | 0.938" in text and "+0.875" in text and "no finished runs yet" in text
    _record(tmp_path, "off", 3, [1] * 4, ["a", "b"] * 2)
    with pytest.raises(ValueError, match="other vqa samples"):
        st.study_summary(tmp_path, "toy")
