"""What a generator's Result must be before the host saves it: text that UTF-8 can hold, a PNG-able image,
audio a sound file can hold, info and warnings that are JSON. A plugin's result that is not is the plugin's
failure, in a sentence that names it (engine.runner calls ``check_result`` before saving)."""
from __future__ import annotations

import json
import math

from engine.errors import GenerationError
from engine.generators import Result


def writable_text(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: bytes that were not UTF-8 (a Latin-1 terminal) and JSON's
    ``\ud800`` become lone surrogates, which no tokenizer, file or database takes."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _finite(value):
    """``value`` (JSON-ready) with NaN and infinities as None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def _audio_problem(audio) -> str:
    """Why a result's audio is not (samples, sample rate) that a sound file can hold; "" when it is."""
    import numpy as np

    if not (isinstance(audio, (tuple, list)) and len(audio) == 2):
        return f"audio that is a {type(audio).__name__}, not (samples, sample rate)"
    samples, rate = audio
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= 768_000:
        return f"audio at a sample rate of {rate!r}, not a whole number of samples per second"
    try:
        a = np.asarray(samples)
    except Exception:  # noqa: BLE001 - whatever the plugin gave
        return "audio samples that are not an array"
    if a.ndim not in (1, 2) or a.size == 0 or a.dtype.name not in ("float32", "float64", "int16", "int32"):
        return f"audio samples of shape {a.shape} and type {a.dtype} (1 or 2 dimensions of float or int16/32)"
    return ""


def check_result(result: Result, info, plugin: str) -> None:
    """A plugin's result holds what its generator (``info``) says it makes, of the types the host writes;
    GenerationError naming the plugin otherwise. NaN and infinities in its info become None."""
    gen, makes = info.id, info.makes
    value = {"text": result.text, "image": result.image, "audio": result.audio}[makes]
    if value is None:
        raise GenerationError(f"Generator {gen} says it makes {makes} but its result holds none.")
    wrong = ""
    if result.text is not None and not isinstance(result.text, str):
        wrong = f"text that is a {type(result.text).__name__}, not a string"
    elif result.text is not None and not writable_text(result.text):
        wrong = "text that is not valid Unicode (a lone surrogate)"
    if result.image is not None and not wrong:
        from PIL import Image

        if not isinstance(result.image, Image.Image):
            wrong = f"an image that is a {type(result.image).__name__}, not a PIL image"
        elif 0 in result.image.size:
            wrong = f"an empty image ({result.image.size[0]}x{result.image.size[1]})"
        elif result.image.mode not in PNG_MODES:
            wrong = f"an image in mode {result.image.mode}, which PNG does not hold (convert it to RGB)"
    if result.audio is not None and not wrong:
        wrong = _audio_problem(result.audio)
    if not wrong and not (isinstance(result.info, dict) and isinstance(result.warnings, list)):
        wrong = "info or warnings of the wrong type (a dict and a list)"
    if not wrong:
        try:  # they go into the recipe, which is JSON (a NaN or infinity there is written as null)
            json.dumps({"info": result.info, "warnings": result.warnings})
            result.info = _finite(result.info)
        except (TypeError, ValueError) as exc:
            wrong = f"info or warnings that are not JSON ({exc})"
    if wrong:
        raise GenerationError(f"Generator {gen} (plugin {plugin}) failed: its result holds {wrong}.")
