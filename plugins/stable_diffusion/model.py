"""A Stable Diffusion model folder in the studio's layout (plugins/stable_diffusion/layout.py): read, check, load.

The networks are the shared ones (engine/nn/unet.py, clip_text.py, vae.py), which take diffusers' and
transformers' parameter names as they are. No torch at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.configs import read_json
from engine.errors import ModelError
from plugins.stable_diffusion.layout import COMPONENTS, MODEL_TYPE


def read_config(folder: Path) -> dict:
    cfg = read_json(Path(folder) / "config.json", "a config.json")
    if cfg.get("model_type") != MODEL_TYPE:
        raise ModelError(f"{folder} is not a Stable Diffusion folder (model_type {cfg.get('model_type')!r}).")
    missing = [c for c in (*COMPONENTS, "scheduler") if not isinstance(cfg.get(c), dict)]
    if missing:
        raise ModelError(f"config.json in {folder} lacks the {', '.join(missing)} config; import the model again.")
    return cfg


def build(cfg: dict) -> dict:
    """Fresh modules {component: module} from the folder's config (ModelError for what the studio cannot run)."""
    from engine.nn.clip_text import CLIPTextConfig, CLIPTextModel
    from engine.nn.unet import UNet2DConditionModel, UNetConfig
    from engine.nn.vae import AutoencoderKL, VAEConfig

    unet = UNetConfig.from_dict(cfg["unet"])
    if unet.in_channels not in (4, 9):
        raise ModelError(f"The U-Net takes {unet.in_channels} input channels; Stable Diffusion U-Nets take 4 "
                         "(text to image) or 9 (inpainting).")
    return {"unet": UNet2DConditionModel(unet), "vae": AutoencoderKL(VAEConfig.from_dict(cfg["vae"])),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))}


def read_weights(folder: Path) -> dict:
    """{component: state dict} from model.safetensors (prefixes stripped; transformers 4 text keys accepted)."""
    from engine.nn.clip_text import strip_prefix
    from engine.weights import load_state_dict
    from plugins.stable_diffusion.layout import split

    parts = split(load_state_dict(folder))
    parts["text_encoder"] = strip_prefix(parts["text_encoder"])
    return parts


def check_folder(folder: Path) -> None:
    """Config, weight names and shapes, and the tokenizer; ModelError with the first problem."""
    import torch

    from engine.weights import match_state_dict
    from plugins.stable_diffusion.tokenizer import ClipTokenizer

    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):
        modules = build(cfg)
    parts = read_weights(folder)
    for name, module in modules.items():
        match_state_dict(module, parts[name], name)
    ClipTokenizer(folder, (cfg.get("tokenizer") or {}).get("pad_token", "<|endoftext|>"))


@dataclass
class LoadedSD:
    cfg: dict
    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler: object  # engine.diffusion.schedulers.SchedulerConfig
    device: str
    dtype: object

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 9


def load(folder: Path, device: str = "cpu", dtype=None) -> LoadedSD:
    """The model on ``device`` in ``dtype`` (default fp16 on CUDA, fp32 on the CPU; the VAE always fp32), weights
    checked against the config."""
    import torch

    from engine.diffusion.schedulers import SchedulerConfig
    from engine.weights import match_state_dict
    from plugins.stable_diffusion.tokenizer import ClipTokenizer

    folder = Path(folder)
    cfg = read_config(folder)
    with torch.device("meta"):  # no random initialisation, no second copy: the modules take the loaded tensors
        modules = build(cfg)
    parts = read_weights(folder)
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    for name, module in modules.items():
        match_state_dict(module, parts[name], name)
        module.load_state_dict({k: v.float() for k, v in parts.pop(name).items()}, assign=True)
        module.to(device=device, dtype=torch.float32 if name == "vae" else dtype).eval()  # the VAE stays fp32
    tok = ClipTokenizer(folder, (cfg.get("tokenizer") or {}).get("pad_token", "<|endoftext|>"))
    return LoadedSD(cfg, modules["unet"], modules["vae"], modules["text_encoder"], tok,
                    SchedulerConfig.from_dict(cfg["scheduler"]), device, dtype)
