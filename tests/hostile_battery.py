"""Issue 32's reliability battery (CLI, checkpoint loading, saving, trainer): every case classified the same
way for any version of the code. held = a clear error of the project's own kind (or the documented handling);
broke = a raw exception, a hang, a silent acceptance or lost data. Prints one line per case and a table of
tried / held / broke per category. Not a test (the tests hold the same cases as assertions); it exists so
the figures can be taken again, on this tree or an older one:

    PYTHONPATH=. OMP_NUM_THREADS=1 python tests/hostile_battery.py      # ~4 min on 2 CPU cores

(On an older tree, copy this file, tests/test_checkpoint.py and tests/test_trainer.py into its tests/ first:
the cases come from their tables.)
"""

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import test_checkpoint as tc
import torch
from conftest import perturb, random_image
from safetensors.torch import load_file, save_file

import ovis_u1.checkpoint as ck
import train.trainer as tr
from ovis_u1.__main__ import main as cli
from ovis_u1.checkpoint import CheckpointError
from ovis_u1.model import OvisU1
from ovis_u1.shapes import ShapesWorld, write_jsonl
from ovis_u1.tokenizer import build_tokenizer, default_corpus
from train.__main__ import main as train_main

warnings.simplefilter("ignore")
torch.set_num_threads(1)

R = defaultdict(list)
TMP = Path(tempfile.mkdtemp(prefix="battery_"))


class Hang(Exception):
    pass


def case(cat, name, fn, timeout=120):
    def alarm(*a):
        raise Hang()
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        res = fn()
    except Hang:
        res = "broke: hang"
    except BaseException as e:
        res = f"broke: raw {type(e).__name__}: {str(e)[:80]}"
    finally:
        signal.alarm(0)
    R[cat].append((name, res))
    print(f"{cat:12s} {name:28s} {res}"[:200], flush=True)


def gate(path):
    try:
        OvisU1.from_pretrained(path)
    except CheckpointError:
        return "held"
    return "broke: accepted"


tok = build_tokenizer(default_corpus(), vocab_size=512)
torch.manual_seed(0)
model = perturb(OvisU1.from_preset("tiny", tokenizer=tok)).eval()
OWN, PUB = TMP / "own", TMP / "pub"
model.save_pretrained(OWN)
model.save_pretrained(PUB, layout="published", max_shard_size=256 * 1024)
n = [0]


def copy(src):
    n[0] += 1
    dst = TMP / f"c{n[0]}"
    shutil.copytree(src, dst)
    return dst


# ---- checkpoint loading
for name, (layout, edit, _msg) in sorted(tc.BAD_CONFIGS.items()):
    def f(layout=layout, edit=edit):
        p = copy(OWN if layout == "own" else PUB)
        tc._edit_config(p, edit)
        return gate(p)
    case("ckpt-config", name, f)


def cfg_dir():
    p = copy(OWN)
    (p / "config.json").unlink()
    (p / "config.json").mkdir()
    return gate(p)


def cfg_fifo():
    p = copy(OWN)
    (p / "config.json").unlink()
    os.mkfifo(p / "config.json")  # nothing ever writes to it: a plain open() blocks forever
    return gate(p)


def cfg_utf8():
    p = copy(OWN)
    (p / "config.json").write_bytes(b'{"format": "ovis-u1-compact", "config": "\xff"}')
    return gate(p)


case("ckpt-files", "config.json is a folder", cfg_dir)
case("ckpt-files", "config.json is a FIFO", cfg_fifo, timeout=20)
case("ckpt-files", "config.json not UTF-8", cfg_utf8)


def stray(src):
    p = copy(src)
    save_file({"vte.weight": torch.zeros_like(model.vte.weight)}, str(p / "zz.safetensors"))
    try:
        m = OvisU1.from_pretrained(p)
    except CheckpointError:
        return "held (refused)"
    return "held" if m.vte.weight.abs().sum() > 0 else "broke: stray file overrode weights"


