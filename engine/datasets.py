"""Fine-tuning datasets the way people keep them, read without torch (the GUI's fine-tune page previews them too).

Text: a folder of ``.txt`` files (searched recursively) or one ``.txt`` file. Images: a folder of images, each with
a same-named ``.txt`` caption beside it (``star1.png`` + ``star1.txt``), the kohya / AUTOMATIC1111 convention.
"""
from __future__ import annotations

from pathlib import Path

from engine.errors import UsageError

# the images the studio reads (engine/images.py FORMATS), wherever a folder of them is taken: captioning a folder,
# a fine-tuning dataset, the queue's --folder, files dropped on the window
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def text_files(path: Path) -> list:
    """The files ``read_documents`` reads: ``path`` itself, or the .txt files under the folder ``path``, sorted;
    UsageError when it does not exist or when every file is empty (found without reading them)."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    else:
        raise UsageError(f"{path} does not exist; give a folder of .txt files or one .txt file.")
    if not any(f.stat().st_size for f in files):
        raise UsageError(f"{path} holds no text to train on (no non-empty .txt files).")
    return files


def read_documents(path: Path) -> dict:
    """{name: text} of a .txt file or of the .txt files in a folder; UsageError when there is no text."""
    path = Path(path).expanduser()
    files = text_files(path)
    docs = {}
    for f in files:
        try:
            text = f.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not text
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{f} cannot be read as UTF-8 text ({exc}).") from None
        if text.strip():
            docs[str(f.relative_to(path) if path.is_dir() else f.name)] = text
    if not docs:
        raise UsageError(f"{path} holds no text to train on (no non-empty .txt files).")
    return docs


def read_pairs(folder: Path) -> tuple:
    """([(image path, caption)], [images without a caption]); UsageError for an empty or missing folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give a folder of images with same-named .txt captions.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise UsageError(f"{folder} holds no images ({' '.join(IMAGE_SUFFIXES)}).")
    pairs, missing = [], []
    for img in images:
        cap = img.with_suffix(".txt")
        if cap.is_file():
            try:
                pairs.append((img, cap.read_text(encoding="utf-8-sig").strip()))
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"The caption {cap} cannot be read as UTF-8 text ({exc}).") from None
        else:
            missing.append(img.name)
    return pairs, missing


def captioned_images(folder: Path) -> list:
    """[(image path, caption)] of a folder in which every image has its caption; UsageError naming the count of
    images without one (a fine-tuner on the command line refuses rather than guess)."""
    pairs, missing = read_pairs(folder)
    if missing:
        raise UsageError(f"{len(missing)} image(s) in {folder} have no same-named .txt caption ({missing[0]}, ...); "
                         "write them first, for example with `studio caption-folder`.")
    return pairs
