"""The studio's folder layout for a Stable Diffusion model: what every import (a diffusers pipeline folder, a
single-file LDM checkpoint) writes, and what the pipeline, LoRA and ONNX export read.

    config.json         {"model_type": "stable-diffusion", "variant": "sd1" | "sd2" | "sd2-v" | ...,
                         "prediction_type": "epsilon" | "v_prediction", "in_channels": 4 | 9,
                         "unet": {...}, "vae": {...}, "text_encoder": {...}, "scheduler": {...}}
                        (each component's config as diffusers saves it in <component>/config.json, and the
                        scheduler's scheduler_config.json)
    model.safetensors   every weight under diffusers' key names, prefixed by component:
                        "unet.<key>", "vae.<key>", "text_encoder.<key>"; dtype kept as given (fp32/fp16/bf16)
    vocab.json, merges.txt   the CLIP BPE tokenizer

One weight file keeps the store's rules (hashing, listing, checking) the same for every family; the ONNX export
writes Optimum's per-component folders from it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_TYPE = "stable-diffusion"
COMPONENTS = ("unet", "vae", "text_encoder")


def write_folder(dest: Path, tensors: dict, config: dict, tokenizer_dir: Path) -> None:
    """Write the layout into the (existing, empty) folder ``dest``: ``tensors`` maps prefixed diffusers key names
    ("unet.conv_in.weight", ...) to torch tensors; ``config`` holds the keys above (model_type is set here);
    ``tokenizer_dir`` holds vocab.json and merges.txt."""
    from safetensors.torch import save_file

    dest = Path(dest)
    bad = sorted({k.split(".", 1)[0] for k in tensors} - set(COMPONENTS))
    if bad:
        raise ValueError(f"unexpected weight prefixes {bad}; expected {COMPONENTS}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps({**config, "model_type": MODEL_TYPE}, indent=2, sort_keys=True))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(tokenizer_dir) / name, dest / name)


def split(tensors: dict) -> dict:
    """{component: {key: tensor}} from the prefixed names of model.safetensors."""
    out = {c: {} for c in COMPONENTS}
    for key, value in tensors.items():
        comp, _, rest = key.partition(".")
        out[comp][rest] = value
    return out
