"""Fast CPU tests for image loading/patching, prompts, ids, labels, padding and the tiny tokenizer."""

import io
import math
import random
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from ovis_u1 import images as IM
from ovis_u1 import prompts as PR
from ovis_u1.config import CLIP_MEAN, CLIP_STD, PUBLISHED_T2I_PREFIX, get_preset
from ovis_u1.tokenizer import build_tokenizer, default_corpus, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(default_corpus())


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- smart_resize


def test_smart_resize_properties():
    rng = random.Random(0)
    for _ in range(500):
        height, width = rng.randint(1, 6000), rng.randint(1, 6000)
        if max(height, width) / min(height, width) > 50:
            continue
        h, w = IM.smart_resize(height, width)
        assert h % 28 == 0 and w % 28 == 0
        assert 448 * 448 <= h * w <= 1792 * 1792
        # Each side moves by at most one factor step from the exact aspect-preserving size.
        assert abs(math.log(h / w) - math.log(height / width)) <= math.log((min(h, w) + 28) / min(h, w)) * 2


def test_smart_resize_known_values_and_errors():
    assert IM.smart_resize(448, 448) == (448, 448)
    assert IM.smart_resize(10, 10) == (448, 448)
    assert IM.smart_resize(3584, 3584) == (1792, 1792)
    assert IM.smart_resize(500, 1000) == (504, 1008)
    with pytest.raises(IM.ImageInputError, match="aspect ratio"):
        IM.smart_resize(10, 2500)
    with pytest.raises(IM.ImageInputError, match="positive"):
        IM.smart_resize(0, 10)


# ---------------------------------------------------------------- patches


def test_merge_group_order_small_grid():
    order = IM.merge_group_order(4, 4, 2)
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert IM.merge_group_order(2, 6, 2).tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
    assert sorted(IM.merge_group_order(6, 8, 2).tolist()) == list(range(48))
    with pytest.raises(ValueError, match="divisible"):
        IM.merge_group_order(3, 4, 2)


