"""Built-in plugin: ONNX exporters for the built-in model families (``studio export-onnx``).

Registers one export function per family through the ``register_exporters`` hook. torch is imported by the
exporters when they run, never when this module is imported.
"""
from __future__ import annotations

from engine import hookimpl


def _text(model_ref, out_dir, options):
    from engine.onnx.text import export_text

    return export_text(model_ref, out_dir, options)


def _caption(model_ref, out_dir, options):
    from engine.onnx.caption import export_caption

    return export_caption(model_ref, out_dir, options)


def _image(model_ref, out_dir, options):
    from engine.onnx.image import export_image

    return export_image(model_ref, out_dir, options)


FAMILIES = {"llama": _text, "gpt2": _text, "vision-encoder-decoder": _caption, "shapes-diffusion": _image}


@hookimpl
def register_exporters(register):
    for family, export in FAMILIES.items():
        register(family, export)
