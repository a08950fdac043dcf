"""The hostile-input battery of issue #32 against the web demo, with the server's memory before and after.

    python tests/web_battery.py              # starts app.py on a free port, runs every case, stops it
    python tests/web_battery.py --url URL --pid PID   # against a running app (PID: its process, for RSS)

Each case is one request a stranger could send (through gradio_client or raw HTTP, no page needed). A case
*holds* when the answer is a clear message that names the problem (the case's needle), it comes back
within the case's time budget, and the server is still up; otherwise it *breaks*. Prints one line per
case, the tally, and the server's resident memory (RSS) at start, after the cases, and after a pause.
This is a measurement, not a test: `tests/test_app.py` checks the same classes cheaply.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as a script: make `tests._app_server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._app_server import start_app


# ---- hostile images, made without holding their pixels in memory -------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header for width x height, then a truncated body (a 'bomb' by header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def one_colour_png(width: int, height: int) -> bytes:
    """A complete one-colour greyscale PNG, compressed row by row (8000x8000 is ~76 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * width
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def small_png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# ---- talking to the server ---------------------------------------------------------------------------
def raw_call(url: str, api: str, data: list, timeout: float = 300) -> tuple[str, str]:
    """POST /gradio_api/call/<api>, then read its event stream: ('complete' | 'error', payload text)."""
    # json.dumps writes NaN as a bare NaN and a lone surrogate as its escape, as a hand-written client
    # could; gradio_client (httpx) refuses to send either.
    body = json.dumps({"data": data})
    r = httpx.post(f"{url}gradio_api/call/{api}", content=body, timeout=timeout,
                   headers={"content-type": "application/json"})
    if r.status_code != 200:
        return "error", f"HTTP {r.status_code}: {r.text[:300]}"
    event_id = r.json()["event_id"]
    kind, payload = "error", ""
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{event_id}", timeout=timeout) as s:
        for line in s.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                payload = line.split(":", 1)[1].strip()
                if kind in ("complete", "error"):
                    break
    return kind, payload


def client_call(url: str, *args, api_name: str, **kw):
    from gradio_client import Client
    c = Client(url, verbose=False, analytics_enabled=False)
    return c.predict(*args, api_name=api_name, **kw)


def upload(url: str, name: str, data: bytes) -> dict:
    r = httpx.post(f"{url}gradio_api/upload", files={"files": (name, data, "image/png")}, timeout=120)
    r.raise_for_status()
    path = r.json()[0]
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Case:
    name: str
    run: Callable[[str], str]  # returns the message the user sees ("" for none)
    needle: str  # what a clear message must contain (case-insensitive), or the start of a good answer
    budget_s: float = 30.0
    ok: bool = False  # a valid request in an unusual form: holds when it is answered, not refused


def expect_error(fn) -> Callable[[str], str]:
    """Wrap a gradio_client call: the message of the AppError it raises, or a note that it succeeded."""
    def run(url):
        try:
            out = fn(url)
        except Exception as e:  # AppError, ValueError from the client, ...: all are the user's view
            return f"{type(e).__name__}: {e}"
        return f"(succeeded: {str(out)[:120]})"
    return run


def raw(api: str, data_fn) -> Callable[[str], str]:
    def run(url):
        kind, payload = raw_call(url, api, data_fn(url))
        return f"{kind}: {payload}"
    return run


T2I = "/text_to_image"
NAN = float("nan")
LONG = "a green triangle " * 80  # 1,360 characters, ~246 tokens on the shapes tokenizer


def cases() -> list[Case]:
    big = one_colour_png(8000, 8000)
    huge = one_colour_png(13000, 13000)  # 169 megapixels in ~170 KB
    bomb = png_header_only(30000, 30000)
    ok = small_png()
    settings = [30, 3.0, 1.5, 1, "exact"]
    t2i = ["a red circle", 64, 64, 2, 3.0, 1, 1, "exact"]

    def t2i_with(k, v):
        args = list(t2i)
        args[k] = v
        return args

    out = [
        # Long prompts: every endpoint that reads one.
        Case("refiner_report 1,360-char prompt", expect_error(
            lambda u: client_call(u, LONG, api_name="/refiner_report")), "token", 10),
        Case("word_attention 1,360-char prompt", expect_error(
            lambda u: client_call(u, LONG, 0, 2, 1, 1, api_name="/word_attention")), "token", 10),
        Case("text_to_image 1,360-char prompt", expect_error(
            lambda u: client_call(u, LONG, 64, 64, 2, 3.0, 1, 1, "exact", api_name=T2I)), "token", 10),
        Case("text_to_image 200k-char prompt", expect_error(
            lambda u: client_call(u, "a " * 100_000, 64, 64, 2, 3.0, 1, 1, "exact", api_name=T2I)),
             "characters", 10),
        Case("chat 1,360-char question", expect_error(
            lambda u: client_call(u, {"text": LONG, "files": []}, 8, api_name="/chat")), "token", 10),
        # Many or huge images.
        Case("chat: ten 8000x8000 PNGs in one message", raw("chat", lambda u: [
            {"text": "What is this?", "files": [upload(u, f"big{k}.png", big) for k in range(10)]}, 8]),
             "at most", 30),
        Case("chat: one 8000x8000 PNG", raw("chat", lambda u: [
            {"text": "What is this?", "files": [upload(u, "big.png", big)]}, 8]), "pixels", 10),
        Case("edit: 8000x8000 PNG upload", raw("edit", lambda u: [upload(u, "big.png", big), "make it red",
                                                                   *settings]), "pixels", 10),
        Case("edit: 13000x13000 PNG as data: URL", raw("edit", lambda u: [
            {"url": data_url(huge), "meta": {"_type": "gradio.FileData"}}, "make it red", *settings]),
             "pixels", 10),
        Case("edit: 30000x30000 bomb as data: URL", raw("edit", lambda u: [
            {"url": data_url(bomb), "meta": {"_type": "gradio.FileData"}}, "make it red", *settings]),
             "pixels", 10),
        Case("edit: corrupt data: URL", raw("edit", lambda u: [
            {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
             "meta": {"_type": "gradio.FileData"}}, "make it red", *settings]), "not a readable image", 10),
        Case("edit: data: URL that is not base64", raw("edit", lambda u: [
            {"url": "data:image/png;base64,@@@@", "meta": {"_type": "gradio.FileData"}}, "make it red",
            *settings]), "base64", 10),
        Case("edit: raw base64 text that is no image", raw("edit", lambda u: [
            base64.b64encode(b"hello world").decode(), "make it red", *settings]), "not a readable image", 10),
        Case("edit: a 64x64 PNG as raw base64 (valid)", raw("edit", lambda u: [
            base64.b64encode(ok).decode(), "make it red", 2, 3.0, 1.5, 1, "exact"]), "complete", 60, ok=True),
        # Bad values, each must name its field.
        Case("seed 'abc'", raw("text_to_image", lambda u: t2i_with(5, "abc")), "seed", 10),
        Case("seed NaN", raw("text_to_image", lambda u: t2i_with(5, NAN)), "seed", 10),
        Case("height NaN", raw("text_to_image", lambda u: t2i_with(1, NAN)), "height", 10),
        Case("steps NaN", raw("text_to_image", lambda u: t2i_with(3, NAN)), "steps", 10),
        Case("count NaN", raw("text_to_image", lambda u: t2i_with(6, NAN)), "images", 10),
        Case("max tokens NaN", raw("chat", lambda u: [{"text": "What color is it?", "files": []}, NAN]),
             "max new tokens", 10),
        Case("edit seed NaN", raw("edit", lambda u: [upload(u, "ok.png", ok), "make it red", 30, 3.0, 1.5,
                                                     NAN, "exact"]), "seed", 10),
        Case("prompt None", expect_error(lambda u: client_call(u, *t2i_with(0, None), api_name=T2I)),
             "prompt", 10),
        Case("prompt lone surrogate", raw("text_to_image", lambda u: t2i_with(0, "\ud800")), "prompt", 10),
        Case("refiner prompt None", expect_error(lambda u: client_call(u, None, api_name="/refiner_report")),
             "prompt", 10),
        Case("chat question lone surrogate", raw("chat", lambda u: [{"text": "\ud800", "files": []}, 8]),
             "question", 10),
        Case("edit instruction None", raw("edit", lambda u: [upload(u, "ok.png", ok), None, *settings]),
             "instruction", 10),
        # A question that needs an image, asked without one (#31).
        Case("chat: question without an image", expect_error(lambda u: client_call(
            u, {"text": "What color is the triangle?", "files": []}, 8, api_name="/chat")), "image", 30),
    ]
    return out


def clear_message(message: str, needle: str) -> bool:
    low = message.lower()
    vague = ("error: null" in low or "'error': none" in low or '"error": null' in low
             or "internal error" in low or "succeeded" in low or "upstream" in low)
    return needle.lower() in low and not vague


def run_battery(url: str, pid: int | None) -> int:
    results = []
    before = rss_mb(pid) if pid else float("nan")
    for case in cases():
        start = time.monotonic()
        try:
            message = case.run(url)
        except Exception as e:  # the harness itself failed (connection refused: the server died)
            message = f"(harness: {type(e).__name__}: {e})"
        took = time.monotonic() - start
        alive = _alive(url)
        answered = message.startswith(case.needle) if case.ok else clear_message(message, case.needle)
        held = answered and took <= case.budget_s and alive
        rss = rss_mb(pid) if pid else float("nan")
        results.append(held)
        print(f"{'HELD ' if held else 'BROKE'} {took:6.1f}s rss {rss:7.0f} MB  {case.name}: "
              f"{message[:220]!s}", flush=True)
    after = rss_mb(pid) if pid else float("nan")
    time.sleep(10)
    settled = rss_mb(pid) if pid else float("nan")
    print(f"\nweb battery: tried {len(results)}, held {sum(results)}, broke {len(results) - sum(results)}")
    print(f"server RSS: {before:.0f} MB before, {after:.0f} MB right after, {settled:.0f} MB 10 s later")
    return 0


def _alive(url: str) -> bool:
    try:
        return httpx.get(url, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url")
    p.add_argument("--pid", type=int)
    args = p.parse_args(argv)
    if args.url:
        return run_battery(args.url, args.pid)
    server = start_app()
    try:
        return run_battery(server.url, server.proc.pid)
    finally:
        server.stop()
        print(f"server log: {server.log}")


if __name__ == "__main__":
    sys.exit(main())