def test_preprocess_layout_and_round_trip():
    image = _noise(50, 90)
    patches, grid = IM.preprocess_image(image, 14, 2, 448 * 448, 1792 * 1792, CLIP_MEAN, CLIP_STD)
    h, w = IM.smart_resize(50, 90)
    assert grid == (1, h // 14, w // 14)
    assert patches.shape == (grid[1] * grid[2], 3, 14, 14) and patches.dtype == torch.float32

    resized = image.resize((w, h), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    back = IM.patches_to_image(patches, grid, CLIP_MEAN, CLIP_STD, hidden_stride=2)
    torch.testing.assert_close(back, pixels, atol=1e-5, rtol=0)

    # Merge-group order is the row-major patch list permuted by merge_group_order.
    normed = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    rowmajor = rearrange(normed, "c (h p1) (w p2) -> (h w) c p1 p2", p1=14, p2=14)
    torch.testing.assert_close(patches, rowmajor[IM.merge_group_order(grid[1], grid[2], 2)])
    # Each 4 consecutive patches form one 2x2 group: patches 0..3 are the top-left 28x28 pixels.
    torch.testing.assert_close(rearrange(patches[:4], "(s1 s2) c p1 p2 -> c (s1 p1) (s2 p2)", s1=2),
                               normed[:, :28, :28])


def test_blank_image():
    img = IM.blank_image(1024, 512, 448 * 448, 28)
    assert img.mode == "RGB" and img.width * img.height <= 448 * 448
    assert abs(img.height / img.width - 2) < 0.01
    assert np.asarray(img).min() == 255
    # The published generation rule: smart_resize(factor 28, min 56^2, max = the cap), so a small target
    # grows to the factor grid (golden/cases.json "sizes" checks 240 targets at the release's bounds).
    assert IM.blank_image(20, 30, 448 * 448, 28).size == (84, 56)
    assert IM.blank_image(64, 64, 32 * 32, factor=16).size == (32, 32)


def test_generation_image_is_capped_and_kept_when_small_enough():
    big = Image.new("RGB", (1000, 800))
    seen = IM.generation_image(big, 448 * 448, 28)
    assert seen.width * seen.height <= 448 * 448 and seen.width % 28 == 0 and seen.height % 28 == 0
    small = Image.new("RGB", (64, 64))
    assert IM.generation_image(small, 64 * 64, factor=16) is small


# ---------------------------------------------------------------- load_image errors


def test_missing_file(tmp_path):
    with pytest.raises(IM.ImageInputError, match="does not exist"):
        IM.load_image(tmp_path / "nope.png")


def test_empty_file_and_bytes(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(IM.ImageInputError, match="0 bytes"):
        IM.load_image(empty)
    with pytest.raises(IM.ImageInputError, match="0 bytes"):
        IM.load_image(b"")


def test_corrupt_bytes():
    with pytest.raises(IM.ImageInputError, match="not a readable image"):
        IM.load_image(b"this is not an image at all")


def test_truncated_png(tmp_path):
    data = _png_bytes(_noise(64, 64))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IM.ImageInputError, match="truncated"):
        IM.load_image(path)


def test_decompression_bombs():
    with pytest.raises(IM.ImageInputError, match="max_pixels=64000000"):
        IM.load_image(_png_with_header(9000, 9000))  # 81 MP: caught by our header check
    with pytest.raises(IM.ImageInputError, match="decompression bomb"):
        IM.load_image(_png_with_header(100_000, 100_000))  # caught by PIL's own guard
    with pytest.raises(IM.ImageInputError, match="max_pixels=100"):
        IM.load_image(_png_bytes(_noise(20, 20)), max_pixels=100)
    with pytest.raises(IM.ImageInputError, match="max_pixels"):
        IM.load_image(_noise(20, 20), max_pixels=100)


def test_zero_size_and_unsupported_types():
    with pytest.raises(IM.ImageInputError, match="zero size"):
        IM.load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(IM.ImageInputError, match="zero size"):
        IM.load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(IM.ImageInputError, match="unsupported image type int"):
        IM.load_image(42)
    with pytest.raises(IM.ImageInputError, match="uint8"):
        IM.load_image(np.zeros((4, 4, 3), np.float32))


# ---------------------------------------------------------------- load_image modes


def test_sources_and_modes(tmp_path):
    rgb = _noise(12, 20)
    path = tmp_path / "a.png"
    rgb.save(path)
    for src in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), rgb, np.asarray(rgb)):
        out = IM.load_image(src)
        assert out.mode == "RGB" and out.size == (20, 12)
        assert np.array_equal(np.asarray(out), np.asarray(rgb))

    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    cases = {
        "L": Image.fromarray(gray),
        "LA": Image.fromarray(gray).convert("LA"),
        "P": rgb.convert("P"),
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
        "I": Image.fromarray(gray.astype(np.int32) * 257),
        "F": Image.fromarray(gray.astype(np.float32) / 255.0),
    }
    for mode, image in cases.items():
        assert image.mode == mode
        out = IM.load_image(image)
        assert out.mode == "RGB" and out.size == (20, 12), mode
        if mode in ("L", "I;16", "I", "F"):  # grey levels survive the 16-bit / float scaling exactly
            assert np.array_equal(np.asarray(out)[..., 0], gray), mode
    assert IM.load_image(np.asarray(gray)).mode == "RGB"


def test_alpha_composited_on_white_and_16bit_png(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))
    out = IM.load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
    assert IM.load_image(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert IM.load_image(pal).getpixel((0, 0)) == (255, 255, 255)

    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((3, 3), 257 * 128, np.uint16)).save(path)
    assert IM.load_image(path).getpixel((1, 1)) == (128, 128, 128)


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(path, exif=exif)
    assert Image.open(path).size == (40, 20)
    assert IM.load_image(path).size == (20, 40)


