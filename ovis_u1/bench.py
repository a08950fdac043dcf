"""Benchmark the three sampling modes and the KV cache: `python -m ovis_u1.bench [--quick | --gpu]`.

For text-to-image and editing it times one call of each mode on the same batch of prompts and seeds:
"plain" (the published loop: every branch, every sample, every step its own forward, refiner included),
"exact" (refiner once, branches and samples batched) and "fast" (exact + first-block cache + guidance
interval + fewer steps), interleaved per repeat so drifting machine load hits every mode alike, and
reports medians and ratios to plain. Understanding is timed with and without the KV cache at a fixed
answer length. The last line printed is one JSON object with every figure.

On CPU it runs on one thread and times in that thread's CPU seconds, which a shared machine does not
stretch (wall seconds are reported beside). Defaults (small preset, 256x256, 20 steps, 2 prompts per call,
2 repeats) take about 6 CPU-minutes on this 2-core class of machine; `--quick` about 45 CPU-seconds
(too few steps to show the fast-mode settings); `--gpu` the full model on CUDA.

Weights are random. The decoder's adaLN/output layers and the refiner's gates start at zero (an untrained
decoder predicts v = 0), so every all-zero tensor gets small noise first; otherwise exact-vs-plain would
compare zeros and the first-block cache would skip every step. How often the cache hits depends on the
weights, so the fast-mode figure on random weights is not the figure on a trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import generation
from .model import OvisU1

MODES = ("plain", "exact", "fast")
PROMPTS = ("a red cube on a wooden table", "two blue spheres beside a green cone",
           "a yellow star above a purple square", "an orange cylinder in the snow",
           "a white triangle on a black background", "three small pink circles in a row")
INSTRUCTIONS = ("make the background blue", "add a red ball on the left", "turn the square into a circle",
                "make it look like winter", "remove the green cone", "make everything larger")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchSettings:
    preset: str = "small"
    steps: int | None = None  # exact/plain steps; None = the preset's default (fast mode: its fast default)
    size: int | None = None  # T2I side and edit input side; None = the preset's default height
    batch: int = 2  # prompts per call (one image each), the same for every mode
    repeats: int = 2  # measured runs per mode, interleaved; medians are reported
    warmup: int = 1  # unmeasured runs per mode first (2 steps each)
    answer_tokens: int = 96  # generated tokens per understanding run (EOS held back until then)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch CPU threads; None = leave torch's setting
    perturb_std: float = 0.02
    seed: int = 0


# ---- measurement ---------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory during a `with` block: CUDA max_memory_allocated, or on CPU the process's peak RSS.

    CPU: a thread samples the resident set size every 2 ms (tracemalloc does not see torch's allocator);
    `extra` is the peak minus the RSS on entry, i.e. the memory the measured run added on top of the
    loaded model. Freed heap is returned to the OS (malloc_trim) on entry so earlier runs do not hide it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        import psutil
        proc = psutil.Process()
        self.start = self.peak = proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        import psutil
        self.peak = max(self.peak, psutil.Process().memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Counter:
    """Counts decoder forwards, decoder rows, refiner forwards and first-block-cache hits via hooks."""

    def __init__(self, model: OvisU1):
        self.calls = self.rows = self.full = self.refiner = 0
        dec = model.decoder
        # A cache hit returns right after the first double block: the module after it never runs.
        after_first = dec.double_blocks[1] if len(dec.double_blocks) > 1 else (
            dec.single_blocks[0] if len(dec.single_blocks) else None)
        self._handles = [dec.register_forward_hook(self._on_decoder),
                         model.refiner.register_forward_hook(self._on_refiner)]
        if after_first is not None:
            self._handles.append(after_first.register_forward_hook(self._on_full))
        self._can_see_hits = after_first is not None

    def _on_decoder(self, module, args, out):
        self.calls += 1
        self.rows += args[0].shape[0]

    def _on_full(self, *_):
        self.full += 1

    def _on_refiner(self, *_):
        self.refiner += 1

    def reset(self) -> None:
        self.calls = self.rows = self.full = self.refiner = 0

    def snapshot(self) -> dict:
        hits = self.calls - self.full if self._can_see_hits else None
        return {"decoder_forwards": self.calls, "decoder_rows": self.rows, "refiner_forwards": self.refiner,
                "cache_hits": hits}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ---- model and inputs ----------------------------------------------------------------------------------
def perturb_zero_init(model: OvisU1, std: float, seed: int = 0) -> int:
    """Give every all-zero tensor of the refiner and decoder N(0, std^2) values; returns how many tensors."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for module in (model.refiner, model.decoder):
            for p in module.parameters():
                if p.is_floating_point() and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                    n += 1
    return n


