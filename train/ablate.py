"""python -m train.ablate: the two questions the Ovis-U1 report leaves open, as seeded, resumable studies.

    python -m train.ablate --study refiner --seeds 0 1 2      # run, or resume, one study
    python -m train.ablate --study all --seeds 0 1 2 --commit # both, seed by seed; commit each result
    python -m train.ablate --summary                          # the answer so far, from docs/ablations

refiner: the token refiner as published (2 blocks) against none (depth 0: the decoder gets the refiner's
    input projection of the condition and its masked mean in place of the refined CLS). Both arms start
    from the shipped model's VAE, visual tokenizer and LLM (frozen while the generator trains, so what the
    text preparation made of it is shared), with the refiner initialised afresh per seed and the decoder
    either afresh too (decoder_start "fresh") or the shipped one (decoder_start "source"), and train
    text-to-image alone. Scored on mini-GenEval and a held-out denoising loss.
unified: stages 1-2 on understanding, text-to-image and editing (the paper's recipe) against stages 1-2
    on understanding alone, both from one shared prefix (the default recipe up to stage 0, with the shipped
    VAE and visual tokenizer, which the recipe freezes after preparing them) and followed by the same
    stage 3. Scored on VQA and follow-up VQA.

A run's seed drives everything arm-specific (fresh weights, data order, noise); the shared prefix is one
draw. Each run lives in runs/ablate/<study>/<arm>_seed<k> (a recipe the trainer resumes with --resume);
its scores, one figure per held-out sample so the statistics can resample samples as well as seeds, go to
<results>/<study>/<arm>_seed<k>.json (results: docs/ablations by default), which marks the run finished.
The statistics are in train.ablation_stats; docs/ablations.md and notebooks/06_ablations.ipynb present them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from .config import resolve
from .stages import StageArgs

REPO = Path(__file__).resolve().parents[1]
STUDIES = ("refiner", "unified")


@dataclass
class Settings:
    """What makes a study's runs comparable; fixed when its first run starts (settings.json beside them)."""

    source: str = "ovis_u1/default_model"  # the trained model whose shared parts every run starts from
    step_scale: float = 1.0  # scales every stage's steps (tests use a few steps)
    batch_scale: float = 1.0
    precision: str = "fp32"  # fixed, so a run on a bf16 machine is still the same experiment
    eval_seed: int = 0  # the held-out samples, the same for every run
    n_geneval: int = 90  # 15 per GenEval category
    n_loss: int = 126  # held-out captions (18 per caption category) for the denoising loss, 4 draws each
    n_vqa: int = 600  # 100 per question kind; follow-up questions as many
    # refiner study: "fresh" initialises the decoder afresh per seed (both arms learn to draw from nothing);
    # "source" starts both arms from the source model's trained decoder, so the budget goes to learning to
    # follow the prompt through the arm's refiner (fresh in both) instead of to learning to draw.
    decoder_start: str = "fresh"


def study_stages(study: str) -> dict[str, list[StageArgs]]:
    """Stages per part of the study: "prefix" (shared, once) and one list per arm.

    refiner, per arm: stage 4 of the default recipe (text-to-image, refiner + decoder) cut to 600 steps of
    batch 16 (of 5,000 of 32), which one thread of a busy 2-core CPU runs in ~15-20 minutes.
    unified: the prefix is the recipe's prep_lm, prep_text and stage0 as they are; per arm, stages 1 and 2
    as in the recipe (the understanding arm puts all 24 rows of a batch on VQA) and stage 3 cut from 2,400
    to 600 steps."""
    recipe = {s.name: s for s in resolve("default").stages}
    if study == "refiner":
        gen = dataclasses.replace(recipe["stage4"], steps=600, batch_size=16)
        return {"published": [gen], "none": [dataclasses.replace(gen)]}
    if study == "unified":
        prefix = [dataclasses.replace(recipe[n]) for n in ("prep_lm", "prep_text", "stage0")]
        stage3 = dataclasses.replace(recipe["stage3"], steps=600)
        unified = [dataclasses.replace(recipe["stage1"]), dataclasses.replace(recipe["stage2"]), stage3]
        understanding = [*(dataclasses.replace(s, tasks={"vqa": 1.0}) for s in unified[:2]),
                         dataclasses.replace(stage3)]
        return {"prefix": prefix, "unified": unified, "understanding": understanding}
    raise ValueError(f"unknown study {study!r}; studies: {list(STUDIES)}")


