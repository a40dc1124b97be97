"""Atomic output writers: text with a JSON sidecar, PNG with recipe chunks, audio through soundfile."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
from pathlib import Path

from engine.errors import StateError, UsageError

SUFFIXES = {"image": "png", "audio": "wav", "text": "txt"}  # an output's default file suffix, by what it makes


def _umask() -> int:
    """The process's umask (read without changing it where /proc says it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cannot_write(path: Path, exc: OSError) -> str:
    """What went wrong writing ``path``, in one sentence with what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"Cannot write {path}: the disk is full ({exc.strerror}); free some space or choose another folder."
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"Cannot write {path}: a part of that path is a file, not a folder."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Cannot write {path} ({exc.strerror}); choose a writable folder."
    return f"Cannot write {path} ({exc.strerror or exc})."


def tmp_name(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique to this process and call."""
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (refused if it exists), write ``data`` through to the disk (fsync) and give it the mode
    open() would (from the umask); nothing is left at ``path`` if any of it fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o666 & ~_umask())
    except BaseException:
        unlink_quietly(path)
        raise


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def replacing(path: Path):
    """A temporary name beside ``path`` for a library to write to (``save_file(state, str(tmp))``), renamed to
    ``path`` when the block ends and removed if it fails: ``path`` holds the old file or the whole new one."""
    tmp = tmp_name(Path(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename: never a partial file at ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(cannot_write(path.parent, exc)) from None
    tmp = tmp_name(path)
    try:
        write_new(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        unlink_quietly(tmp)
        raise StateError(cannot_write(path, exc)) from None
    except BaseException:
        unlink_quietly(tmp)
        raise
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    feed(h, path)
    return h.hexdigest()


def feed(h, path: Path) -> None:
    """Add the file's bytes to the hash ``h``, a MiB at a time (weight files can be larger than memory)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def a1111_parameters(recipe: dict) -> str:
    """The A1111 'parameters' text: prompt, negative prompt, then 'Steps: 20, Sampler: ..., Seed: 3, ...'."""
    opts = recipe.get("options", {})
    lines = [recipe.get("prompt") or ""]
    if opts.get("negative_prompt"):
        lines.append(f"Negative prompt: {opts['negative_prompt']}")
    fields = []
    if "steps" in opts:
        fields.append(f"Steps: {opts['steps']}")
    if "sampler" in opts:
        from engine.samplers import A1111_NAMES

        fields.append(f"Sampler: {A1111_NAMES.get(opts['sampler'], opts['sampler'])}")
    if "guidance" in opts:
        fields.append(f"CFG scale: {opts['guidance']}")
    fields.append(f"Seed: {recipe.get('seed')}")
    if recipe.get("width"):
        fields.append(f"Size: {recipe['width']}x{recipe['height']}")
    model = recipe.get("model") or {}
    if model.get("autov2") or model.get("hash"):  # A1111's AutoV2 of the checkpoint file when it was imported as one
        fields.append(f"Model hash: {model.get('autov2') or model['hash'][:10]}")
    if model.get("name"):
        fields.append(f"Model: {model['name']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict:
    """Read back prompt, negative prompt, seed and the other 'Key: value' fields of an A1111 parameters chunk."""
    lines = text.strip("\n").split("\n")
    out: dict = {"prompt": "", "options": {}}
    last = lines[-1] if lines else ""
    has_fields = ":" in last and ("Steps:" in last or "Seed:" in last)
    body = lines[:-1] if has_fields else lines
    prompt_lines, neg = [], None
    for line in body:
        if line.startswith("Negative prompt:"):
            neg = line[len("Negative prompt:"):].strip()
        elif neg is not None:
            neg += "\n" + line
        else:
            prompt_lines.append(line)
    out["prompt"] = "\n".join(prompt_lines)
    if neg:
        out["options"]["negative_prompt"] = neg
    if has_fields:
        for part in last.split(","):
            if ":" not in part:
                continue
            key, value = (s.strip() for s in part.split(":", 1))
            if key == "Seed":
                try:
                    out["seed"] = int(value)
                except ValueError:
                    pass
            elif key == "Steps":
                try:
                    out["options"]["steps"] = int(value)
                except ValueError:
                    pass
            elif key == "CFG scale":
                try:
                    out["options"]["guidance"] = float(value)
                except ValueError:
                    pass
            elif key == "Sampler":
                from engine.samplers import A1111_NAMES

                ours = {v.lower(): k for k, v in A1111_NAMES.items()}
                out["options"]["sampler"] = ours.get(value.lower(), value)
    return out


def png_bytes(image, recipe: dict) -> bytes:
    """Encode a PIL image as PNG with an A1111 ``parameters`` chunk and a ``studio`` chunk (full JSON recipe)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(recipe))
    info.add_text("studio", json.dumps(recipe, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_recipe(path: Path) -> dict:
    """The recipe a PNG carries: the studio chunk when present, else what the A1111 chunk says.

    Returns ``{}`` for a PNG without metadata; raises UsageError when the file is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except Image.DecompressionBombError:
        raise UsageError(f"{path} is too large to read safely (a possible decompression bomb).") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"Cannot read {path} as an image ({exc}).") from None
    if "studio" in text:
        try:
            return json.loads(text["studio"])
        except ValueError:
            pass
    if "parameters" in text:
        found = parse_a1111_parameters(text["parameters"])
        found["source"] = "a1111"
        return found
    return {}


def sidecar_of(path: Path) -> Path:
    """The recipe file beside a text or audio output: ``hello.wav.json`` (the whole name, so that ``notes.txt``
    never touches an unrelated ``notes.json`` and ``hello.wav`` and ``hello.flac`` keep one recipe each)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _recipe_bytes(recipe: dict) -> bytes:
    return json.dumps(recipe, indent=2, sort_keys=True).encode()


def text_files(path: Path, text: str, recipe: dict) -> list[tuple[Path, bytes]]:
    return [(Path(path), text.encode("utf-8")), (sidecar_of(path), _recipe_bytes(recipe))]


def png_files(path: Path, image, recipe: dict) -> list[tuple[Path, bytes]]:
    return [(Path(path), png_bytes(image, recipe))]


def audio_files(path: Path, audio, sample_rate: int, recipe: dict) -> list[tuple[Path, bytes]]:
    """WAV or FLAC (by suffix) through soundfile, with a JSON sidecar."""
    import soundfile as sf

    path = Path(path)
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"Audio can be saved as .wav or .flac, not {path.suffix or 'a file without a suffix'}.")
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format=fmt)
    return [(path, buf.getvalue()), (sidecar_of(path), _recipe_bytes(recipe))]


def _write_all(files: list[tuple[Path, bytes]]) -> list[Path]:
    return [atomic_write_bytes(p, data) for p, data in files]


def write_text(path: Path, text: str, recipe: dict) -> list[Path]:
    """Write ``text`` and its recipe sidecar (``sidecar_of``). Returns both paths."""
    return _write_all(text_files(path, text, recipe))


def write_png(path: Path, image, recipe: dict) -> list[Path]:
    return _write_all(png_files(path, image, recipe))


def write_audio(path: Path, audio, sample_rate: int, recipe: dict) -> list[Path]:
    return _write_all(audio_files(path, audio, sample_rate, recipe))