case("ckpt-files", "stray zz.safetensors (own)", lambda: stray(OWN))
case("ckpt-files", "stray zz.safetensors (pub)", lambda: stray(PUB))
for entry in ("../outside.safetensors", "/tmp/abs.safetensors", "sub/x.safetensors", "model.bin", 7):
    def f(entry=entry):
        p = copy(PUB)
        idx = json.loads((p / "model.safetensors.index.json").read_text())
        idx["weight_map"][sorted(idx["weight_map"])[0]] = entry
        (p / "model.safetensors.index.json").write_text(json.dumps(idx))
        return gate(p)
    case("ckpt-files", f"index entry {entry}", f)
for text in ("{not json", "[]", '{"metadata": {}}', '{"weight_map": []}'):
    def f(text=text):
        p = copy(PUB)
        (p / "model.safetensors.index.json").write_text(text)
        return gate(p)
    case("ckpt-files", f"index {text[:16]}", f)
for label, value in (("nan", torch.full((64,), float("nan"))), ("inf", torch.full((64,), float("inf"))),
                     ("int64", torch.zeros(64, dtype=torch.int64)), ("bool", torch.zeros(64, dtype=torch.bool)),
                     ("complex", torch.zeros(64, dtype=torch.complex64))):
    def f(value=value):
        p = copy(OWN)
        sd = load_file(str(p / "model.safetensors"))
        sd[next(k for k, v in sd.items() if v.shape == (64,))] = value
        save_file(sd, str(p / "model.safetensors"))
        return gate(p)
    case("ckpt-tensors", label, f)
for name, text in (("tokenizer.json", "{}"), ("tokenizer.json", "{corrupt"),
                   ("tokenizer.json", '{"model": {"type": "X"}}'),
                   ("tokenizer_config.json", '{"auto_map": {"AutoTokenizer": ["x.T", null]}}'),
                   ("tokenizer_config.json", "[1]")):
    def f(name=name, text=text):
        p = copy(OWN)
        (p / name).write_text(text)
        return gate(p)
    case("ckpt-tokenizer", f"{name} {text[:14]}", f)


# ---- saving
def keeps_readme(a, b):
    p = TMP / f"s{a}{b}"
    model.save_pretrained(p, layout=a, max_shard_size=256 * 1024)
    (p / "README.md").write_text("mine")
    model.save_pretrained(p, layout=b, max_shard_size=256 * 1024)
    return "held" if (p / "README.md").exists() else "broke: README.md deleted"


for a, b in (("own", "own"), ("own", "published"), ("published", "own")):
    case("saving", f"README kept {a}->{b}", lambda a=a, b=b: keeps_readme(a, b))


def crash_between():
    p = TMP / "crash"
    model.save_pretrained(p)
    real = os.replace
    calls = []

    def flaky(s, d):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("killed")
        real(s, d)
    ck.os.replace = flaky
    try:
        model.save_pretrained(p)
    except OSError:
        pass
    finally:
        ck.os.replace = real
    try:
        OvisU1.from_pretrained(p)
    except CheckpointError as e:
        return f"broke: {str(e)[:60]}"
    return "held"


case("saving", "crash between renames", crash_between)


def save_nan():
    m = perturb(OvisU1.from_preset("tiny", tokenizer=tok))
    with torch.no_grad():
        m.vte.weight[0, 0] = float("nan")
    try:
        m.save_pretrained(TMP / "nan")
    except CheckpointError:
        return "held"
    return "broke: wrote NaN weights"


case("saving", "NaN weights", save_nan)

# ---- CLI
TINY = ["--preset", "tiny", "--device", "cpu", "--quiet"]
BAD = b"a \xff cat".decode("utf-8", "surrogateescape")


def cli_case(argv, stdin=None):
    err = io.StringIO()
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli(argv)
    finally:
        sys.stdin = old
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
    return "held" if code == 2 and len(lines) == 1 else f"broke: exit {code}, {err.getvalue()[-80:]!r}"


