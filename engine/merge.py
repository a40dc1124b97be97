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
    from engine.nn.new_tokens import merge_tokens
    from engine.runner import adapter_ref
    from engine.weights import find_weight_files, load_state_dict

    if not loras:
        raise UsageError("Give at least one LoRA to merge (a .safetensors file or a PEFT adapter folder).")
    entry = store.get(base)
    refs = [adapter_ref(spec) for spec in loras]
    state = load_state_dict(entry.path)
    dtypes = {k: v.dtype for k, v in state.items()}
    paths = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    grown = None  # (rows before, rows after, the adapter folder's tokenizer.json) of an adapter that adds words
    for ref in refs:
        adapter = read_adapter(ref.path, {"unet": paths, "text_encoder": paths})
        if adapter.tokens:
            rows = merge_tokens(state, adapter.tokens)
            if rows and grown:
                raise UsageError("Two of these LoRAs add words to the vocabulary; merge one of them at a time.")
            folder = Path(ref.path) if Path(ref.path).is_dir() else Path(ref.path).parent
            grown = (*rows, folder / "tokenizer.json") if rows else grown
        merge_into_state(state, adapter, ref.weight)
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
        if grown:
            _grow_vocabulary(folder, *grown)
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


def _grow_vocabulary(folder: Path, before: int, after: int, tokenizer: Path) -> None:
    """A merged adapter added words: every ``vocab_size`` of config.json that was ``before`` becomes ``after``,
    and the adapter's tokenizer.json (which has the words) replaces the base model's."""
    def grow(node):
        if isinstance(node, dict):
            return {k: (after if k == "vocab_size" and v == before else grow(v)) for k, v in node.items()}
        return [grow(v) for v in node] if isinstance(node, list) else node

    config = folder / "config.json"
    config.write_text(json.dumps(grow(json.loads(config.read_text())), indent=2) + "\n")
    if not tokenizer.is_file():
        raise UsageError(f"The LoRA adds words but its folder has no tokenizer.json ({tokenizer.parent}); put the "
                         "tokenizer.json it was trained with beside it.")
    shutil.copy2(tokenizer, folder / "tokenizer.json")