ARMS = {"refiner": ("published", "none"), "unified": ("unified", "understanding")}
# Model config changes per arm; the refiner study's only difference.
ARM_CONFIG = {("refiner", "none"): {"refiner.depth": 0}}
# Components initialised afresh (from the run's seed) in the model a part starts from; the rest is copied.
FRESH = {("refiner", "run"): ("decoder", "refiner"), ("unified", "prefix"): ("llm", "vte", "refiner", "decoder"),
         ("unified", "run"): ()}
# prompt_gain: the held-out loss without the prompt minus with it, at the same draws: how much the decoder
# uses the condition the refiner hands it (the denoising loss alone is mostly about the image).
METRICS = {"refiner": ("geneval", "t2i_loss", "prompt_gain"), "unified": ("vqa", "followup")}


# ---- composing the model a part starts from ------------------------------------------------------------------
def _build_component(name: str, config):
    from ovis_u1.decoder import VisualDecoder
    from ovis_u1.llm import build_llm
    from ovis_u1.refiner import TokenRefiner
    builders = {"refiner": lambda: TokenRefiner(config.refiner), "decoder": lambda: VisualDecoder(config.decoder),
                "llm": lambda: build_llm(config.llm),
                "vte": lambda: nn.Embedding(config.adapter.vocab_size, config.llm.hidden_size)}
    if name not in builders:
        raise ValueError(f"cannot initialise {name!r} afresh; can: {sorted(builders)}")
    return builders[name]()


def compose_init(source: str | Path, out: Path, fresh: tuple[str, ...], seed: int, config_changes: dict) -> None:
    """Save to `out` the model at `source` with `config_changes` applied and the `fresh` components
    initialised afresh, each from its own seed (seed, component) so that, say, the decoder starts the same
    in both arms of a seed whatever the refiner draws. Everything else is copied exactly."""
    from ovis_u1.model import OvisU1

    from .trainer import override_config
    if out.exists():
        return
    src = OvisU1.from_pretrained(str(source))
    config = override_config(dataclasses.replace(src.config), dict(config_changes))
    changed = {key.partition(".")[0] for key in config_changes}
    if changed - set(fresh):
        raise ValueError(f"config changes {sorted(config_changes)} touch {sorted(changed)}, which would be copied "
                         f"from {source}; only components initialised afresh ({list(fresh)}) may change")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OvisU1(config, tokenizer=src.tokenizer)
    kept = {k: v for k, v in src.state_dict().items() if k.split(".")[0] not in fresh}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if k.split(".")[0] not in fresh and k != "llm.lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{source} does not fit the composed model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    for k, name in enumerate(sorted(fresh)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            setattr(model, name, _build_component(name, config))
    if "llm" in fresh:
        model.llm.tie_weights()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, out)


# ---- one part: compose, train (resumable), mark done -------------------------------------------------------
def _recipe(stages: list[StageArgs], init: Path, out_dir: Path, seed: int, data_seed: int, settings: Settings,
            threads: int) -> dict:
    base = resolve("default")
    return {"preset": base.preset, "init": str(init), "out_dir": str(out_dir), "export": str(out_dir / "final"),
            "seed": seed, "threads": threads, "precision": settings.precision, "progress": False,
            # A checkpoint every ~100 steps of the full-size study (the trainer resumes from the last one).
            "log_every": 10, "ckpt_every": max(1, round(100 * settings.step_scale)),
            "step_scale": settings.step_scale,
            "batch_scale": settings.batch_scale,
            "data": {**dataclasses.asdict(base.data), "seed": data_seed},
            "stages": [dataclasses.asdict(s) for s in stages]}


