"""The benchmark core on the tiny preset: report keys, exact-vs-plain agreement, sane ratios (no timings)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ovis_u1.bench import main

KEYS = ("exact_t2i_ratio", "exact_edit_ratio", "fast_t2i_ratio", "fast_edit_ratio", "kv_cache_speedup")


def test_bench_tiny_json_line(capsys):
    threads = torch.get_num_threads()
    assert main(["--preset", "tiny", "--steps", "2", "--batch", "2", "--repeats", "1", "--answer-tokens", "4",
                 "--threads", "0"]) == 0
    assert torch.get_num_threads() == threads  # --threads 0 leaves the process's setting alone
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in KEYS:
        assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert r["exact_max_abs_diff"] < 1e-4
    s = r["settings"]
    assert s["preset"] == "tiny" and s["batch"] == 2
    assert s["steps_per_mode"] == {"plain": 2, "exact": 2, "fast": 1}
    for task in ("t2i", "edit"):
        plain, exact, fast = (r[task][m] for m in ("plain", "exact", "fast"))
        for m in (plain, exact, fast):
            assert m["images"] == 2 and m["per_image_s"] > 0 and m["peak_mem_mib"] > 0
        # Work, not time: exact runs the refiner once and batches; fast takes fewer steps.
        assert exact["refiner_forwards"] == 1 < plain["refiner_forwards"]
        assert exact["decoder_rows"] == plain["decoder_rows"] > fast["decoder_rows"]
        assert exact["decoder_forwards"] < plain["decoder_forwards"]
    assert r["answer"]["new_tokens"] == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_gpu_flag_without_cuda_exits_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--gpu"])
    assert e.value.code == 2
    assert "CUDA" in capsys.readouterr().err