# ---------------------------------------------------------------- chat templates


def test_understanding_prompt_strings():
    assert PR.understanding_prompt("What is this?", 1) == (
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert PR.understanding_prompt("Compare.", 2, enable_thinking=True) == (
        "<|im_start|>user\nImage 1: <image>\nImage 2: <image>\nCompare.<|im_end|>\n<|im_start|>assistant\n")
    assert PR.understanding_prompt("Hi", 0, enable_thinking=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert PR.understanding_prompt("Is <image> like <image>?", 2).startswith(
        "<|im_start|>user\nIs <image> like <image>?<|im_end|>")
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        PR.understanding_prompt("<image> <image> what?", 1)


def test_understanding_prompt_with_history():
    history = [("What color is the circle?", "red"), ("And the square?", "blue")]
    assert PR.understanding_prompt("How many?", 1, history=history) == (
        "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\nred<|im_end|>\n"
        "<|im_start|>user\nAnd the square?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nblue<|im_end|>\n"
        "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # placeholders may sit in any turn; together they must match the images
    later = PR.understanding_prompt("Now compare <image>.", 2, history=[("Look at <image>.", "ok")])
    assert later.count("<image>") == 2 and "Image 1:" not in later
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        PR.understanding_prompt("What now?", 2, history=[("Look at <image>.", "ok")])


@pytest.mark.parametrize("bad, match", [
    ("what?", "must be a list of"), ([("q",)], r"history\[0\] must be a \(question, answer\) pair"),
    ([("q", 3)], "pair of strings"), ([(" ", "a")], "empty question"), ([("q", "<image>")], "text only"),
])
def test_history_is_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        PR.understanding_prompt("q", 0, history=bad)


def test_generation_prompts():
    assert PR.generation_prompt("a cat") == "<|im_start|>user\n<image>\na cat<|im_end|>\n"
    cond, uncond = PR.t2i_prompts("a red circle")
    # The published code joins prefix and prompt as written: no space, no strip.
    assert cond == f"<|im_start|>user\n<image>\n{PUBLISHED_T2I_PREFIX}a red circle<|im_end|>\n"
    assert PR.t2i_prompts(" two squares ", "")[0] == "<|im_start|>user\n<image>\n two squares <|im_end|>\n"
    assert uncond == "<|im_start|>user\n<image>\nGenerate an image.<|im_end|>\n"
    assert PUBLISHED_T2I_PREFIX.endswith("spatial relationships of the objects:")
    assert PR.edit_prompt("  make it blue \n") == "<|im_start|>user\n<image>\nmake it blue<|im_end|>\n"
    with pytest.raises(ValueError, match="must not contain"):
        PR.generation_prompt("<image> a cat")


# ---------------------------------------------------------------- ids


def test_tokenize_prompt_placeholders_and_specials(tok):
    ids = PR.tokenize_prompt(tok, PR.understanding_prompt("What color?", 2))
    assert ids.count(PR.IMAGE_TOKEN_ID) == 2
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids.count(im_end) == 1
    text = tok.decode([i if i >= 0 else tok.encode("<image>", add_special_tokens=False)[0] for i in ids])
    assert "What color?" in text


def test_expand_image_tokens():
    ids = [5, PR.IMAGE_TOKEN_ID, 6, PR.IMAGE_TOKEN_ID]
    out = PR.expand_image_tokens(ids, [2, 3])
    a, o, c = PR.VISUAL_ATOM_ID, PR.INDICATOR_IDS[0], PR.INDICATOR_IDS[1]
    assert out == [5, o, a, a, c, 6, o, a, a, a, c]
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        PR.expand_image_tokens(ids, [4])
    assert IM.num_visual_tokens((1, 6, 8), 2) == 12


def test_truncate():
    tail = PR.TRUNCATE_KEEP_TAIL
    ids = list(range(40))
    assert PR.truncate(ids, 40) == ids
    with pytest.warns(UserWarning, match="truncated to 20"):
        # the start and the closing template tokens survive; the middle goes
        assert PR.truncate(ids, 20) == list(range(20 - tail)) + list(range(40 - tail, 40))
    with pytest.warns(UserWarning):
        assert PR.truncate(ids, 4) == [36, 37, 38, 39]  # budget below the tail: the tail wins
    img = PR.expand_image_tokens([1, PR.IMAGE_TOKEN_ID, *list(range(2, 40))], [4])  # image span of 6 first
    with pytest.warns(UserWarning):
        out = PR.truncate(img, 30)
    assert out[:7] == img[:7] and out[-tail:] == img[-tail:] and len(out) == 30
    late = PR.expand_image_tokens([*list(range(1, 30)), PR.IMAGE_TOKEN_ID, 99], [2])  # image span near the end
    with pytest.warns(UserWarning):
        out = PR.truncate(late, 20)
    assert len(out) == 20 and out.count(PR.VISUAL_ATOM_ID) == 2 and out[-1] == 99
    assert out.index(PR.INDICATOR_IDS[0]) + 3 == out.index(PR.INDICATOR_IDS[1])  # span kept whole
    with pytest.raises(ValueError, match=r"image tokens alone \(6\) exceed max_length=5"):
        PR.truncate(img, 5)


def test_understanding_labels(tok):
    ids, labels = PR.understanding_example(tok, "What color is the circle?", "The circle is red.", 1)
    assert len(ids) == len(labels)
    kept = [i for i, lab in zip(ids, labels, strict=True) if lab != PR.IGNORE_ID]
    assert tok.decode(kept) == "The circle is red.<|im_end|>"
    first = labels.index(next(lab for lab in labels if lab != PR.IGNORE_ID))
    assert all(lab == PR.IGNORE_ID for lab in labels[:first])  # role header and empty think block masked
    assert tok.decode([i for i in ids[:first] if i >= 0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert labels[-1] == PR.IGNORE_ID and tok.decode(ids[-1:]) == "\n"  # newline after <|im_end|> masked
    assert labels[first:-1] == ids[first:-1]

    ex_ids, ex_labels = PR.expand_example(ids, labels, [3])
    assert len(ex_ids) == len(ex_labels) == len(ids) + 4
    assert all(lab == PR.IGNORE_ID for i, lab in zip(ex_ids, ex_labels, strict=True) if i < 0)
    assert [lab for lab in ex_labels if lab != PR.IGNORE_ID] == [lab for lab in labels if lab != PR.IGNORE_ID]
    with pytest.warns(UserWarning):
        t_ids, t_labels = PR.truncate_example(ex_ids, ex_labels, len(ex_ids) - 2)
    # ids and labels are cut at the same positions; the answer at the end (the tail) survives
    tail = PR.TRUNCATE_KEEP_TAIL
    assert len(t_ids) == len(t_labels) == len(ex_ids) - 2
    assert t_ids[-tail:] == ex_ids[-tail:] and t_labels[-tail:] == ex_labels[-tail:]
    assert dict(zip(t_ids, t_labels)) == {i: lab for i, lab in zip(ex_ids, ex_labels) if i in set(t_ids)}



def test_conversation_labels_cover_every_answer_and_match_the_inference_prompt(tok):
    history = [("How many objects are there?", "two"), ("Describe the image.", "a red circle and a blue square")]
    ids, labels = PR.understanding_example(tok, "What color is the square?", "blue", 1, history=history)
    kept = [i for i, lab in zip(ids, labels, strict=True) if lab != PR.IGNORE_ID]
    # An earlier turn's first label may carry the think block's last newline (its tokens are those of the
    # whole prompt, where the byte-level BPE merges it into the answer).
    assert tok.decode(kept).replace("\n", "") == "two<|im_end|>a red circle and a blue square<|im_end|>blue<|im_end|>"
    # what answer() feeds for the last turn is exactly the ids before the last answer
    prompt = PR.tokenize_prompt(tok, PR.understanding_prompt("What color is the square?", 1, history=history))
    assert ids[:len(prompt)] == prompt and all(lab == PR.IGNORE_ID for lab in labels[len(prompt) - 3:len(prompt)])
    assert ids.count(PR.IMAGE_TOKEN_ID) == 1


def test_pad_batch():
    seqs = [[1, 2, 3], [PR.IMAGE_TOKEN_ID]]
    ids, mask = PR.pad_batch(seqs, pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, PR.IMAGE_TOKEN_ID]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = PR.pad_batch(seqs, pad_id=PR.IGNORE_ID, side="right")
    assert ids.tolist() == [[1, 2, 3], [PR.IMAGE_TOKEN_ID, PR.IGNORE_ID, PR.IGNORE_ID]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        PR.pad_batch(seqs, 0, side="middle")


def test_prepare_inputs_tiny(tok):
    cfg = get_preset("tiny")
    texts = [PR.understanding_prompt("What is this?", 1), PR.understanding_prompt("Compare.", 2)]
    images = [[_noise(40, 60)], [_noise(100, 30, 1), IM.blank_image(64, 64, 64 * 64, 16)]]
    batch = PR.prepare_inputs(tok, texts, images, cfg, pad_side="left")
    assert len(batch.pixel_patches) == len(batch.grid_thws) == 3
    for patches, (t, h, w) in zip(batch.pixel_patches, batch.grid_thws, strict=True):
        assert t == 1 and h % 2 == 0 and w % 2 == 0
        assert patches.shape == (h * w, 3, 8, 8)
        assert cfg.adapter.min_pixels <= h * w * 64 <= cfg.adapter.max_pixels
    counts = [IM.num_visual_tokens(g, 2) for g in batch.grid_thws]
    atoms = (batch.input_ids == PR.VISUAL_ATOM_ID).sum(1).tolist()
    assert atoms == [counts[0], counts[1] + counts[2]]
    assert batch.attention_mask[:, -1].tolist() == [1, 1]  # left padded
    assert batch.input_ids[batch.attention_mask == 0].eq(tok.pad_token_id).all()
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        PR.prepare_inputs(tok, texts[:1], [images[1]], cfg)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_build_save_reload(tmp_path):
    start = time.perf_counter()
    tok = build_tokenizer(default_corpus(), vocab_size=512)
    assert time.perf_counter() - start < 2.0
    assert len(tok) <= 512
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert len(tok.encode("<image>", add_special_tokens=False)) > 1  # not a token
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"

    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    samples = [PR.understanding_prompt("How many red circles?", 1), "naïve café ✓ 東京 😀", PUBLISHED_T2I_PREFIX]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert again.encode(text, add_special_tokens=False) == ids
        assert again.decode(ids) == text
    assert again.pad_token_id == tok.pad_token_id and again.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(["abc"], vocab_size=100)


def test_unreadable_image_files_are_an_image_input_error(tmp_path):
    """An OSError while reading (an I/O error like /proc/self/mem's, no permission) names the file."""
    with pytest.raises(IM.ImageInputError, match="could not be read"):
        IM.load_image("/proc/self/mem")



def test_former_module_names_forward_to_the_split_modules(monkeypatch):
    """ovis_u1.processing / ovis_u1.inference (before the split by concern) read and patch the new modules."""
    from ovis_u1 import chat, generation, images, inference, processing, prompts
    assert processing.smart_resize is images.smart_resize and processing.UNCOND_TEXT == prompts.UNCOND_TEXT
    assert inference.answer is chat.answer and inference.text_to_image is generation.text_to_image
    monkeypatch.setattr(inference, "initial_noise", "patched")
    assert generation.initial_noise == "patched"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        processing.nope  # noqa: B018
