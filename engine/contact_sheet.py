"""The contact sheet of a parameter grid: every cell's output in one PNG, the X/Y plot of AUTOMATIC1111.

Columns are the values of the last axis that varies (the second option, else the first, else the seeds, else
the prompts); rows are every combination of the others. Each cell is labelled with what it varied. Text outputs
are drawn as text.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

CELL = 160  # pixels of a cell's content (small images are scaled up, nearest neighbour)
LABEL = 30


def _axes(spec: dict) -> list:
    """[(name, values)] in submission order: prompt, seed, then the options."""
    return [("prompt", spec["prompts"]), ("seed", spec["seeds"]), *spec["axes"].items()]


def _content(job) -> "object":
    from PIL import Image, ImageDraw

    files = (job.result or {}).get("files") or []
    cell = Image.new("RGB", (CELL, CELL), (235, 235, 235))
    draw = ImageDraw.Draw(cell)
    if job.state != "done" or not files:
        draw.text((6, 6), job.state + ("\n" + textwrap.fill(job.error, 24) if job.error else ""), fill=(160, 0, 0))
        return cell
    path = Path(files[0])
    if path.suffix.lower() == ".png" and path.is_file():
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = CELL / max(im.size)
            im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))), Image.NEAREST)
        cell.paste(im, ((CELL - im.width) // 2, (CELL - im.height) // 2))
    else:
        text = (job.result or {}).get("text") or ""
        draw.text((6, 6), "\n".join(textwrap.wrap(text, 26)[:11]), fill=(0, 0, 0))
    return cell


def write_sheet(spec: dict, jobs: list, path: Path) -> Path:
    from PIL import Image, ImageDraw

    from engine.outputs import atomic_write_bytes

    axes = _axes(spec)
    varying = [i for i, (_, values) in enumerate(axes) if len(values) > 1] or [0]
    x = varying[-1]
    x_name, x_values = axes[x]
    by_cell = {}
    for job in jobs:
        key = tuple(job.cell.get(name, 0) for name, _ in axes)
        by_cell[key] = job
    rows: dict = {}
    for key, job in sorted(by_cell.items()):
        rows.setdefault(key[:x] + key[x + 1:], {})[key[x]] = job
    width, height = len(x_values) * CELL, LABEL + len(rows) * (CELL + LABEL)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, value in enumerate(x_values):
        draw.text((c * CELL + 4, 8), f"{x_name}={str(value)[:22]}", fill=(0, 0, 0))
    for r, (row_key, cells) in enumerate(rows.items()):
        top = LABEL + r * (CELL + LABEL)
        others = [(name, values) for i, (name, values) in enumerate(axes) if i != x]
        label = ", ".join(f"{name}={str(values[k])[:40]}" for (name, values), k in zip(others, row_key)
                          if len(values) > 1 or name == "prompt")
        draw.text((4, top + 8), label[: width // 6], fill=(0, 0, 0))
        for c, job in cells.items():
            sheet.paste(_content(job), (c * CELL, top + LABEL))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return atomic_write_bytes(Path(path), buf.getvalue())
