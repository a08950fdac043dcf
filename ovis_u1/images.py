"""Images in: loading and normalising user images, the Qwen2-VL `smart_resize`, the sizes the generation
pipeline gives the ViT, and the merge-group patch layout the visual encoder reads.

Axis letters in einops strings: c channel, gh/gw merge-group rows/cols, s1/s2 position inside a
hidden_stride x hidden_stride group, p1/p2 pixel inside a patch.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from .config import OvisU1Config

MAX_ASPECT_RATIO = 200

# --------------------------------------------------------------------------------------------------
# Images in
# --------------------------------------------------------------------------------------------------


class ImageInputError(ValueError):
    """An image could not be used: missing, empty, corrupt, too large, zero-size or of an unknown type."""


ImageSource = str | os.PathLike | bytes | bytearray | io.IOBase | Image.Image | np.ndarray

_ALLOWED_SOURCES = "a path, raw bytes, a binary file object, a PIL image or an HxW / HxWx3 uint8 numpy array"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_DIRECT_MODES = ("1", "L", "CMYK", "YCbCr", "RGBX", "HSV")


def load_image(src: ImageSource, max_pixels: int = 64_000_000) -> Image.Image:
    """Open `src` as a fully decoded, EXIF-oriented RGB image, or raise `ImageInputError` saying why."""
    if isinstance(src, Image.Image):
        image, what = src, "PIL image"
    elif isinstance(src, np.ndarray):
        image, what = _from_array(src), "numpy array"
    else:
        data, what = _read_bytes(src)
        image = _open_bytes(data, what, max_pixels)
    w, h = image.size
    if w == 0 or h == 0:
        raise ImageInputError(f"{what} has zero size ({w}x{h}); images need at least 1x1 pixels")
    if w * h > max_pixels:
        raise ImageInputError(_too_large(what, w, h, max_pixels))
    try:
        image.load()  # decode everything now: truncated files fail here, not deep inside preprocessing
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{what} could not be decoded ({e}); it is corrupt or truncated") from e
    return _to_rgb(image, what)


def _read_bytes(src: Any) -> tuple[bytes, str]:
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageInputError(f"image file {str(path)!r} does not exist")
        if not path.is_file():
            raise ImageInputError(f"image path {str(path)!r} is not a regular file")
        try:
            return path.read_bytes(), f"image file {str(path)!r}"
        except OSError as e:  # no permission, an I/O error (/proc/self/mem), a file removed meanwhile
            raise ImageInputError(f"image file {str(path)!r} could not be read: {e.strerror or e}") from e
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "image bytes"
    if hasattr(src, "read"):
        data = src.read()
        if not isinstance(data, bytes):
            raise ImageInputError("file object returned text; open image files in binary mode ('rb')")
        return data, "image file object"
    raise ImageInputError(f"unsupported image type {type(src).__name__}; pass {_ALLOWED_SOURCES}")


def _open_bytes(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if len(data) == 0:
        raise ImageInputError(f"{what} is empty (0 bytes)")
    try:
        # PIL's own bomb guard: a warning above Image.MAX_IMAGE_PIXELS (made an error here), an error above
        # twice that. Both fire in open(), from the header, before any pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f"{what} is a suspected decompression bomb ({e}); images may have at most "
                              f"max_pixels={max_pixels} pixels (and PIL's Image.MAX_IMAGE_PIXELS)") from e
    except UnidentifiedImageError as e:
        raise ImageInputError(f"{what} is not a readable image (unknown format or corrupt header)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"{what} could not be opened ({e}); it is corrupt or truncated") from e
    w, h = image.size  # header only: reject huge images before decoding them
    if w * h > max_pixels:
        raise ImageInputError(_too_large(what, w, h, max_pixels))
    return image


def _too_large(what: str, w: int, h: int, max_pixels: int) -> str:
    return (f"{what} is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
            "(possible decompression bomb); downscale it or raise max_pixels")


def _from_array(a: np.ndarray) -> Image.Image:
    ok_shape = a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))
    if a.dtype != np.uint8 or not ok_shape:
        raise ImageInputError(f"numpy image must be uint8 with shape HxW, HxWx3 or HxWx4; got {a.dtype} "
                              f"{tuple(a.shape)}")
    if a.size == 0:
        raise ImageInputError(f"numpy array has zero size {tuple(a.shape)}; images need at least 1x1 pixels")
    return Image.fromarray(np.ascontiguousarray(a))


def _to_rgb(image: Image.Image, what: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    if mode in _ALPHA_MODES or mode == "P":  # palette transparency lives in `info`; RGBA honours it
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # transparent pixels become white
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit data (I;16*, and I, which is how PIL opens many 16-bit PNG/TIFF files): 65535 -> 255.
        a = np.asarray(image).astype(np.float64)
        return _gray_to_rgb(np.clip(a, 0, 65535) / 257.0)
    if mode == "F":
        # Float images: [0, 1] data (the usual convention) is scaled, anything else read as 0..255.
        a = np.asarray(image).astype(np.float64)
        return _gray_to_rgb(np.clip(a * 255.0 if np.nanmax(a) <= 1.0 else a, 0, 255))
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    raise ImageInputError(f"{what} has unsupported mode {mode!r}; supported: RGB, P, {', '.join(_ALPHA_MODES)}, "
                          f"{', '.join(_SIXTEEN_BIT_MODES)}, F, {', '.join(_DIRECT_MODES)}")


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.nan_to_num(np.rint(a)).astype(np.uint8), mode="L").convert("RGB")


# The published smart_resize's default lower bound, which its generation pipeline leaves in place.
GENERATION_MIN_PIXELS = 56 * 56


def generation_image_size(height: int, width: int, max_pixels: int, factor: int) -> tuple[int, int]:
    """(h, w) the published generation pipeline resizes a prompt's image to before the ViT reads it:
    smart_resize(factor, min 56^2, max = the processor's min_pixels), so at most max_pixels pixels.

    `factor` is patch size x hidden stride (28 for the release; `generation.vit_factor(model)`). The ViT's own
    preprocessing then smart-resizes the result again, within the processor's usual bounds.
    """
    return smart_resize(height, width, factor, min(GENERATION_MIN_PIXELS, max_pixels), max_pixels)


def blank_image(height: int, width: int, max_pixels: int, factor: int) -> Image.Image:
    """White RGB image for a height x width target, sized as the published pipeline sizes it for the ViT.

    Text-to-image always sends such an image through the ViT (and editing's no_both branch does), so the
    generation prompt keeps its `<image>` slot; only its aspect ratio carries information.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"blank image size must be positive, got {height}x{width}")
    h, w = generation_image_size(height, width, max_pixels, factor)
    return Image.new("RGB", (w, h), (255, 255, 255))


def generation_image(image: Image.Image, max_pixels: int, factor: int) -> Image.Image:
    """An edit's image as the ViT gets it: resized (bicubic) to `generation_image_size`, at most max_pixels."""
    h, w = generation_image_size(image.height, image.width, max_pixels, factor)
    return image if image.size == (w, h) else image.resize((w, h), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------------
# Images -> patches
# --------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 448 * 448,
                 max_pixels: int = 1792 * 1792) -> tuple[int, int]:
    """Qwen2-VL resize target: sides divisible by `factor`, pixels in [min, max], aspect ratio kept.

    The published rule, including its handling of a side shorter than `factor` (scaled up to it first).
    Two departures where the published one breaks: an aspect ratio over 200 is refused (it silently
    distorts the image), and a side never floors to 0 (it would crash).
    """
    if height <= 0 or width <= 0:
        raise ImageInputError(f"image size must be positive, got {height}x{width}")
    if min_pixels > max_pixels or max_pixels < factor * factor:
        raise ValueError(f"need factor^2 <= max_pixels and min_pixels <= max_pixels; got factor={factor}, "
                         f"min_pixels={min_pixels}, max_pixels={max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageInputError(f"aspect ratio of {height}x{width} is "
                              f"{max(height, width) / min(height, width):.1f}; at most {MAX_ASPECT_RATIO} "
                              "is supported, crop or pad the image")
    if height < factor or width < factor:
        if height < width:
            height, width = factor, round(factor / height * width)
        else:
            height, width = round(factor / width * height), factor
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def merge_group_order(h: int, w: int, hidden_stride: int) -> torch.Tensor:
    """Permutation `order` with `rowmajor[order] == merge-group order` for an h x w patch grid.

    Entry i is the row-major index of the patch at merge-group position i; the vision encoder indexes its
    row-major position table with it.
    """
    if h % hidden_stride or w % hidden_stride:
        raise ValueError(f"patch grid {h}x{w} is not divisible by hidden_stride={hidden_stride}")
    index = torch.arange(h * w).reshape(h, w)
    return rearrange(index, "(gh s1) (gw s2) -> (gh gw s1 s2)", s1=hidden_stride, s2=hidden_stride)


def preprocess_image(image: Image.Image, patch_size: int, hidden_stride: int, min_pixels: int,
                     max_pixels: int, mean: Sequence[float], std: Sequence[float]
                     ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """RGB image -> (patches [N, 3, patch, patch] in merge-group order, grid_thw (1, h, w) in patches)."""
    if image.mode != "RGB":
        raise ImageInputError(f"preprocess_image expects an RGB image (use load_image); got mode {image.mode!r}")
    factor = patch_size * hidden_stride
    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    resized = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)  # rescale to [0, 1]
    pixels = (pixels - torch.tensor(mean)) / torch.tensor(std)  # CLIP normalisation, no centre crop
    patches = rearrange(pixels, "(gh s1 p1) (gw s2 p2) c -> (gh gw s1 s2) c p1 p2",
                        s1=hidden_stride, s2=hidden_stride, p1=patch_size, p2=patch_size)
    return patches.contiguous(), (1, height // patch_size, width // patch_size)


def image_patches(src: ImageSource, cfg: OvisU1Config) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An image (path, bytes or PIL) cut the way a model of this config reads it: `load_image`, then
    `preprocess_image` with the vision patch size and the adapter's stride, pixel bounds and normalisation."""
    adapter = cfg.adapter
    return preprocess_image(load_image(src), cfg.vision.patch_size, adapter.hidden_stride, adapter.min_pixels,
                            adapter.max_pixels, adapter.image_mean, adapter.image_std)


def patches_to_image(patches: torch.Tensor, grid_thw: Sequence[int], mean: Sequence[float],
                     std: Sequence[float], hidden_stride: int = 2) -> torch.Tensor:
    """Inverse of `preprocess_image`: merge-group patches -> [3, H, W] pixels in [0, 1] (un-normalised)."""
    t, h, w = grid_thw
    if t != 1 or patches.shape[0] != h * w:
        raise ValueError(f"{patches.shape[0]} patches do not fit grid_thw {tuple(grid_thw)}")
    pixels = rearrange(patches, "(gh gw s1 s2) c p1 p2 -> c (gh s1 p1) (gw s2 p2)",
                       gh=h // hidden_stride, gw=w // hidden_stride, s1=hidden_stride, s2=hidden_stride)
    return pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def num_visual_tokens(grid_thw: Sequence[int], hidden_stride: int) -> int:
    """Visual tokens the adapter emits for one image: one per hidden_stride x hidden_stride group."""
    t, h, w = grid_thw
    return t * h * w // (hidden_stride * hidden_stride)