img = TMP / "img.png"
random_image(32, 32).save(img)
locked = TMP / "locked.png"
shutil.copy(img, locked)
for name, argv, stdin in (
        ("--prompt not UTF-8", ["generate", *TINY, "--prompt", BAD], None),
        ("--question not UTF-8", ["answer", *TINY, "--question", BAD], None),
        ("--chat stdin not UTF-8", ["answer", *TINY, "--chat", "--max-new-tokens", "2"], b"hi\n\xff\xfe\n"),
        ("--device bogus", ["generate", "--preset", "tiny", "--device", "bogus", "--prompt", "x"], None),
        ("--device cuda:abc", ["generate", "--preset", "tiny", "--device", "cuda:abc", "--prompt", "x"], None),
        ("--image /proc/self/mem", ["edit", *TINY, "--image", "/proc/self/mem", "--instruction", "x"], None),
        ("--seed 2**70", ["generate", *TINY, "--prompt", "x", "--seed", str(2**70)], None)):
    case("cli", name, lambda argv=argv, stdin=stdin: cli_case(argv, stdin))


def permission():
    real = Path.read_bytes

    def denied(self):
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    Path.read_bytes = denied
    try:
        return cli_case(["answer", *TINY, "--image", str(locked), "--question", "x"])
    finally:
        Path.read_bytes = real


case("cli", "image permission denied", permission)


def seed_names_flag():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        cli(["generate", *TINY, "--prompt", "x", "--seed", str(2**70)])
    return "held" if "--seed" in err.getvalue() else "broke: message does not name --seed"


case("cli", "--seed message names flag", seed_names_flag)

