"""`studio models merge-lora`: fold LoRA adapters into a copy of a model, imported as a new model.

The merge works on the weight files, so it is the same for every family: each adapted layer's ``<path>.weight``
gains ``weight * alpha / r * B @ A`` (engine.nn.lora.merge_into_state). The new model keeps the base model's
config and tokenizer files and records in its studio.json what it was made from.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from engine.errors import UsageError

SKIP = {"studio.json", "model.safetensors", "model.safetensors.index.json"}


def merge_lora(store, base: str, loras: list, name: str):
    """Merge ``loras`` ("PATH[:WEIGHT]") into model ``base``; import and return the new ModelEntry ``name``."""
    import torch
    from safetensors.torch import save_file

    from engine.nn.lora import merge_into_state, read_adapter
    from engine.runner import adapter_ref
    from engine.weights import find_weight_files, load_state_dict

    if not loras:
        raise UsageError("Give at least one LoRA to merge (a .safetensors file or a PEFT adapter folder).")
    entry = store.get(base)
    refs = [adapter_ref(spec) for spec in loras]
    state = load_state_dict(entry.path)
    dtypes = {k: v.dtype for k, v in state.items()}
    paths = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    for ref in refs:
        merge_into_state(state, read_adapter(ref.path, {"unet": paths, "text_encoder": paths}), ref.weight)
    tmp = Path(tempfile.mkdtemp(prefix=f"merge-{name}-"))
    try:
        folder = tmp / name
        folder.mkdir()
        weight_names = {p.name for p in find_weight_files(entry.path)}
        for item in Path(entry.path).iterdir():
            if item.is_file() and not item.is_symlink() and item.name not in SKIP | weight_names:
                shutil.copy2(item, folder / item.name)
        save_file({k: v.to(dtypes[k]).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        studio = {k: v for k, v in (entry.studio or {}).items() if k not in ("hash", "imported_from", "onnx")}
        studio.update({"title": f"{entry.title or entry.name} + {', '.join(r.name for r in refs)}",
                       "merged_from": {"model": {"name": entry.name, "hash": entry.hash},
                                       "loras": [r.to_dict() for r in refs]}})
        (folder / "studio.json").write_text(json.dumps(studio, indent=2) + "\n")
        del state
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        return store.import_(folder, name=name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
