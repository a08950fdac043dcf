"""Drive the web demo in headless Chromium: one user flow per tab, and the screenshots of docs/.

    python tests/take_screenshots.py              # starts app.py, writes docs/screenshots/{tab}.png
    python tests/take_screenshots.py --url URL    # against a running app

`tests/test_browser.py` runs the same flows (without the refiner one) and saves its screenshots under
its tmp dir. Needs Debian's chromium (`apt-get install -y chromium`) and Python playwright.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

if __package__ in (None, ""):  # run as a script: make `tests._app_server` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._app_server import CHROMIUM, CHROMIUM_ARGS, REPO, start_app

TIMEOUT_MS = 120_000  # the model shares two CPU cores with everything else
STEPS = 4
VIEWPORT = {"width": 1280, "height": 900}


def open_app(browser, url: str, tab: str):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_role("tab", name=tab).click()
    return page


def set_number(page, elem_id: str, value) -> None:
    """Type into a slider's number box (committed on Enter)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def wait_for_image(page, selector: str) -> None:
    """Until an image under `selector` has loaded and no event is still running (outputs are dimmed then)."""
    page.wait_for_function(
        "s => [...document.querySelectorAll(s)].some(i => i.complete && i.naturalWidth > 0)", arg=selector,
        timeout=TIMEOUT_MS)
    wait_until_idle(page)


def wait_until_idle(page) -> None:
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
        ".every(t => t.classList.contains('hide') || t.innerText.trim() === '')", timeout=TIMEOUT_MS)
    page.wait_for_timeout(300)  # the dimming fades out


def set_seed(page, elem_id: str, seed: int | None) -> None:
    if seed is not None:
        page.locator(f"#{elem_id} input").fill(str(seed))


def create_flow(page, prompt: str, steps: int = STEPS, seed: int | None = None) -> None:
    page.locator("#create-prompt textarea").fill(prompt)
    set_number(page, "create-steps", steps)
    set_seed(page, "create-seed", seed)
    page.locator("#create-run").click()
    wait_for_image(page, "#create-gallery img")


def edit_flow(page, image: Path, instruction: str, more: str | None = None, steps: int = STEPS,
              seed: int | None = None) -> None:
    shown = page.locator("#edit-source button[aria-label='Remove Image']")  # the example shown at start
    if shown.count():
        shown.first.click()
    page.locator("#edit-source input[type=file]").set_input_files(str(image))
    wait_for_image(page, "#edit-source img")
    page.locator("#edit-instruction textarea").fill(instruction)
    page.locator("#edit-settings").get_by_text("Settings").first.click()
    set_number(page, "edit-steps", steps)
    set_seed(page, "edit-seed", seed)
    page.locator("#edit-run").click()
    wait_for_image(page, "#edit-result img")
    if more:
        page.locator("#edit-instruction textarea").fill(more)
        page.locator("#edit-more").click()
        page.wait_for_function("() => document.querySelectorAll('#edit-history img').length >= 3",
                               timeout=TIMEOUT_MS)


def chat_flow(page, images: list[Path], question: str) -> str:
    """Ask one question about the images; returns the assistant's shown reply once it is complete."""
    page.locator("#chat-input input[type=file]").set_input_files([str(p) for p in images])
    page.wait_for_function(f"() => document.querySelectorAll('#chat-input img').length >= {len(images)}",
                           timeout=TIMEOUT_MS)
    box = page.locator("#chat-input textarea")
    box.fill(question)
    box.press("Enter")
    page.locator("#chat [data-testid=user]").filter(has_text=question).wait_for()
    # The reply is complete when the event ends: its status tracker hides again and the bubble has text.
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chat [data-testid=bot]');"
        " const t = document.querySelector('#chat-status [data-testid=status-tracker]');"
        " return b.length && b[b.length - 1].innerText.trim() && (!t || t.classList.contains('hide')); }",
        timeout=TIMEOUT_MS)
    return page.locator("#chat [data-testid=bot]").last.inner_text().strip()


