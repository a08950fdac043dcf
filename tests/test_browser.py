"""The web demo in a real headless browser: type, click, wait for the model's output, take a screenshot.

Uses Debian's chromium through Python playwright. Without chromium this skips, except under CI (the `CI`
environment variable set), where it fails: CI installs chromium, so its absence there is a broken setup.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests._app_server import CHROMIUM, CHROMIUM_ARGS, shared_app
from tests.take_screenshots import (
    BAD_QUESTION,
    EDIT_INSTRUCTION,
    QUESTION,
    bad_upload_flow,
    capability_flow,
    chat_flow,
    create_flow,
    edit_flow,
    open_app,
    save_screenshot,
    shapes_files,
)


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run under CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def url(browser):
    return shared_app().url


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return shapes_files(tmp_path_factory.mktemp("uploads"))


def check_screenshot(path: Path) -> None:
    with Image.open(path) as im:
        assert im.width == 1280 and im.height > 400


def test_create_an_image_in_the_browser(browser, url, tmp_path):
    page = open_app(browser, url, "Create")
    create_flow(page, "a red circle to the left of a blue square")
    assert page.locator("#create-gallery img").count() >= 1
    check_screenshot(save_screenshot(page, tmp_path / "create.png"))


def test_edit_twice_in_the_browser(browser, url, files, tmp_path):
    page = open_app(browser, url, "Edit")
    edit_flow(page, files["edit"], EDIT_INSTRUCTION, more="add a red square")
    captions = page.locator("#edit-history").inner_text()
    assert EDIT_INSTRUCTION in captions and "add a red square" in captions
    check_screenshot(save_screenshot(page, tmp_path / "edit.png"))


def test_understand_tab_capabilities_a_chat_turn_and_a_refused_upload(browser, url, files, tmp_path):
    """One page load, as a user goes: read what the model can do, ask about an image, then send an unreadable
    file, which must leave the chat as it was."""
    page = open_app(browser, url, "Understand")
    note = capability_flow(page)
    for figure in ("0.761", "0.556", "0.306", "chance", "64x64"):
        assert figure in note
    check_screenshot(save_screenshot(page, tmp_path / "capabilities.png", full_page=False))
    reply = chat_flow(page, [files["vqa"]], QUESTION)
    assert reply  # the model's answer, or the app's note that it was empty
    check_screenshot(save_screenshot(page, tmp_path / "understand.png"))
    bad_upload_flow(page, files["broken"])
    # The earlier turn is still on screen, and the refused question and its attachment are still in the box.
    assert QUESTION in page.locator("#chat").inner_text()
    assert page.locator("#chat [data-testid=bot]").count() == 1
    assert page.locator("#chat-input textarea").input_value() == BAD_QUESTION
    assert page.locator("#chat-input img").count() == 1  # the attachment's thumbnail
    check_screenshot(save_screenshot(page, tmp_path / "error_kept_chat.png"))