# ---- trainer
def tmain(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = train_main(["--recipe", "smoke", "progress=false", "threads=1", *argv])
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
    return code, lines, err.getvalue()


def refused(*argv):
    code, lines, err = tmain(*argv)
    return "held" if code != 0 and len(lines) == 1 and "Traceback" not in err else f"broke: exit {code}"


k = [0]


def out():
    k[0] += 1
    return f"out_dir={TMP / f'run{k[0]}'}"


empty = TMP / "empty.jsonl"
empty.write_text("")
for o in ("ckpt_every=0", "log_every=0", "stages.stage0.steps=abc", "data.source=/no/such.jsonl", "data.source=/",
          f"data.source={empty}", f"seed={2**70}", "data.image_size=0", "threads=-1", "init=/no/such/ckpt",
          "only_stages=[stage9]", "lora.rank=0", "optim.grad_clip=.nan"):
    stage = [] if o.startswith(("only_stages", "stages.")) else ["only_stages=[stage0]", "stages.stage0.steps=1"]
    case("train-settings", o[:28], lambda o=o, stage=stage: refused(out(), *stage, o))
S0 = ["only_stages=[stage0]", "stages.stage0.steps=2", "log_every=1"]


def two_trainers():
    d = TMP / "two"
    d.mkdir()
    try:
        from train.trainer import lock_run
        h = lock_run(d)
    except ImportError:
        h = None  # no lock in this tree: a second trainer just runs
    code, lines, _ = tmain(f"out_dir={d}", *S0)
    if h:
        h.close()
    return "held" if code != 0 and lines and "another trainer" in lines[0] else "broke: both wrote one log"


def fresh_into_existing():
    d = TMP / "fresh"
    tmain(f"out_dir={d}", *S0)
    code, _, _ = tmain(f"out_dir={d}", *S0)
    recs = (d / "log.jsonl").read_text().splitlines()
    return "held" if code != 0 and len(recs) == 2 else f"broke: exit {code}, log has {len(recs)} lines of 2 runs"


def torn_log():
    d = TMP / "torn"
    tmain(f"out_dir={d}", *S0)
    with open(d / "log.jsonl", "a") as f:
        f.write('{"global_st')
    code, _, _ = tmain(f"out_dir={d}", *S0, "--resume")
    return "held" if code == 0 else f"broke: exit {code}"


def killed_before_ckpt():
    d = TMP / "early"
    d.mkdir()
    (d / "log.jsonl").write_text('{"global_step": 1, "stage": "stage0", "step": 1, "loss": 99.0}\n')
    tmain(f"out_dir={d}", *S0, "--resume")
    recs = [json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines()]
    return "held" if all(r["loss"] != 99.0 for r in recs) else "broke: killed run's lines kept"


def stale_temps():
    d = TMP / "stale"
    tmain(f"out_dir={d}", *S0)
    (d / "checkpoints" / ".step_0000009.abc").mkdir()
    tmain(f"out_dir={d}", *S0, "--resume")
    return "held" if not (d / "checkpoints" / ".step_0000009.abc").exists() else "broke: .step_* left forever"


for name, fn in (("two trainers one out_dir", two_trainers), ("fresh run into a run", fresh_into_existing),
                 ("torn last log line", torn_log), ("killed before 1st ckpt", killed_before_ckpt),
                 ("stale .step_* temp", stale_temps)):
    case("train-state", name, fn, timeout=300)


def nan_run():
    d = TMP / "nanrun"
    real = tr.lr_lambda
    tr.lr_lambda = lambda *a: float("nan")
    try:
        code, lines, _ = tmain(f"out_dir={d}", *S0)
    finally:
        tr.lr_lambda = real
    exported = d / "final" / "model.safetensors"
    if exported.exists() and any(not torch.isfinite(v).all() for v in load_file(exported).values()):
        return f"broke: exported NaN weights, exit {code}"
    return "held" if code != 0 and lines else f"broke: exit {code}"


case("train-nonfinite", "NaN weights after a step", nan_run, timeout=300)


def own_data(kind):
    w = ShapesWorld()
    folder = TMP / f"data_{kind}"
    path = write_jsonl([w.t2i(i) for i in range(3)] + [w.edit(i) for i in range(2)], folder)
    extra = b""
    if kind == "80x80":
        w.t2i(7).image.resize((80, 80)).save(folder / "odd.png")
        extra = json.dumps({"type": "edit", "source": "odd.png", "instruction": "k", "target": "odd.png"}).encode()
    elif kind == "utf8":
        extra = b'{"type": "t2i", "image": "00000.png", "caption": "\xff"}'
    elif kind == "nested":
        extra = b"[" * 100_000
    elif kind == "169MP":
        from tests.web_battery import png_header_only
        (folder / "bomb.png").write_bytes(png_header_only(13000, 13000))
        extra = json.dumps({"type": "t2i", "image": "bomb.png", "caption": "b"}).encode()
    with open(path, "ab") as f:
        f.write(extra + b"\n")
    code, _, err = tmain(out(), f"data.source={path}", "only_stages=[stage5]", "stages.stage5.steps=2",
                             "stages.stage5.batch_size=6")
    return "held" if code == 0 else f"broke: exit {code} {err.strip().splitlines()[-1][:80] if err.strip() else ''}"


for kind in ("80x80", "utf8", "nested", "169MP"):
    case("train-owndata", f"own data: {kind}", lambda kind=kind: own_data(kind), timeout=300)


def not_a_dir():
    f = TMP / "afile"
    f.write_text("x")
    return refused(f"out_dir={f / 'run'}", *S0)


def full_disk():
    d = TMP / "full"
    real = tr.save_file

    def full(t, p, *a, **kw):
        if "step_0000002" in str(p):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(t, p, *a, **kw)
    tr.save_file = full
    try:
        r = refused(f"out_dir={d}", *S0, "ckpt_every=1")
    finally:
        tr.save_file = real
    return r


case("train-disk", "out_dir not writable", not_a_dir, timeout=300)
case("train-disk", "disk full mid-run", full_disk, timeout=300)

print("\nSUMMARY (tried / held / broke)")
tot = [0, 0]
for cat, rows in R.items():
    held = sum(r.startswith("held") for _, r in rows)
    tot[0] += len(rows)
    tot[1] += held
    print(f"{cat:16s} {len(rows):3d} {held:3d} {len(rows) - held:3d}")
print(f"{'all':16s} {tot[0]:3d} {tot[1]:3d} {tot[0] - tot[1]:3d}")