def refiner_flow(page, prompt: str, steps: int = STEPS, seed: int | None = None) -> None:
    page.locator("#refiner-prompt textarea").fill(prompt)
    page.locator("#refiner-run").click()
    wait_for_image(page, "#refiner-attention img")
    set_number(page, "refiner-steps", steps)
    set_seed(page, "refiner-seed", seed)
    page.locator("#refiner-word-run").click()
    wait_for_image(page, "#refiner-word img")


def capability_flow(page) -> str:
    """The capability note at the top of the page: its text, once shown."""
    note = page.locator("#capabilities")
    note.get_by_text("What this model can do").first.wait_for()
    return note.inner_text()


def bad_upload_flow(page, broken: Path) -> str:
    """A message with an unreadable attachment (after an answered turn): returns the error toast's text.

    The refused message must leave the chat as it was and keep the question and attachment in the box.
    """
    page.locator("#chat-input input[type=file]").set_input_files(str(broken))
    box = page.locator("#chat-input textarea")
    box.fill(BAD_QUESTION)
    box.press("Enter")
    toast = page.get_by_test_id("toast-text").filter(has_text=f"'{broken.name}' is not a readable image")
    toast.wait_for()
    page.wait_for_timeout(1000)  # let the toast finish sliding in before the screenshot
    return toast.inner_text()


def save_screenshot(page, path: Path, max_bytes: int = 300_000, full_page: bool = True) -> Path:
    """A full-page (or the visible part's) PNG, palette-quantised (flat UI colours survive it) so it stays
    under max_bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(page.screenshot(full_page=full_page))).convert("RGB")
    for colors in (256, 128, 64):
        buf = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes:
            break
    path.write_bytes(buf.getvalue())
    return path


# Samples the shipped default model gets right at these seeds (app.EXAMPLE_PICKS), for the pictures.
EDIT_INSTRUCTION = "turn the triangle into a circle"  # ShapesWorld(split="heldout").edit(4, "replace")
QUESTION = "What color is the triangle?"  # ShapesWorld(split="heldout").vqa(0, "color"): orange
BAD_QUESTION = "And what is in this one?"


def shapes_files(folder: Path) -> dict[str, Path]:
    from ovis_u1.shapes import ShapesWorld
    folder.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(split="heldout")
    files = {"edit": world.edit(4, "replace").source, "vqa": world.vqa(0, "color").images[0]}
    out = {}
    for name, image in files.items():
        out[name] = folder / f"{name}.png"
        image.save(out[name])
    out["broken"] = folder / "broken.png"
    out["broken"].write_bytes(b"this is not an image")
    return out


def main(argv=None) -> None:
    from playwright.sync_api import sync_playwright

    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--url", help="a running app (default: start one)")
    args.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = args.parse_args(argv)
    server = None if args.url else start_app()
    url = args.url or server.url
    files = shapes_files(args.out.parent / ".screenshot_inputs")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = open_app(browser, url, "Understand")
            capability_flow(page)
            print(save_screenshot(page, args.out / "capabilities.png", full_page=False))
            chat_flow(page, [files["vqa"]], QUESTION)
            print(save_screenshot(page, args.out / "understand.png"))
            bad_upload_flow(page, files["broken"])
            print(save_screenshot(page, args.out / "error_kept_chat.png"))
            # The model's own default steps (30) here: these pictures show what it makes.
            page = open_app(browser, url, "Create")
            create_flow(page, "a green triangle", steps=30, seed=0)
            print(save_screenshot(page, args.out / "create.png"))
            page = open_app(browser, url, "Edit")
            edit_flow(page, files["edit"], EDIT_INSTRUCTION, steps=30, seed=42)
            print(save_screenshot(page, args.out / "edit.png"))
            page = open_app(browser, url, "Inside the refiner")
            refiner_flow(page, "a triangle and a square", steps=30, seed=0)
            print(save_screenshot(page, args.out / "refiner.png"))
            browser.close()
    finally:
        for f in files.values():
            f.unlink(missing_ok=True)
        (args.out.parent / ".screenshot_inputs").rmdir()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
