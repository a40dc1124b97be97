"""A diffusers Stable Diffusion pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) converted into the studio's layout (layout.py): fp32, fp16 or bf16 weights as
they are, one file or shards, the ``.fp16`` variant files when they are the only ones."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelError
from plugins.stable_diffusion.layout import COMPONENTS

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
REFUSED = {"StableDiffusionXLPipeline": "SDXL", "StableDiffusionXLImg2ImgPipeline": "SDXL",
           "StableDiffusion3Pipeline": "Stable Diffusion 3", "FluxPipeline": "FLUX",
           "StableCascadeCombinedPipeline": "Stable Cascade"}


def detect(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder."""
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"The pipeline folder has no {what} ({path.parent.name}/{path.name}).") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} cannot be read ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object; the pipeline folder is damaged.")
    return data


def _weights(folder: Path, stem: str, trust: bool) -> dict:
    """The component's tensors: ``stem.safetensors``, its shards, or the ``.fp16`` variant of either; a pickle
    only with ``trust``."""
    from safetensors.torch import load_file

    for variant in ("", ".fp16"):
        single = folder / f"{stem}{variant}.safetensors"
        if single.is_file():
            return _load(load_file, single)
        index = folder / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            names = sorted(set(_json(index, index.name).get("weight_map", {}).values()))
            out = {}
            for name in names:
                out.update(_load(load_file, folder / name))
            return out
    pickles = sorted(folder.glob(f"{stem}*.bin"))
    if pickles:
        if not trust:
            raise ModelError(f"{folder.name}/{pickles[0].name} is a pickle, which can run code when loaded; pass "
                             "--trust if you trust this file.")
        from engine.weights import load_pickle

        return {k: v for k, v in load_pickle(pickles[0]).items() if hasattr(v, "shape")}
    raise ModelError(f"The pipeline folder's {folder.name}/ holds no {stem}.safetensors (nor shards or an .fp16 "
                     "variant).")


def _load(load_file, path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file
        raise ModelError(f"{path.parent.name}/{path.name} cannot be read as safetensors ({exc}); it may be "
                         "truncated: download it again.") from None


def _from_tokenizer_json(tok: Path, dest: Path) -> Path:
    """vocab.json + merges.txt from a byte-level BPE ``tokenizer.json`` (what transformers 5 saves for CLIP), in a
    scratch folder beside ``dest``."""
    data = _json(tok / "tokenizer.json", "tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelError(f"{tok}/tokenizer.json is not a BPE tokenizer; a CLIP tokenizer is expected.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    out = Path(dest).parent / f".{Path(dest).name}-tokenizer"
    out.mkdir(exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def variant_name(text_hidden: int, prediction: str, in_channels: int) -> str:
    base = {768: "sd1", 1024: "sd2"}.get(text_hidden, f"clip{text_hidden}")
    if prediction == "v_prediction":
        base += "-v"
    return base + ("-inpainting" if in_channels == 9 else "")


def convert(path: Path, dest: Path, trust: bool = False) -> None:
    """Write the studio layout of the pipeline folder ``path`` into the empty folder ``dest``."""
    from plugins.stable_diffusion.layout import write_folder

    path = Path(path)
    index = _json(path / "model_index.json", "model_index.json")
    kind = index.get("_class_name", "")
    if kind in REFUSED:
        raise ModelError(f"{path.name} is a {REFUSED[kind]} pipeline ({kind}); the studio runs Stable Diffusion "
                         "1.x and 2.x so far.")
    configs, tensors = {}, {}
    for comp in COMPONENTS:
        folder = path / comp
        if not folder.is_dir():
            raise ModelError(f"{path.name} has no {comp}/ folder; a Stable Diffusion pipeline needs unet/, vae/, "
                             "text_encoder/, tokenizer/ and scheduler/.")
        configs[comp] = {k: v for k, v in _json(folder / "config.json", f"{comp}/config.json").items()
                         if not k.startswith("_") or k == "_class_name"}
        tensors.update({f"{comp}.{k}": v for k, v in _weights(folder, WEIGHT_NAMES[comp], trust).items()})
    scheduler = _json(path / "scheduler" / "scheduler_config.json", "scheduler/scheduler_config.json")
    tok = path / "tokenizer"
    if not all((tok / n).is_file() for n in ("vocab.json", "merges.txt")):
        tok = _from_tokenizer_json(tok, dest)
    special = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (tok / name).is_file():
            special.update({k: v for k, v in _json(tok / name, name).items() if k == "pad_token"})
    pad = special.get("pad_token", "<|endoftext|>")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):  # refused now, not at every generation after the import
        raise ModelError(f"The scheduler's prediction_type {str(prediction)[:40]!r} is not supported (the studio runs "
                         "epsilon and v_prediction models).")
    in_channels = int(configs["unet"].get("in_channels", 4))
    config = {**configs, "scheduler": {k: v for k, v in scheduler.items() if not k.startswith("_")},
              "prediction_type": prediction, "in_channels": in_channels,
              "variant": variant_name(int(configs["text_encoder"].get("hidden_size", 0)), prediction, in_channels),
              "tokenizer": {"pad_token": pad}, "source_format": "diffusers"}
    write_folder(dest, tensors, config, tok)
    if tok.name.endswith("-tokenizer"):
        import shutil

        shutil.rmtree(tok, ignore_errors=True)
