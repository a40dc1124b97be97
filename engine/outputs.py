"""Atomic output writers: text with a JSON sidecar, PNG with recipe chunks, audio through soundfile."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from engine.errors import StateError, UsageError


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


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, then rename: never a partial file at ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StateError(f"Cannot write to {path.parent} ({exc.strerror}); choose a writable output folder.") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise StateError(f"Cannot write {path} ({exc.strerror}).") from None
        raise
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        fields.append(f"Sampler: {opts['sampler']}")
    if "guidance" in opts:
        fields.append(f"CFG scale: {opts['guidance']}")
    fields.append(f"Seed: {recipe.get('seed')}")
    if recipe.get("width"):
        fields.append(f"Size: {recipe['width']}x{recipe['height']}")
    model = recipe.get("model") or {}
    if model.get("hash"):
        fields.append(f"Model hash: {model['hash'][:10]}")
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
                out["options"]["sampler"] = value
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
    except (UnidentifiedImageError, OSError) as exc:
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


def sidecar(path: Path) -> Path:
    """The recipe file beside a text or audio output: its full name plus ``.json`` (``notes.txt.json``), so it
    can never be another file's (``notes.json``) or shared by two outputs (``hello.wav`` and ``hello.flac``)."""
    return Path(path).with_name(Path(path).name + ".json")


def render(path: Path, text=None, image=None, audio=None, recipe: Optional[dict] = None) -> list:
    """The bytes of an output and its recipe file: [(path, bytes), ...], the output first. Nothing is written."""
    path = Path(path)
    recipe_bytes = json.dumps(recipe or {}, indent=2, sort_keys=True).encode()
    if image is not None:
        if path.suffix.lower() != ".png":
            raise UsageError(f"Images are saved as .png; {path.name} has another suffix.")
        return [(path, png_bytes(image, recipe or {}))]
    if audio is not None:
        import soundfile as sf

        data, rate = audio
        fmt = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
        if fmt is None:
            raise UsageError(f"Audio can be saved as .wav or .flac, not {path.suffix or 'a file without a suffix'}.")
        buf = io.BytesIO()
        sf.write(buf, data, rate, format=fmt)
        return [(path, buf.getvalue()), (sidecar(path), recipe_bytes)]
    return [(path, (text or "").encode("utf-8")), (sidecar(path), recipe_bytes)]


def _temp(folder: Path, data: bytes) -> Path:
    """A complete, synced temporary file in ``folder`` with the umask's mode (the first half of every write)."""
    fd, tmp = tempfile.mkstemp(prefix=".studio-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        _unlink(Path(tmp))
        raise
    return Path(tmp)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _folder(folder: Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"Cannot make the folder {folder}: a file of that name is in the way.") from None
    except NotADirectoryError:
        raise UsageError(f"Cannot make the folder {folder}: part of that path is a file, not a folder.") from None
    except OSError as exc:
        raise StateError(f"Cannot make the folder {folder} ({exc.strerror}).") from None
    return folder


def save(parts: list, replace_named: bool = True) -> list[Path]:
    """Write ``parts`` ([(path, bytes)], from ``render``) all or nothing: every file is first written completely
    to a temporary file beside it, then moved into place; a failure (a full disk, say) removes what this call
    wrote and leaves no partial file. The first path is the one the user named: it replaces an existing file
    when ``replace_named``; the others (a recipe file) never replace a file that is not an earlier recipe."""
    folder = _folder(Path(parts[0][0]).parent)
    for i, (path, _) in enumerate(parts):  # every check before anything is replaced
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"{path} is a folder; name a file, or end the name with / to write into it.")
        if i and path.exists() and not _is_recipe(path):
            raise UsageError(f"{path} exists and is not a recipe the studio wrote; it is left alone, so the output "
                             "was not saved. Choose another name.")
        if i == 0 and path.exists() and not replace_named:
            raise UsageError(f"{path} exists; choose another name.")
    temps, placed = [], []
    try:
        for path, data in parts:
            temps.append(_temp(folder, data))
        for (path, _), tmp in reversed(list(zip(parts, temps))):  # the named file last: it may replace one
            os.replace(tmp, path)
            placed.append(Path(path))
    except BaseException as exc:
        for tmp in temps:
            _unlink(tmp)
        for path in placed:
            _unlink(path)
        if isinstance(exc, OSError):
            raise StateError(f"Cannot write {parts[0][0]} ({exc.strerror}); nothing was saved.") from None
        raise
    return placed[::-1]


def save_new(folder: Path, stem: str, ext: str, make_parts) -> list[Path]:
    """``save`` under the first free name ``stem.ext``, ``stem-1.ext``, ... in ``folder``: each candidate is
    claimed with a hard link, which fails if the name exists, so two processes never get the same name and no
    existing file is replaced. ``make_parts(path)`` renders the parts for a candidate name."""
    folder = _folder(folder)
    n = 0
    while True:
        path = folder / (f"{stem}.{ext}" if n == 0 else f"{stem}-{n}.{ext}")
        n += 1
        parts = make_parts(path)
        if any(Path(p).exists() for p, _ in parts):
            continue
        temps, claimed = [], []
        try:
            for p, data in parts:
                temps.append(_temp(folder, data))
            for (p, _), tmp in zip(parts, temps):
                os.link(tmp, p)  # atomic create-if-absent, with the whole content
                claimed.append(Path(p))
        except FileExistsError:
            for p in claimed:
                _unlink(p)
            continue
        except OSError as exc:
            for p in claimed:
                _unlink(p)
            raise StateError(f"Cannot write into {folder} ({exc.strerror}); nothing was saved.") from None
        finally:
            for tmp in temps:
                _unlink(tmp)
        return claimed


def _is_recipe(path: Path) -> bool:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "generator" in data and "studio_version" in data


def write_text(path: Path, text: str, recipe: dict) -> list[Path]:
    """Write ``text`` and its recipe file (``sidecar``). Returns both paths."""
    return save(render(path, text=text, recipe=recipe))


def write_png(path: Path, image, recipe: dict) -> list[Path]:
    return save(render(path, image=image, recipe=recipe))


def write_audio(path: Path, audio, sample_rate: int, recipe: dict) -> list[Path]:
    """Write WAV or FLAC (by suffix) through soundfile, with its recipe file."""
    return save(render(path, audio=(audio, sample_rate), recipe=recipe))