def train_part(work: Path, stages: list[StageArgs], source: Path, fresh: tuple[str, ...], config_changes: dict,
               seed: int, data_seed: int, settings: Settings, threads: int, log) -> Path:
    """Train one part in `work` (or finish it: the trainer resumes from its latest checkpoint); returns the
    exported model. A part whose `done` marker exists is not touched."""
    final = work / "final"
    if (work / "done").exists():
        return final
    work.mkdir(parents=True, exist_ok=True)
    compose_init(source, work / "init", fresh, seed, config_changes)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(stages, work / "init", work, seed, data_seed, settings, threads),
                                     sort_keys=False))
    cmd = [sys.executable, "-m", "train", "--recipe", str(recipe), "--resume"]
    log(f"training {work}: {' '.join(cmd)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(work / "train.log", "a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"training {work} failed (exit {proc.returncode}); see {work / 'train.log'}. "
                           f"Rerunning the study resumes it from its last checkpoint.")
    (work / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # the export is what later parts need
    return final


# ---- scoring: one figure per held-out sample ---------------------------------------------------------------
@torch.no_grad()
def score_run(model, study: str, settings: Settings, metrics: tuple[str, ...] | None = None) -> dict:
    """{metric: {"kind": [...], "value": [...]}}: per held-out sample, its category / question kind and its
    figure (1/0 for a hit, the loss for t2i_loss); every run of a study sees the same samples. `metrics`:
    a subset of the study's (default all)."""
    from ovis_u1.shapes.evaluate import geneval_correct, geneval_prompts
    from ovis_u1.shapes.world import T2I_CATEGORIES, VQA_KINDS, ShapesWorld
    seed, out = settings.eval_seed, {}
    metrics = METRICS[study] if metrics is None else metrics
    world = ShapesWorld(64, seed, split="heldout")
    if "geneval" in metrics:
        prompts = geneval_prompts(settings.n_geneval, seed)
        hits = []
        for start in range(0, len(prompts), 8):
            chunk = prompts[start:start + 8]
            images = model.text_to_image([p for p, _ in chunk], seed=seed + start, progress=False, mode="exact")
            hits += [int(geneval_correct(im, spec)) for im, (_, spec) in zip(images, chunk)]
        out["geneval"] = {"kind": [s.category for _, s in prompts], "value": hits}
    if {"t2i_loss", "prompt_gain"} & set(metrics):
        from .losses import t2i_loss
        model.eval()
        cond, gain, kinds = [], [], []
        for i in range(settings.n_loss):
            kinds.append(T2I_CATEGORIES[i % len(T2I_CATEGORIES)])
            sample = world.t2i(i, kinds[-1])
            # cond_dropout 0 keeps every prompt, 1 drops every one; both draw the same times and noises.
            with_prompt, without = (float(t2i_loss(model, [sample] * 4, torch.Generator().manual_seed(
                seed * 100_003 + i), cond_dropout=p)) for p in (0.0, 1.0))
            cond.append(round(with_prompt, 6))
            gain.append(round(without - with_prompt, 6))
        for metric, values in (("t2i_loss", cond), ("prompt_gain", gain)):
            if metric in metrics:
                out[metric] = {"kind": kinds, "value": values}
    for metric, history_p, kinds in (("vqa", 0.0, VQA_KINDS), ("followup", 1.0, tuple(k for k in VQA_KINDS
                                                                                    if k != "compare"))):
        if metric not in metrics:
            continue
        hits, kind_list = [], []
        for start in range(0, settings.n_vqa, 16):
            samples = []
            for i in range(start, min(settings.n_vqa, start + 16)):
                kind_list.append(kinds[i % len(kinds)])
                samples.append(world.vqa_conversation(i, history_p, kind_list[-1]))
            preds = model.answer([s.question for s in samples], images=[s.images for s in samples],
                                 history=[s.history for s in samples])
            hits += [int(p.strip().lower() == s.answer.strip().lower()) for p, s in zip(preds, samples)]
        out[metric] = {"kind": kind_list, "value": hits}
    return out


# ---- the study ---------------------------------------------------------------------------------------------
@dataclass
class Paths:
    runs: Path = Path("runs/ablate")
    results: Path = Path("docs/ablations")
    commit: bool = False


def load_settings(study: str, paths: Paths, given: Settings | None) -> Settings:
    """The study's settings: those it started with; `given` must match them (or starts the study)."""
    path = paths.results / study / "settings.json"
    if path.exists():
        saved = Settings(**json.loads(path.read_text()))
        if given is not None and given != saved:
            diff = {k: (v, getattr(given, k)) for k, v in dataclasses.asdict(saved).items() if getattr(given, k) != v}
            raise ValueError(f"study {study!r} started with other settings (saved, given): {diff}; resume it with "
                             f"the saved ones (leave the options out) or use another --results folder")
        return saved
    settings = given or Settings()
    if settings.decoder_start not in ("fresh", "source"):
        raise ValueError(f"decoder_start must be 'fresh' or 'source', got {settings.decoder_start!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n")
    return settings


def fresh_components(study: str, part: str, settings: Settings) -> tuple[str, ...]:
    fresh = FRESH[(study, part)]
    if study == "refiner" and settings.decoder_start == "source":
        return tuple(c for c in fresh if c != "decoder")
    return fresh


def reproduce_command(study: str, seed: int, settings: Settings, paths: Paths) -> str:
    """The command that runs this seed of the study again: the folders and the settings that differ from
    the defaults (the ones a rerun would otherwise read from the folder's settings.json)."""
    parts = [f"python -m train.ablate --study {study} --seeds {seed}"]
    parts += [f"--{f.name.replace('_', '-')} {getattr(settings, f.name)}" for f in dataclasses.fields(Settings)
              if getattr(settings, f.name) != f.default]
    default = Paths()
    parts += [f"--results {paths.results}"] * (paths.results != default.results)
    parts += [f"--runs {paths.runs}"] * (paths.runs != default.runs)
    return " ".join(parts)


def result_path(paths: Paths, study: str, arm: str, seed: int) -> Path:
    return paths.results / study / f"{arm}_seed{seed}.json"


def run_one(study: str, arm: str, seed: int, settings: Settings, paths: Paths, threads: int, log) -> Path:
    """Train (or resume) and score one run; skips it when its result exists. Returns the result path."""
    result = result_path(paths, study, arm, seed)
    if result.exists():
        log(f"{study}/{arm} seed {seed}: done ({result})")
        return result
    stages = study_stages(study)
    t0 = time.perf_counter()
    source = Path(settings.source)
    if "prefix" in stages:
        source = train_part(paths.runs / study / "prefix", stages["prefix"], source,
                            fresh_components(study, "prefix", settings), {},
                            seed=0, data_seed=0, settings=settings, threads=threads, log=log)
    changes = ARM_CONFIG.get((study, arm), {})
    fresh = fresh_components(study, "run", settings)
    final = train_part(paths.runs / study / f"{arm}_seed{seed}", stages[arm], source, fresh, changes,
                       seed=seed, data_seed=100 + seed, settings=settings, threads=threads, log=log)
    t_train = time.perf_counter() - t0
    from ovis_u1.model import OvisU1
    torch.set_num_threads(threads)
    model = OvisU1.from_pretrained(str(final))
    t1 = time.perf_counter()
    samples = score_run(model, study, settings)
    record = {"study": study, "arm": arm, "arms": list(ARMS[study]), "seed": seed, "config_changes": changes,
              "stages": [dataclasses.asdict(s) for s in stages[arm]],
              "shared_prefix": ([dataclasses.asdict(s) for s in stages.get("prefix", [])],
                                {"source": settings.source, "fresh": list(FRESH.get((study, "prefix"), ()))}),
              "fresh_per_seed": list(fresh), "settings": dataclasses.asdict(settings),
              "command": reproduce_command(study, seed, settings, paths),
              "seconds": {"train": round(t_train), "score": round(time.perf_counter() - t1)},
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "samples": samples}
    result.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.with_name(f".{result.name}.tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    os.replace(tmp, result)
    from .ablation_stats import run_score
    log(f"{study}/{arm} seed {seed}: " + ", ".join(f"{m} {run_score(samples[m]):.3f}" for m in samples))
    if paths.commit:
        _commit([result, paths.results / study / "settings.json"], f"Ablation {study}: {arm} seed {seed} scored", log)
    return result


def rescore(study: str, paths: Paths, threads: int, log) -> list[Path]:
    """Score the finished runs of a study on the metrics their results lack (one added after they ran), from
    the models kept in their work folders. The figures a result already has are scored again alongside and
    must come out the same, so a changed model or scorer is refused rather than mixed in."""
    from ovis_u1.model import OvisU1
    torch.set_num_threads(threads)
    settings = load_settings(study, paths, None)
    changed = []
    for result in sorted((paths.results / study).glob("*_seed*.json")):
        record = json.loads(result.read_text())
        missing = tuple(m for m in METRICS[study] if m not in record["samples"])
        if not missing:
            continue
        final = paths.runs / study / f"{record['arm']}_seed{record['seed']}" / "final"
        if not final.exists():
            raise RuntimeError(f"{result} lacks {list(missing)} and its model {final} is gone; rerun that run")
        cheap = tuple(m for m in record["samples"] if m != "geneval")  # geneval takes minutes: not rechecked
        scored = score_run(OvisU1.from_pretrained(str(final)), study, settings, missing + cheap)
        for m in cheap:
            if not np.allclose(scored[m]["value"], record["samples"][m]["value"], atol=1e-5):
                raise RuntimeError(f"{result}: {m} scores differently now than when it ran; not adding {missing}")
        record["samples"].update({m: scored[m] for m in missing})
        tmp = result.with_name(f".{result.name}.tmp")
        tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")
        os.replace(tmp, result)
        log(f"{result}: added {list(missing)}")
        changed.append(result)
    if changed and paths.commit:
        _commit(changed, f"Ablation {study}: {len(changed)} finished runs scored on {list(METRICS[study])}", log)
    return changed


def _commit(files: list[Path], message: str, log) -> None:
    """Commit just these files (other staged work is left alone); a failure is reported, never fatal."""
    names = [str(f) for f in files]
    for attempt in range(3):
        add = subprocess.run(["git", "add", "--", *names], cwd=REPO, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", *names], cwd=REPO, capture_output=True, text=True
        ).returncode == 0
        if done:
            return
        time.sleep(5 * (attempt + 1))  # another git command holding the index lock
    log(f"could not commit {names}; commit them by hand")


def run_studies(studies: list[str], seeds: list[int], paths: Paths, settings: Settings | None, threads: int,
                log=print) -> list[Path]:
    """Seed by seed, each study's arms in turn, so that an interrupted session leaves paired runs."""
    resolved = {s: load_settings(s, paths, settings) for s in studies}
    done = []
    for seed in seeds:
        for study in studies:
            for arm in ARMS[study]:
                done.append(run_one(study, arm, seed, resolved[study], paths, threads, log))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and scoring")
    p.add_argument("--runs", default="runs/ablate", help="working folders (checkpoints, logs)")
    p.add_argument("--results", default="docs/ablations", help="where each run's scores go")
    p.add_argument("--commit", action="store_true", help="git-commit each result as soon as it exists")
    p.add_argument("--summary", action="store_true", help="print the statistics of the results so far and exit")
    p.add_argument("--rescore", action="store_true",
                   help="score finished runs on metrics added after they ran (from their kept models) and exit")
    for f in dataclasses.fields(Settings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                       help=f"study setting (default {f.default}); fixed once a study has started")
    a = p.parse_args(argv)
    studies = list(STUDIES) if a.study == "all" else [a.study]
    paths = Paths(Path(a.runs), Path(a.results), a.commit)
    if a.summary:
        from .ablation_stats import summary_markdown
        print(summary_markdown(paths.results, studies))
        return 0
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    if a.rescore:
        for study in studies:
            rescore(study, paths, a.threads, log)
        return 0
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(Settings) if getattr(a, f.name) is not None}
    if any(s < 0 for s in a.seeds) or a.threads < 1:
        p.error("seeds must be >= 0 and threads >= 1")
    try:
        run_studies(studies, a.seeds, paths, Settings(**given) if given else None, a.threads, log=log)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
