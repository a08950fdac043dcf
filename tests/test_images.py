"""ovis_u1/images.py: resizing, patch layout, the blank and generation images, and load_image's sources,
modes and errors."""

import io
import math
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import png_bytes, random_image
from einops import rearrange
from PIL import Image, ImageOps

from ovis_u1 import images as IM
from ovis_u1.config import CLIP_MEAN, CLIP_STD


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


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
    image = random_image(50, 90)
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


@pytest.mark.parametrize("kind, message", [
    ("missing file", "does not exist"), ("empty file", "0 bytes"), ("empty bytes", "0 bytes"),
    ("corrupt bytes", "not a readable image"), ("truncated file", "truncated"),
    ("unreadable file", "could not be read"),  # an OSError while reading: an I/O error, no permission
])
def test_unreadable_sources_are_image_input_errors(tmp_path, kind, message):
    data = png_bytes(random_image(64, 64))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    sources = {"missing file": tmp_path / "nope.png", "empty file": tmp_path / "empty.png", "empty bytes": b"",
               "corrupt bytes": b"this is not an image at all", "truncated file": tmp_path / "cut.png",
               "unreadable file": "/proc/self/mem"}
    with pytest.raises(IM.ImageInputError, match=message):
        IM.load_image(sources[kind])


def test_decompression_bombs():
    with pytest.raises(IM.ImageInputError, match="max_pixels=64000000"):
        IM.load_image(_png_with_header(9000, 9000))  # 81 MP: caught by our header check
    with pytest.raises(IM.ImageInputError, match="decompression bomb"):
        IM.load_image(_png_with_header(100_000, 100_000))  # caught by PIL's own guard
    with pytest.raises(IM.ImageInputError, match="max_pixels=100"):
        IM.load_image(png_bytes(random_image(20, 20)), max_pixels=100)
    with pytest.raises(IM.ImageInputError, match="max_pixels"):
        IM.load_image(random_image(20, 20), max_pixels=100)


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
    rgb = random_image(12, 20)
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
        "1": rgb.convert("1"),
    }
    for mode, image in cases.items():
        assert image.mode == mode
        out = IM.load_image(image)
        assert out.mode == "RGB" and out.size == (20, 12), mode
        if mode in ("L", "I;16", "I", "F"):  # grey levels survive the 16-bit / float scaling exactly
            assert np.array_equal(np.asarray(out)[..., 0], gray), mode
    assert IM.load_image(np.asarray(gray)).mode == "RGB"
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG")  # a CMYK JPEG file (print workflows write them)
    assert IM.load_image(buf.getvalue()).mode == "RGB"


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
    random_image(20, 40, seed=12).save(path, exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    for src in (path, path.read_bytes()):
        out = IM.load_image(src)
        assert out.size == (20, 40)  # portrait, as displayed
        assert np.array_equal(np.asarray(out), np.asarray(upright))
