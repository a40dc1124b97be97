"""Caption a whole folder: a caption file beside every image (``photo.png`` -> ``photo.txt``), the convention of
kohya's trainers and AUTOMATIC1111's dataset tools.

``plan_folder`` lists the images and decides, before any work, which ones get a caption (existing caption files
are kept unless ``overwrite``); ``caption_folder`` runs the caption generator over the plan in batches (through
the generator's ``batch`` function when it has one), writes each caption atomically as soon as its batch is done
(so a stopped run resumes where it stopped: the next run keeps what is written), records each caption as a history
row that ``studio history replay`` can rerun, and skips unreadable images with a note. Used by the CLI
(``studio caption-folder``) and the GUI's folder page alike.
"""
from __future__ import annotations

import codecs
import os
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from engine import outputs as out_mod
from engine.errors import CancelledError, StudioError, UsageError
from engine.datasets import IMAGE_SUFFIXES
from engine.generators import Context, Result


@dataclass
class FolderPlan:
    folder: Path
    ext: str
    todo: list = field(default_factory=list)  # image paths to caption
    kept: list = field(default_factory=list)  # image paths whose caption file exists and is kept

    @property
    def total(self) -> int:
        return len(self.todo) + len(self.kept)

    def caption_path(self, image: Path) -> Path:
        return image.with_suffix(self.ext)


@dataclass
class FolderItem:
    """One image done: its caption (None when skipped), the caption file written, the note when skipped."""
    image: Path
    caption: Optional[str] = None
    path: Optional[Path] = None
    note: str = ""
    history_id: Optional[int] = None


@dataclass
class FolderReport:
    written: list = field(default_factory=list)  # FolderItem
    skipped: list = field(default_factory=list)  # FolderItem with a note
    kept: int = 0
    cancelled: bool = False
    seconds: float = 0.0


def plan_folder(folder, ext: str = ".txt", overwrite: bool = False, recursive: bool = False) -> FolderPlan:
    """The images of ``folder`` and which of them need a caption. UsageError, before anything starts, for a
    missing folder, a folder without images, a bad extension or a folder that cannot be written."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"Folder {folder} does not exist or is not a folder.")
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() in IMAGE_SUFFIXES or len(ext) < 2 or any(c in ext for c in "/\\"):
        raise UsageError(f"The caption extension {ext!r} is not usable; give one such as .txt or .caption.")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(p for p in pattern if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not p.name.startswith("."))
    if not images:
        kinds = " ".join(IMAGE_SUFFIXES)
        where = " or its subfolders" if recursive else " (add --recursive to look in subfolders)"
        raise UsageError(f"Folder {folder}{where} has no images ({kinds}).")
    plan = FolderPlan(folder, ext)
    shared: dict = {}
    for image in images:
        shared.setdefault(plan.caption_path(image), []).append(image)
    clashes = [names for names in shared.values() if len(names) > 1]
    if clashes:  # a.png and a.jpg: one caption file, written twice (and a trainer pairs it with one of them)
        first = clashes[0]
        raise UsageError(f"{first[0].name} and {first[1].name} would share the caption file "
                         f"{plan.caption_path(first[0]).name}" + (f" ({len(clashes) - 1} more such pairs)" if
                                                                  len(clashes) > 1 else "")
                         + "; rename one of them so that each image has its own caption.")
    for image in images:
        target = plan.caption_path(image)
        if target.is_dir() or (overwrite and target.exists() and not _text_file(target)):
            raise UsageError(f"{target} is not a caption file ({'a folder' if target.is_dir() else 'not text'}), so "
                             f"the caption of {image.name} cannot go there; choose another --ext.")
        (plan.todo if overwrite or not target.exists() else plan.kept).append(image)
    for parent in sorted({p.parent for p in plan.todo}):
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"Folder {parent} is read-only, so no caption file can be written beside its images; "
                             "make it writable or copy the images to a writable folder.")
    return plan


def _text_file(path: Path) -> bool:
    """Whether a file looks like text (a caption file that --overwrite may replace): its first 4 kB are UTF-8 (with
    or without a byte-order mark) without NUL bytes, or an 8-bit text (Latin-1, cp1252: no control bytes but white
    space), or UTF-16 / UTF-32 with a byte-order mark, or UTF-16 without one whose characters are all ones a text
    holds (no controls but white space). An image or other binary file named like a
    caption is never replaced."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        text = _decoded(head, "utf-32")
        return text is not None and "\0" not in text
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = _decoded(head, "utf-16")  # (the codec takes the byte order from the mark)
        return text is not None and "\0" not in text
    if b"\0" not in head:  # UTF-8, or an 8-bit encoding (Latin-1, cp1252: no control bytes but white space)
        return _decoded(head, "utf-8-sig") is not None or all(b >= 0x20 or b in b"\t\n\r\f\v" for b in head)
    for encoding in ("utf-16-le", "utf-16-be"):  # no mark: ASCII text has a NUL byte beside every character
        text = _decoded(head, encoding)
        if text is not None and all(ch in "\t\n\r\f\v" or unicodedata.category(ch) not in NOT_TEXT for ch in text):
            return True
    return False