def build_model(s: BenchSettings) -> OvisU1:
    torch.manual_seed(s.seed)
    model = OvisU1.from_preset(s.preset, device=s.device, dtype=DTYPES[s.dtype]).eval()
    perturb_zero_init(model, s.perturb_std, s.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with a few blocks: something an editor could plausibly be asked to change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    a = np.stack([200 * x + 30, 180 * y + 40, 120 + 80 * np.sin(6 * x * y)], axis=-1)
    for _ in range(4):
        r0, c0 = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
        a[r0:r0 + height // 5, c0:c0 + width // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def mode_steps(model: OvisU1, steps: int | None) -> dict[str, int]:
    """Steps per mode: fast mode keeps the preset's fast/exact step ratio when --steps overrides."""
    g = model.config.generation
    base = g.num_inference_steps if steps is None else steps
    fast = g.fast_num_inference_steps if steps is None else max(
        1, round(steps * g.fast_num_inference_steps / g.num_inference_steps))
    return {"plain": base, "exact": base, "fast": fast}


# ---- one generation call, staged as text_to_image / edit run it ----------------------------------------
def _t2i_request(model, prompts, size):
    g = model.config.generation
    return generation.t2i_request(model, list(prompts), size, size, g.guidance_scale, 42, 1)


def _edit_request(model, prompts, image):
    g = model.config.generation
    return generation.edit_request(model, image, list(prompts), g.edit_guidance_scale, g.image_guidance_scale,
                                  42, 1)


def timed_call(model, make_request: Callable, mode: str, steps: int, counter: Counter,
               clock: Callable[[], float] = time.perf_counter) -> dict:
    """request (LLM/ViT/VAE-encode) -> sample -> VAE decode, each stage timed; memory over the whole call."""
    dev = model.device
    counter.reset()
    with PeakMemory(dev) as mem:
        wall = time.perf_counter()
        t0 = clock()
        req = make_request()
        _sync(dev)
        t1 = clock()
        tokens = generation.sample(model, req, steps, mode=mode, progress=False)
        _sync(dev)
        t2 = clock()
        generation.decode_latents(model, tokens, req.latent_hw)
        _sync(dev)
        t3 = clock()
        wall = time.perf_counter() - wall
    n = tokens.shape[0]
    return {"seconds": t3 - t0, "encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2,
            "per_image_s": (t3 - t0) / n, "per_step_s": (t2 - t1) / steps, "wall_seconds": wall,
            "steps": steps, "images": n, "peak_mem": mem.peak, "extra_mem": mem.extra,
            "latents": tokens.float().cpu(), **counter.snapshot()}


def bench_task(model, task: str, s: BenchSettings, size: int, counter: Counter, log,
               clock: Callable[[], float] = time.perf_counter) -> dict:
    prompts = (PROMPTS if task == "t2i" else INSTRUCTIONS)
    prompts = [prompts[i % len(prompts)] for i in range(s.batch)]
    if task == "t2i":
        def make(ps=prompts):
            return _t2i_request(model, ps, size)
    else:
        image = test_image(size, size, s.seed)

        def make(ps=prompts):
            return _edit_request(model, ps, image)
    steps = mode_steps(model, s.steps)
    for _ in range(s.warmup):
        for mode in MODES:
            timed_call(model, make, mode, min(2, steps[mode]), counter, clock)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(s.repeats):
        for mode in MODES:  # interleaved, so slow phases of a shared machine hit every mode alike
            run = timed_call(model, make, mode, steps[mode], counter, clock)
            runs[mode].append(run)
            log(f"  {task} repeat {r + 1}/{s.repeats} {mode:5s}: {run['seconds']:.2f} s "
                f"({run['wall_seconds']:.2f} s wall)")
    out: dict = {}
    for mode in MODES:
        rs = runs[mode]
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("seconds", "encode_s", "denoise_s", "decode_s", "per_image_s", "per_step_s",
                         "wall_seconds")}
        last = rs[-1]
        out[mode] = {**{k: round(v, 4) for k, v in med.items()},
                     "steps": last["steps"], "images": last["images"],
                     "peak_mem_mib": round(max(r["peak_mem"] for r in rs) / 2**20, 1),
                     "extra_mem_mib": round(max(r["extra_mem"] for r in rs) / 2**20, 1),
                     "decoder_forwards": last["decoder_forwards"], "decoder_rows": last["decoder_rows"],
                     "refiner_forwards": last["refiner_forwards"], "cache_hits": last["cache_hits"],
                     "all_seconds": [round(r["seconds"], 3) for r in rs],
                     "all_wall_seconds": [round(r["wall_seconds"], 3) for r in rs]}
    plain, exact, fast = (runs[m][-1]["latents"] for m in MODES)
    out["exact_max_abs_diff"] = float((exact - plain).abs().max())
    out["fast_max_abs_diff"] = float((fast - plain).abs().max())
    out["latent_abs_mean"] = float(plain.abs().mean())
    return out


# ---- understanding ---------------------------------------------------------------------------------------
def bench_answer(model, s: BenchSettings, log, clock: Callable[[], float] = time.perf_counter) -> dict:
    g = model.config.generation
    side = math.isqrt(model.config.adapter.min_pixels)  # the smallest image the ViT takes unresized
    image = test_image(side, side)
    question = "Describe the objects in this image, their colours and where they are."
    n = s.answer_tokens
    calls = [0]
    handle = model.llm.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    dev = model.device
    out = {}
    try:
        for use_cache in (True, False):
            model.answer(question, images=[image], max_new_tokens=2, min_new_tokens=2, use_cache=use_cache)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(s.repeats):
            for use_cache in (True, False):
                calls[0] = 0
                _sync(dev)
                t0 = clock()
                model.answer(question, images=[image], max_new_tokens=n, min_new_tokens=n,
                             use_cache=use_cache)
                _sync(dev)
                times[use_cache].append(clock() - t0)
                if calls[0] != n:
                    raise RuntimeError(f"expected {n} LLM forwards (one per new token), counted {calls[0]}")
        for use_cache, key in ((True, "with_cache"), (False, "without_cache")):
            sec = statistics.median(times[use_cache])
            out[key] = {"seconds": round(sec, 4), "tokens_per_s": round(n / sec, 2),
                        "all_seconds": [round(t, 3) for t in times[use_cache]]}
            log(f"  answer use_cache={use_cache}: {n / sec:.1f} tokens/s")
    finally:
        handle.remove()
    out["new_tokens"] = n
    out["multimodal_max_length"] = g.multimodal_max_length
    return out


# ---- the whole benchmark ---------------------------------------------------------------------------------
TIMING = {"cpu": "CPU seconds of the one thread torch computes on (time.thread_time): unlike wall time, "
                  "not stretched when other processes share the cores; wall seconds are reported beside",
          "wall": "wall-clock seconds (CUDA synchronised around each stage)"}


def timing_basis(device: torch.device) -> str:
    """Single-threaded CPU runs are timed in thread CPU time (robust on a shared machine), others in wall."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def run_bench(s: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Run every measurement and return the summary dict (what the JSON line holds)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    model = build_model(s)
    g = model.config.generation
    size = g.height if s.size is None else s.size
    # Editing output follows the input size, capped by edit_max_pixels: lift the cap to the asked size.
    g.edit_max_pixels = max(g.edit_max_pixels, size * size)
    counter = Counter(model)
    basis = timing_basis(model.device)
    clock = time.thread_time if basis == "cpu" else time.perf_counter
    log(f"preset {s.preset}, {size}x{size}, batch {s.batch}, steps {mode_steps(model, s.steps)}, "
        f"{s.repeats} repeats, device {s.device}, dtype {s.dtype}, threads {torch.get_num_threads()}, "
        f"timing {basis}")
    try:
        t2i = bench_task(model, "t2i", s, size, counter, log, clock)
        edit = bench_task(model, "edit", s, size, counter, log, clock)
    finally:
        counter.remove()
    ans = bench_answer(model, s, log, clock)

    def ratio(task, mode):
        return round(task[mode]["per_image_s"] / task["plain"]["per_image_s"], 4)

    summary = {
        "exact_t2i_ratio": ratio(t2i, "exact"),
        "exact_edit_ratio": ratio(edit, "exact"),
        "exact_max_abs_diff": max(t2i["exact_max_abs_diff"], edit["exact_max_abs_diff"]),
        "fast_t2i_ratio": ratio(t2i, "fast"),
        "fast_edit_ratio": ratio(edit, "fast"),
        "kv_cache_speedup": round(ans["with_cache"]["tokens_per_s"]
                                  / ans["without_cache"]["tokens_per_s"], 3),
        "settings": {**dataclasses.asdict(s), "size": size, "steps_per_mode": mode_steps(model, s.steps),
                     "threads": torch.get_num_threads(), "timing": basis,
                     "fast_cache_threshold": g.fast_cache_threshold,
                     "fast_guidance_interval": list(g.fast_guidance_interval),
                     "parameters": model.num_parameters_by_component()["total"]},
        "t2i": t2i,
        "edit": edit,
        "answer": ans,
        "memory": ("peak VRAM (torch.cuda.max_memory_allocated) per call" if model.device.type == "cuda" else
                   "peak process RSS sampled every 2 ms during the call; extra = peak - RSS at call start"),
        "timing": TIMING[basis],
        "notes": "seconds = one whole call (conditions, sampling, VAE decode) for `batch` prompts, median of "
                 "repeats; ratios are per-image seconds over plain's; random weights with zero-init layers "
                 "perturbed, so fast-mode cache hits are not a trained model's",
    }
    return summary


def print_report(r: dict) -> None:
    s = r["settings"]
    mem = "VRAM" if s["device"].startswith("cuda") else "RSS"
    print(f"\npreset {s['preset']} ({s['parameters'] / 1e6:.0f}M parameters), {s['size']}x{s['size']}, "
          f"{s['batch']} prompts per call (one image each), steps {s['steps_per_mode']}, "
          f"median of {s['repeats']}, {s['device']} {s['dtype']}, {s['threads']} threads")
    print(f"timing: {r['timing']}")
    print(f"memory: {r['memory']}")
    for task in ("t2i", "edit"):
        t = r[task]
        print(f"\n{task:4s}  mode   s/image  s/step  ratio  encode  denoise  decode  wall s  peak {mem} MiB "
              "(+extra)  decoder fwd/rows  refiner  cache hits")
        for mode in MODES:
            m = t[mode]
            ratio = m["per_image_s"] / t["plain"]["per_image_s"]
            print(f"      {mode:5s} {m['per_image_s']:8.3f} {m['per_step_s']:7.3f} {ratio:6.3f} "
                  f"{m['encode_s']:7.2f} {m['denoise_s']:8.2f} {m['decode_s']:7.2f} "
                  f"{m['wall_seconds']:7.2f}  "
                  f"{m['peak_mem_mib']:9.0f} (+{m['extra_mem_mib']:.0f})           "
                  f"{m['decoder_forwards']:4d}/{m['decoder_rows']:<5d}  {m['refiner_forwards']:7d}  "
                  f"{m['cache_hits']}")
        print(f"      exact vs plain max |diff| of final latents: {t['exact_max_abs_diff']:.2e} "
              f"(fast: {t['fast_max_abs_diff']:.2e}; mean |latent| {t['latent_abs_mean']:.2f})")
    a = r["answer"]
    print(f"\nanswer ({a['new_tokens']} new tokens, EOS held back): "
          f"{a['with_cache']['tokens_per_s']:.1f} tokens/s with KV cache, "
          f"{a['without_cache']['tokens_per_s']:.1f} without -> {r['kv_cache_speedup']:.2f}x")
    print(f"note: {r['notes']}")


def parse_args(argv: list[str] | None) -> tuple[BenchSettings, bool]:
    p = argparse.ArgumentParser(prog="python -m ovis_u1.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default small; ovis-u1-3b with --gpu)")
    p.add_argument("--steps", type=int, default=None, help="plain/exact steps (fast keeps its ratio)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels")
    p.add_argument("--batch", type=int, default=None, help="prompts per call (default 2)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--answer-tokens", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="small size, few steps: under a minute on 2 cores")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: on a shared machine oversubscribed threads "
                        "swing timings 10x; 0 = torch's default)")
    p.add_argument("--gpu", action="store_true",
                   help="full ovis-u1-3b preset, 1024x1024, 50 steps, bfloat16 on CUDA, peak VRAM per mode")
    a = p.parse_args(argv)
    if a.gpu and not torch.cuda.is_available():
        p.exit(2, "error: --gpu needs a CUDA GPU, and torch.cuda.is_available() is False here; "
                  "run without --gpu for the CPU benchmark\n")
    s = BenchSettings()
    if a.gpu:
        s = dataclasses.replace(s, preset="ovis-u1-3b", size=1024, steps=50, batch=2, repeats=2,
                                answer_tokens=256, device="cuda", dtype="bfloat16")
    elif a.quick:
        s = dataclasses.replace(s, size=128, steps=4, repeats=2, answer_tokens=16)
    on_cuda = (a.device or s.device).startswith("cuda")
    threads = a.threads if a.threads is not None else (None if on_cuda else 1)
    s = dataclasses.replace(s, threads=threads or None, **{k: v for k, v in {
        "preset": a.preset, "steps": a.steps, "size": a.size, "batch": a.batch, "repeats": a.repeats,
        "answer_tokens": a.answer_tokens, "device": a.device, "dtype": a.dtype}.items() if v is not None})
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, f"error: --device {s.device} but torch.cuda.is_available() is False\n")
    return s, a.gpu


def main(argv: list[str] | None = None) -> int:
    s, _ = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    r = run_bench(s, log=log)
    print_report(r)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
