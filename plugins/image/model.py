"""The text-to-image model folder: config, building the networks, loading and saving.

Folder layout:
  config.json        {"model_type": "studio-text-to-image", "sample_size": 32, "coord_channels": 2,
                      "unet": <diffusers UNet2DConditionModel config>, "text_encoder": <transformers CLIPTextConfig>,
                      "scheduler": <diffusers scheduler config: beta schedule, prediction type>}
  model.safetensors  "unet.<diffusers name>" and "text_encoder.<transformers name>"
  tokenizer.json     word-level tokenizer ([PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3)
  studio.json        generator, family, recipe, scores
The U-Net sees the noisy RGB image plus ``coord_channels`` fixed maps (x, y in [-1, 1]), and the text
encoder's pooled output (``"class_labels": "pooled"``) or the mean of its hidden states (``"mean"``) as its
class embedding (class_embed_type "projection"), besides cross-attention to the hidden states.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelError

MODEL_TYPE = "studio-text-to-image"


@dataclass
class ImageModelConfig:
    raw: dict
    sample_size: int
    coord_channels: int
    unet: object  # UNetConfig
    text: object  # CLIPTextConfig
    scheduler: object  # SchedulerConfig
    class_labels: str = "pooled"  # what the U-Net's class embedding sees: "pooled" (EOS state) or "mean" (of hidden)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageModelConfig":
        from engine.nn.clip_text import CLIPTextConfig
        from engine.diffusion.schedulers import SchedulerConfig
        from engine.nn.unet import UNetConfig
        if d.get("model_type") != MODEL_TYPE:
            raise ModelError(f"config.json model_type must be {MODEL_TYPE!r}, not {d.get('model_type')!r}.")
        for key in ("unet", "text_encoder", "scheduler", "sample_size"):
            if key not in d:
                raise ModelError(f"config.json has no {key!r} entry; this is not a studio text-to-image model.")
        unet = UNetConfig.from_dict(d["unet"])
        text = CLIPTextConfig.from_dict(d["text_encoder"])
        coord = int(d.get("coord_channels", 0))
        if unet.in_channels != 3 + coord or unet.out_channels != 3:
            raise ModelError("The U-Net must take 3 image channels plus coord_channels and return 3 channels.")
        if unet.cross_attention_dim != text.hidden_size:
            raise ModelError("The U-Net's cross_attention_dim must equal the text encoder's hidden_size.")
        if unet.class_embed_type == "projection" and unet.projection_class_embeddings_input_dim != text.hidden_size:
            raise ModelError("The U-Net's projection_class_embeddings_input_dim must equal the text encoder's hidden_size.")
        class_labels = d.get("class_labels", "pooled")
        if class_labels not in ("pooled", "mean"):
            raise ModelError(f"config.json class_labels must be 'pooled' or 'mean', not {class_labels!r}.")
        return cls(d, int(d["sample_size"]), coord, unet, text, SchedulerConfig.from_dict(d["scheduler"]), class_labels)


def read_config(folder: Path) -> ImageModelConfig:
    from engine.configs import read_json

    return ImageModelConfig.from_dict(read_json(Path(folder) / "config.json", "a config.json"))


def build(cfg: ImageModelConfig):
    """Fresh (randomly initialised) U-Net and text encoder."""
    from engine.nn.clip_text import CLIPTextModel
    from engine.nn.unet import UNet2DConditionModel
    return UNet2DConditionModel(cfg.unet), CLIPTextModel(cfg.text)


def _read_weights(folder: Path) -> dict:
    from engine.weights import load_state_dict
    return load_state_dict(folder)


def split_state_dict(sd: dict):
    from engine.nn.clip_text import strip_prefix
    unet = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
    text = strip_prefix({k[13:]: v for k, v in sd.items() if k.startswith("text_encoder.")})
    return unet, text


def check_folder(folder: Path) -> None:
    """Validate config, weights (names and shapes) and tokenizer; ModelError on the first problem."""
    import torch
    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        unet, text = build(cfg)
    _check_built(folder, cfg, unet, text)


def _check_built(folder: Path, cfg, unet, text) -> None:
    from engine.weights import match_state_dict

    u, t = split_state_dict(_read_weights(folder))
    match_state_dict(unet, u, "unet")
    match_state_dict(text, t, "text_encoder")
    from plugins.image.tokenizer import PromptEncoder
    enc = PromptEncoder.from_file(folder / "tokenizer.json", cfg.text.max_position_embeddings)
    if enc.tokenizer.get_vocab_size() > cfg.text.vocab_size:
        raise ModelError("tokenizer.json has more tokens than the text encoder's vocab_size.")


@dataclass
class LoadedModel:
    cfg: ImageModelConfig
    unet: object
    text_encoder: object
    prompt_encoder: object
    device: str
    dtype: object


def load(folder: Path, device: str = "cpu", dtype=None) -> LoadedModel:
    """The model on ``device`` in ``dtype`` (default fp16 on CUDA, fp32 on the CPU)."""
    import torch
    from plugins.image.tokenizer import PromptEncoder
    folder = Path(folder)
    cfg = read_config(folder)
    unet, text = build(cfg)
    _check_built(folder, cfg, unet, text)  # checks against the built modules: no meta build on the load path
    u, t = split_state_dict(_read_weights(folder))
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    unet.load_state_dict({k: v.float() for k, v in u.items()})
    text.load_state_dict({k: v.float() for k, v in t.items()})
    unet.to(device=device, dtype=dtype).eval()
    text.to(device=device, dtype=dtype).eval()
    enc = PromptEncoder.from_file(folder / "tokenizer.json", cfg.text.max_position_embeddings)
    return LoadedModel(cfg, unet, text, enc, device, dtype)


def save(folder: Path, config: dict, unet, text_encoder, tokenizer, studio: dict | None = None) -> None:
    """Write config.json, model.safetensors (float16), tokenizer.json and (optionally) studio.json."""
    import torch
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v.detach().to("cpu", torch.float16).contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.detach().to("cpu", torch.float16).contiguous()
                    for k, v in text_encoder.state_dict().items()})
    from engine.outputs import replacing

    with replacing(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(0o644)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(folder / "tokenizer.json"))
    if studio is not None:
        (folder / "studio.json").write_text(json.dumps(studio, indent=2) + "\n")