NOT_TEXT = ("Cc", "Cs", "Co", "Cn")  # controls (NUL...), lone surrogates, private use, unassigned code points


def _decoded(head: bytes, encoding: str) -> Optional[str]:
    """``head`` decoded, or None when it is not in ``encoding``; a character cut at the 4 kB mark is no error."""
    try:
        return codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError:
        return None


def caption_folder(host, store, job, plan: FolderPlan, batch_size: int = 8, context: Optional[Context] = None,
                   on_item: Optional[Callable[[FolderItem, int, int], None]] = None, history=None) -> FolderReport:
    """Caption ``plan.todo`` with the generator, model and options of ``job`` (an engine.runner.Job whose image is
    replaced by each file). ``on_item(item, done, total)`` after each image. Cancelling (``context.cancel``)
    stops after the current batch; everything written so far stays."""
    from engine.history import History
    from engine.runner import prepare

    context = context or Context()
    history = History() if history is None else history
    report = FolderReport(kept=len(plan.kept))
    started = time.perf_counter()
    first = prepare(host, store, _with_image(job, plan.todo[0])) if plan.todo else None
    gen = first.generator if first else None
    done = 0
    for start in range(0, len(plan.todo), max(1, batch_size)):
        if context.cancel.cancelled:
            report.cancelled = True
            break
        images = plan.todo[start:start + batch_size]
        preps = [prepare(host, store, _with_image(job, image)) for image in images]
        t0 = time.perf_counter()
        try:
            results = _run_batch(gen, preps, context)
        except CancelledError:
            report.cancelled = True
            break
        each = round((time.perf_counter() - t0) / len(images), 4)
        for prep, image, result in zip(preps, images, results):
            item = FolderItem(image)
            if isinstance(result, Result):
                item = _write(prep, image, result, plan, each, history)
                report.written.append(item)
            else:
                item.note = str(result)
                report.skipped.append(item)
            done += 1
            if on_item is not None:
                on_item(item, done, len(plan.todo))
    report.seconds = time.perf_counter() - started
    return report


def _with_image(job, image: Path):
    from dataclasses import replace

    return replace(job, image=str(image))


def _run_batch(gen, preps: list, context: Context) -> list:
    """One Result or StudioError per prepared job: the generator's batch function, else one job at a time."""
    if gen.batch is not None:
        return gen.batch([p.request for p in preps], context)
    results = []
    for prep in preps:
        try:
            result = None
            for event in gen.generate(prep.request, context):
                if isinstance(event, Result):
                    result = event
            results.append(result)
        except CancelledError:
            raise
        except StudioError as exc:
            results.append(exc)
    return results


def _write(prep, image: Path, result: Result, plan: FolderPlan, seconds: float, history) -> FolderItem:
    from engine.recipe import recipe_of

    own = result.info.pop("timings", None)
    recipe = recipe_of(prep, result, {**(own if isinstance(own, dict) else {}), "total_s": seconds})
    path = plan.caption_path(image)
    text = (result.text or "").strip()
    out_mod.atomic_write_bytes(path, (text + "\n").encode("utf-8"))
    recipe["path"] = str(path.resolve())
    recipe["folder_caption"] = True
    history_id = history.add(recipe, [{"path": str(path.resolve()), "sha256": out_mod.sha256_file(path)}]) \
        if history is not False else None
    return FolderItem(image, text, path, history_id=history_id)
