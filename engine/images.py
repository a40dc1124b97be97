"""Reading user images safely: PNG, JPEG or WebP (also BMP and GIF) of any size and mode -> RGB.

``load_image(source)`` returns an RGB ``PIL.Image`` (``load_mask``: an inpainting mask): transparency is
composited on white, grayscale, palette, CMYK and 16-bit images are converted, EXIF orientation is applied,
animated images give their first frame. A file that is missing, not an image, truncated or too large (a
decompression bomb) raises ``engine.errors.UsageError`` with one sentence. ``to_pixel_values`` resizes and normalises an image into
a ``numpy`` array ``(1, 3, H, W)`` for a vision encoder (usable by the torch and ONNX backends alike).
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np

from engine.errors import UsageError

MAX_PIXELS = 50_000_000  # about 7000 x 7000; anything larger is refused before its pixels are decoded
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
BACKGROUND = (255, 255, 255)

Source = Union[str, Path, bytes, "PIL.Image.Image"]


def load_image(source: Source, max_pixels: int = MAX_PIXELS):
    """An RGB image from a path, raw bytes or a PIL image; UsageError when it cannot be read safely."""
    return _to_rgb(_open(source, max_pixels))


def open_image(source: Source, max_pixels: int = MAX_PIXELS):
    """The decoded image as it is (its mode and transparency kept; EXIF orientation applied), read as safely as
    ``load_image``: for keeping an input as PNG."""
    return _open(source, max_pixels)


def load_mask(source: Source, max_pixels: int = MAX_PIXELS):
    """An inpainting mask (an ``L`` image, white = repaint) read as safely as ``load_image``. A mask with real
    transparency is its alpha channel (the painted strokes repaint), as AUTOMATIC1111 reads one; any other is
    its grey level."""
    image = _open(source, max_pixels)
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return _to_rgb(image).convert("L")


def _open(source: Source, max_pixels: int):
    """The decoded image of a path or bytes (EXIF orientation applied), or a PIL image as it is."""
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        return source
    name = "the image" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)):
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"Image file {path} does not exist.")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"Image file {path} cannot be read ({exc.strerror or exc}).") from None
    else:
        data = bytes(source)
    if not data:
        raise UsageError(f"{_cap(name)} is empty, not an image.")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = image.size
            if w * h > max_pixels or w <= 0 or h <= 0:
                raise UsageError(f"{_cap(name)} is {w} x {h} pixels, more than the {max_pixels:,} pixels the studio "
                                 "reads (a possible decompression bomb); use a smaller image.")
            image.load()
            sixteen = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG")
            image = ImageOps.exif_transpose(image)
            if sixteen:  # a 16-bit file holds 16-bit samples, however dark (the scale was read from the content,
                # which made a near-black file bright); an image made in memory keeps _to_rgb's rule
                image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8), "L")
        except UsageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UsageError(f"{_cap(name)} is too large to decode safely (a possible decompression bomb); "
                             "use a smaller image.") from None
        except Image.UnidentifiedImageError:
            raise UsageError(f"{_cap(name)} is not an image the studio reads (PNG, JPEG, WebP, BMP or GIF).") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
            reason = "truncated" if "truncat" in str(exc).lower() else "corrupt or truncated"
            raise UsageError(f"{_cap(name)} is {reason} and cannot be decoded; save it again or use another file.") from None
    return image


def check_still(path) -> None:
    """UsageError when the file at ``path`` is an animated image (a caption of its first frame would mislead)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1) if getattr(image, "is_animated", False) else 1
    except (OSError, SyntaxError, ValueError):
        return  # not readable: load_image says why
    if frames > 1:
        raise UsageError(f"Image {path} is animated ({frames} frames); caption a still image.")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text.startswith("the ") else f"Image {text}"


def _to_rgb(image):
    """Any PIL mode -> RGB, compositing transparency over white."""
    from PIL import Image

    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    mode = image.mode
    if mode == "RGB":
        return image.copy() if image.readonly else image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max(initial=0)
        if mode == "F" and top <= 1.0:
            arr = arr * 255.0  # floats in [0, 1]
        elif top > 255:
            arr = arr / 257.0  # 16-bit samples in a 32-bit image
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def to_pixel_values(image, size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    resample: int = 2, rescale: float | None = 1 / 255, crop=None,
                    shortest_edge: int | None = None) -> np.ndarray:
    """RGB PIL image -> float32 array (1, 3, H, W), in the order and arithmetic of transformers' image processors:
    resize (to ``size`` = S or (H, W), or the short side to ``shortest_edge`` keeping the aspect ratio; PIL filters
    on uint8, anti-aliased), center-crop to ``crop`` (H, W) when given, rescale in float64 then float32, normalise.
    ``mean``/``std`` None: no normalisation; ``rescale`` None: no rescaling."""
    image = _to_rgb(image)
    if shortest_edge:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(shortest_edge * long / short)
        target = (shortest_edge, new_long) if w <= h else (new_long, shortest_edge)  # (W, H)
    else:
        hh, ww = (size, size) if isinstance(size, int) else size
        target = (ww, hh)
    if image.size != target:
        image = image.resize(target, resample=resample)
    x = np.asarray(image)  # (H, W, 3) uint8
    if crop is not None:
        ch, cw = crop
        top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
        if top < 0 or left < 0:
            raise UsageError(f"The image of {x.shape[1]} x {x.shape[0]} pixels is smaller than the crop of {cw} x {ch}.")
        x = x[top:top + ch, left:left + cw]
    x = (x.astype(np.float64) * rescale).astype(np.float32) if rescale is not None else x.astype(np.float32)
    if mean is not None and std is not None:
        x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, H, W)
