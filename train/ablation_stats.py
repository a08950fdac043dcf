"""Statistics of the ablation studies (train.ablate): means, intervals and tests over seeds and samples.

A run's score on a metric is the mean over the samples' kinds of each kind's mean (GenEval's convention,
and the plain mean wherever the kinds are balanced, as in every study here). Two sources of variation sit in
a study: the training seed, and which held-out samples were drawn. Every run is scored on the same samples,
so seeds and samples are crossed, and the intervals come from a crossed bootstrap: each replicate draws the
seeds with replacement and, independently, the samples with replacement within their kind; every run in the
replicate is scored on that one draw of samples. Percentile 95% intervals.

The arm difference is paired by seed (the two arms of a seed share the data order and, where both have it,
the initial weights), so each seed gives a difference; the test is on those differences:
- primary, a paired t-test over seeds (df = seeds - 1): the seed is the unit a claim about training is
  about, and with 3-5 seeds it is the test that can reach significance at all;
- beside it, the exact sign-flip (permutation) test over seeds, which assumes nothing about the
  differences' distribution but cannot go below 2 / 2^seeds (0.25 for 3 seeds, 0.0625 for 5).
Each seed's difference also gets its own interval over the samples (bootstrap of samples, seed fixed).

Numpy and scipy only (no torch), so the notebook loads it from the committed JSONs without training.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

LOWER_IS_BETTER = frozenset({"t2i_loss"})
METRIC_NAMES = {"geneval": "mini-GenEval", "t2i_loss": "held-out denoising loss",
                "prompt_gain": "prompt gain (loss without - with prompt)", "vqa": "VQA accuracy",
                "followup": "follow-up VQA accuracy"}
N_BOOT = 4000
FLOOR = 0.1  # a hit rate below this in both arms is near the floor: the comparison says little


def digits(metric: str) -> int:
    """Decimals to print: losses differ in the fourth."""
    return 4 if metric in ("t2i_loss", "prompt_gain") else 3


def _weights(kinds: list[str]) -> np.ndarray:
    """Per-sample weights that make a weighted sum the mean over kinds of each kind's mean."""
    kinds_arr = np.asarray(kinds)
    uniq, inverse, counts = np.unique(kinds_arr, return_inverse=True, return_counts=True)
    return 1.0 / (len(uniq) * counts[inverse])


def run_score(metric: dict) -> float:
    """One run's score on one metric ({"kind": [...], "value": [...]})."""
    if len(metric["kind"]) != len(metric["value"]) or not metric["value"]:
        raise ValueError(f"a metric needs as many kinds as values (> 0), got {len(metric['kind'])} and "
                         f"{len(metric['value'])}")
    return float(np.dot(_weights(metric["kind"]), np.asarray(metric["value"], dtype=float)))


def resample_within_kinds(kinds: list[str], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, N] sample indices; replicate b keeps each kind's count and draws its samples with
    replacement from that kind's own, so every replicate has the design of the evaluation."""
    kinds_arr = np.asarray(kinds)
    idx = np.empty((n_boot, len(kinds_arr)), dtype=np.int64)
    for kind in np.unique(kinds_arr):
        pos = np.flatnonzero(kinds_arr == kind)
        idx[:, pos] = rng.choice(pos, size=(n_boot, len(pos)), replace=True)
    return idx


def replicate_scores(values: np.ndarray, kinds: list[str], idx: np.ndarray) -> np.ndarray:
    """values [S, N] (one row per seed) scored on each replicate's samples: [n_boot, S]."""
    w = _weights(kinds)  # resampling within kinds keeps each position's kind, so its weight too
    return np.einsum("sbn,n->bs", values[:, idx], w)


def _interval(x: np.ndarray) -> list[float]:
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def arm_summary(values: np.ndarray, kinds: list[str], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Mean over seeds with its crossed-bootstrap 95% interval, and each seed's score."""
    rng = np.random.default_rng(seed)
    scores = replicate_scores(values, kinds, resample_within_kinds(kinds, n_boot, rng))  # [B, S]
    pick = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    boot = np.take_along_axis(scores, pick, axis=1).mean(axis=1)
    per_seed = values @ _weights(kinds)
    return {"mean": float(per_seed.mean()), "ci95": _interval(boot), "per_seed": per_seed.tolist()}


def sign_flip_p(diffs: np.ndarray) -> float:
    """Exact two-sided sign-flip test of mean(diffs) = 0 over all 2^n sign patterns."""
    d = np.asarray(diffs, dtype=float)
    observed = abs(d.mean())
    means = [abs((np.asarray(signs) * d).mean()) for signs in itertools.product((1, -1), repeat=len(d))]
    return float(np.mean(np.asarray(means) >= observed - 1e-12))


def paired_t_p(diffs: np.ndarray) -> float:
    """Two-sided one-sample t-test of mean(diffs) = 0 (nan below 2 seeds; 0 or 1 when all are equal)."""
    from scipy import stats
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float("nan")
    if np.allclose(d, d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def paired_summary(a: np.ndarray, b: np.ndarray, kinds: list[str], n_boot: int = N_BOOT, seed: int = 1) -> dict:
    """a, b [S, N]: row s of each is seed s of its arm. The mean difference a - b with its crossed interval,
    each seed's difference with its interval over samples, and the two tests."""
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same seeds and samples, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    d_scores = replicate_scores(a - b, kinds, resample_within_kinds(kinds, n_boot, rng))  # [B, S]
    pick = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    boot = np.take_along_axis(d_scores, pick, axis=1).mean(axis=1)
    diffs = (a - b) @ _weights(kinds)
    return {"mean": float(diffs.mean()), "ci95": _interval(boot),
            "per_seed": [{"diff": float(diffs[s]), "ci95": _interval(d_scores[:, s])} for s in range(len(diffs))],
            "t_test_p": paired_t_p(diffs), "sign_flip_p": sign_flip_p(diffs), "n_seeds": len(diffs)}


# ---- the results on disk -----------------------------------------------------------------------------------
def load_study(results: str | Path, study: str) -> list[dict]:
    """Every finished run of a study (docs/ablations/<study>/<arm>_seed<k>.json), sorted by arm and seed."""
    folder = Path(results) / study
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*_seed*.json"))]
    return sorted(records, key=lambda r: (r["arms"].index(r["arm"]), r["seed"]))


def _matrix(records: list[dict], metric: str) -> tuple[np.ndarray, list[str]]:
    kinds = records[0]["samples"][metric]["kind"]
    for r in records:
        if r["samples"][metric]["kind"] != kinds:
            raise ValueError(f"{r['study']}/{r['arm']} seed {r['seed']} was scored on other {metric} samples "
                             "than the rest of the study; a study compares runs on the same samples")
    return np.asarray([r["samples"][metric]["value"] for r in records], dtype=float), kinds


def study_summary(results: str | Path, study: str, n_boot: int = N_BOOT) -> dict:
    """{"arms", "seeds": {arm: [...]}, "metrics": {metric: {"arms": {arm: arm_summary, plus "by_kind"},
    "paired": paired_summary over the seeds both arms have (None below 1)}}}."""
    records = load_study(results, study)
    if not records:
        return {"arms": [], "seeds": {}, "metrics": {}}
    arms = records[0]["arms"]
    seeds = {arm: [r["seed"] for r in records if r["arm"] == arm] for arm in arms}
    out: dict = {"arms": arms, "seeds": seeds, "metrics": {}}
    for metric in records[0]["samples"]:
        entry: dict = {"arms": {}, "paired": None}
        for arm in arms:
            rows = [r for r in records if r["arm"] == arm]
            if not rows:
                continue
            values, kinds = _matrix(rows, metric)
            summary = arm_summary(values, kinds, n_boot)
            summary["by_kind"] = {}
            for kind in dict.fromkeys(kinds):
                pos = [i for i, k in enumerate(kinds) if k == kind]
                summary["by_kind"][kind] = arm_summary(values[:, pos], [kind] * len(pos), n_boot)
            entry["arms"][arm] = summary
        common = sorted(set(seeds[arms[0]]) & set(seeds[arms[1]])) if len(arms) == 2 else []
        if common:
            pair = [[r for r in records if r["arm"] == arm and r["seed"] in common] for arm in arms]
            a, kinds = _matrix(pair[0], metric)
            b, _ = _matrix(pair[1], metric)
            entry["paired"] = {**paired_summary(a, b, kinds, n_boot), "seeds": common}
        out["metrics"][metric] = entry
    return out


def summary_markdown(results: str | Path, studies: list[str]) -> str:
    """The answer so far, as markdown tables: per arm and metric the mean [95% CI] and every seed's score,
    then the paired difference with its interval and both tests."""
    lines = []
    for study in studies:
        s = study_summary(results, study)
        if not s["arms"]:
            lines += [f"### {study}", "", "no finished runs yet", ""]
            continue
        a, b = s["arms"]
        lines += [f"### {study}: {a} vs {b} (seeds {s['seeds']})", "",
                  f"| metric | {a} | {b} | {a} - {b} [95% CI] | per-seed differences | t-test p | sign-flip p |",
                  "|---|---|---|---|---|---|---|"]
        for metric, e in s["metrics"].items():
            k, cells = digits(metric), []
            for arm in (a, b):
                x = e["arms"].get(arm)
                cells.append("-" if x is None else f"{x['mean']:.{k}f} [{x['ci95'][0]:.{k}f}, {x['ci95'][1]:.{k}f}] "
                             f"(seeds: {', '.join(f'{v:.{k}f}' for v in x['per_seed'])})")
            p = e["paired"]
            if p is None:
                cells += ["-", "-", "-", "-"]
            else:
                cells += [f"{p['mean']:+.{k}f} [{p['ci95'][0]:+.{k}f}, {p['ci95'][1]:+.{k}f}]",
                          ", ".join(f"{d['diff']:+.{k}f}" for d in p["per_seed"]),
                          f"{p['t_test_p']:.3f}", f"{p['sign_flip_p']:.3f}"]
            lines.append(f"| {METRIC_NAMES.get(metric, metric)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
