"""A single-file Stable Diffusion checkpoint as A1111 and civitai ship it (``.safetensors``, or a ``.ckpt`` pickle
with ``--trust``), with the original LDM key names (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``), converted into the studio's layout (layout.py) by renaming to diffusers' key names.

The variant comes from keys and shapes: SD 1.x (CLIP ViT-L, ``cond_stage_model.transformer.*``), SD 2.x (OpenCLIP,
``cond_stage_model.model.*``: in_proj split into q/k/v, the last layer dropped as SD 2 reads the penultimate one),
inpainting (a U-Net taking 9 channels). Epsilon or v-prediction is decided as A1111 does: a ``<name>.yaml`` beside
the checkpoint (``parameterization: "v"``) wins; otherwise an SD 2.x U-Net (not inpainting) is run once on a
constant input at t=999 and is v-prediction when its output minus the input averages below -1; SD 1.x and
inpainting models are epsilon. The AutoV2 hash (the first 10 hex digits of the file's sha256) is recorded in
studio.json as ``autov2``.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from engine.errors import ModelError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
REFUSED = (("conditioner.embedders.", "an SDXL checkpoint"),
           ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 checkpoint"),
           ("model.diffusion_model.double_blocks.", "a FLUX checkpoint"), ("double_blocks.", "a FLUX checkpoint"),
           ("model.diffusion_model.label_emb.", "an SD 2.x upscaler or unCLIP checkpoint"))
REQUIRED = {UNET + "input_blocks.0.0.weight": "the U-Net", VAE + "encoder.conv_in.weight": "the VAE"}

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                "positional_embedding": "embeddings.position_embedding.weight",
                "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "skip_prk_steps": True, "timestep_spacing": "leading"}


# ----- reading ---------------------------------------------------------------------------------------------------
def _header_keys(path: Path):
    """The tensor names of a safetensors file from its header (no tensors read); None when unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 << 20:
                return None
            return [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    except (OSError, ValueError):
        return None


def detect(path: Path) -> bool:
    """Whether ``path`` is a single-file checkpoint (cheap: a .ckpt, or a .safetensors whose header names LDM keys;
    one with an unreadable header too, so that the import says it is damaged)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".ckpt":
        return True
    if path.suffix.lower() != ".safetensors":
        return False
    keys = _header_keys(path)
    prefixes = (UNET, VAE, "cond_stage_model.", "conditioner.", "double_blocks.")
    return keys is None or any(k.startswith(prefixes) for k in keys)


def read_checkpoint(path: Path, trust: bool) -> dict:
    """{LDM key: tensor}; ModelError for a damaged file, or a pickle without ``trust``."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        from engine.store import check_safetensors

        check_safetensors(path)
        return load_file(str(path))
    if not trust:
        raise ModelError(f"{path.name} is a pickle, which can run code when loaded; convert it to .safetensors, or "
                         "pass --trust if you trust this file.")
    from engine.weights import load_pickle

    data = load_pickle(path)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} does not hold a state dict of tensors.")
    return {k: v for k, v in data.items() if hasattr(v, "shape")}


# ----- key mapping -----------------------------------------------------------------------------------------------
def _indices(keys, head: str) -> set:
    return {int(k[len(head):].split(".", 1)[0]) for k in keys if k.startswith(head)}


def unet_layout(sd: dict) -> dict:
    """Blocks, layers per block and which blocks hold attention, read from the LDM U-Net keys (unprefixed)."""
    n = max(_indices(sd, "input_blocks.")) + 1
    downs = sorted(i for i in _indices(sd, "input_blocks.") if f"input_blocks.{i}.0.op.weight" in sd)
    layers = downs[0] - 1 if downs else n - 1
    blocks = n // (layers + 1)
    if blocks * (layers + 1) != n or not layers:
        raise ModelError(f"The U-Net has {n} input blocks, which fit no Stable Diffusion layout.")
    attn_down = [f"input_blocks.{1 + b * (layers + 1)}.1.proj_in.weight" in sd for b in range(blocks)]
    attn_up = [f"output_blocks.{b * (layers + 1)}.1.proj_in.weight" in sd for b in range(blocks)]
    return {"blocks": blocks, "layers": layers, "attn_down": attn_down, "attn_up": attn_up}


def unet_prefixes(lay: dict) -> dict:
    """{LDM module prefix: (diffusers prefix, renames of what follows)} for the U-Net."""
    blocks, layers = lay["blocks"], lay["layers"]
    out = {k: (v, {}) for k, v in UNET_TOP.items()}
    for b in range(blocks):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            out[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", RESNET)
            out[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", {})
        if b < blocks - 1:
            out[f"input_blocks.{1 + b * (layers + 1) + layers}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", {})
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            out[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", RESNET)
            if lay["attn_up"][b]:
                out[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", {})
        if b < blocks - 1:
            last = f"output_blocks.{b * (layers + 1) + layers}.{2 if lay['attn_up'][b] else 1}.conv"
            out[last] = (f"up_blocks.{b}.upsamplers.0.conv", {})
    out.update({"middle_block.0": ("mid_block.resnets.0", RESNET), "middle_block.1": ("mid_block.attentions.0", {}),
                "middle_block.2": ("mid_block.resnets.1", RESNET)})
    return out


def vae_prefixes(sd: dict) -> dict:
    blocks = max(_indices(sd, "encoder.down.")) + 1
    out = {f"{side}.{name}": (f"{side}.{name}", {}) for side in ("encoder", "decoder")
           for name in ("conv_in", "conv_out")}
    out.update({"encoder.norm_out": ("encoder.conv_norm_out", {}), "decoder.norm_out": ("decoder.conv_norm_out", {}),
                "quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})})
    for side in ("encoder", "decoder"):
        out[f"{side}.mid.block_1"] = (f"{side}.mid_block.resnets.0", VAE_RESNET)
        out[f"{side}.mid.block_2"] = (f"{side}.mid_block.resnets.1", VAE_RESNET)
        out[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", VAE_ATTENTION)
    for i in range(blocks):
        for j in _indices(sd, f"encoder.down.{i}.block."):
            out[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET)
        out[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", {})
        up = blocks - 1 - i  # the decoder's up.N counts from the lowest resolution in LDM, from the highest here
        for j in _indices(sd, f"decoder.up.{i}.block."):
            out[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET)
        out[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", {})
    return out


def rename(sd: dict, prefixes: dict, what: str) -> dict:
    """Rename every key by the longest matching module prefix and the renames of what follows it."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in prefixes:
                new, renames = prefixes[head]
                rest = ".".join(parts[n:])
                for old, repl in renames.items():
                    if rest.startswith(old + "."):
                        rest = repl + rest[len(old):]
                        break
                out[f"{new}.{rest}"] = value
                break
        else:
            raise ModelError(f"The checkpoint's {what} key {key!r} has no place in a Stable Diffusion {what}; the "
                             "file is not an SD 1.x/2.x checkpoint or is damaged.")
    return out


def convert_openclip(sd: dict) -> dict:
    """OpenCLIP's text tower (unprefixed keys) as transformers' CLIPTextModel, the last layer left out (SD 2.x
    conditions on the penultimate layer's output)."""
    last = max(_indices(sd, "transformer.resblocks."))
    out = {}
    for key, value in sd.items():
        if key in OPENCLIP_TOP:
            out["text_model." + OPENCLIP_TOP[key]] = value
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", key)
        if not m or int(m.group(1)) == last:
            continue  # text_projection, logit_scale, the vision tower, the unused last layer
        head, rest = f"text_model.encoder.layers.{m.group(1)}", m.group(2)
        if rest.startswith("attn.in_proj_"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{head}.self_attn.{name}.{kind}"] = part.clone()
            continue
        for old, new in OPENCLIP_LAYER.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[f"{head}.{rest}"] = value
    return out


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----- configs ---------------------------------------------------------------------------------------------------
def unet_config(unet: dict, lay: dict, sd2: bool) -> dict:
    layers, blocks = lay["layers"], lay["blocks"]
    channels = [unet[f"input_blocks.{1 + b * (layers + 1)}.0.out_layers.3.weight"].shape[0] for b in range(blocks)]
    proj = next(v for k, v in unet.items() if k.endswith("proj_in.weight"))
    context = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight")).shape[1]
    first = lay["attn_down"].index(True) if any(lay["attn_down"]) else 0
    depth = len(_indices(unet, f"input_blocks.{1 + first * (layers + 1)}.1.transformer_blocks.")) or 1
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": int(unet["input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(unet["out.2.weight"].shape[0]), "block_out_channels": [int(c) for c in channels],
        "layers_per_block": layers, "cross_attention_dim": int(context), "transformer_layers_per_block": depth,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay["attn_down"]],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in lay["attn_up"]],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32,
        # diffusers' attention_head_dim is the number of heads: 8 in SD 1.x, 64 channels per head in SD 2.x
        "attention_head_dim": [max(1, int(c) // 64) for c in channels] if sd2 else 8,
        "use_linear_projection": proj.ndim == 2, "upcast_attention": sd2,
    }


def vae_config(vae: dict) -> dict:
    blocks = max(_indices(vae, "encoder.down.")) + 1
    return {
        "_class_name": "AutoencoderKL", "in_channels": int(vae["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(vae["decoder.conv_out.weight"].shape[0]),
        "block_out_channels": [int(vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(blocks)],
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "layers_per_block": len(_indices(vae, "encoder.down.0.block.")),
        "latent_channels": int(vae["post_quant_conv.weight"].shape[0]), "norm_num_groups": 32, "act_fn": "silu",
        "sample_size": 512, "scaling_factor": 0.18215,
    }


def text_config(text: dict, sd2: bool) -> dict:
    hidden = int(text["text_model.embeddings.token_embedding.weight"].shape[1])
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": hidden,
        "vocab_size": int(text["text_model.embeddings.token_embedding.weight"].shape[0]),
        "max_position_embeddings": int(text["text_model.embeddings.position_embedding.weight"].shape[0]),
        "intermediate_size": int(text["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": len(_indices(text, "text_model.encoder.layers.")),
        "num_attention_heads": max(1, hidden // 64), "hidden_act": "gelu" if sd2 else "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": 1024 if sd2 else 768,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0 if sd2 else 49407,
    }


def sidecar_prediction(path: Path):
    """"v_prediction" / "epsilon" from an A1111 config ``<name>.yaml`` beside the checkpoint; None without one."""
    yaml = Path(path).with_suffix(".yaml")
    if not yaml.is_file():
        return None
    text = yaml.read_text(encoding="utf-8", errors="replace")
    return "v_prediction" if re.search(r"""^\s*parameterization:\s*["']?v["']?\s*$""", text, re.M) else "epsilon"


def is_v_prediction(unet_sd: dict, cfg: dict) -> bool:
    """A1111's test for SD 2.x: the U-Net at t=999 on a constant latent and context; a v-prediction model's output
    lies far below its input (mean difference under -1), an epsilon model's does not."""
    import torch

    from engine.nn.unet import UNet2DConditionModel, UNetConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(cfg))
    unet.load_state_dict({k: v.float() for k, v in unet_sd.items()}, assign=True)
    unet.eval()
    x = torch.full((1, cfg["in_channels"], 8, 8), 0.5)
    context = torch.full((1, 2, cfg["cross_attention_dim"]), 0.5)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), context)
    return (out - x).mean().item() < -1


# ----- the whole checkpoint --------------------------------------------------------------------------------------
def convert_state_dict(sd: dict, prediction=None):
    """(layout config without model_type, {prefixed diffusers key: tensor}) from an LDM state dict; ``prediction``
    ("epsilon" / "v_prediction") overrides the detection."""
    for prefix, what in REFUSED:
        if any(k.startswith(prefix) for k in sd):
            raise ModelError(f"This is {what}; the studio runs Stable Diffusion 1.x and 2.x single files so far.")
    missing = [what for key, what in REQUIRED.items() if key not in sd]
    sd2 = any(k.startswith(OPENCLIP + "transformer.") for k in sd)
    if not sd2 and not any(k.startswith(CLIP) for k in sd):
        missing.append("the text encoder")
    if missing:
        expected = ", ".join(k for k, w in REQUIRED.items() if w in missing) or f"{CLIP}* or {OPENCLIP}*"
        raise ModelError(f"The checkpoint has no {' or '.join(missing)} (expected keys such as {expected}); it is "
                         "not a Stable Diffusion 1.x/2.x checkpoint.")
    unet, vae = _sub(sd, UNET), _sub(sd, VAE)
    vae = {k: v for k, v in vae.items() if not k.startswith("loss.")}  # a training discriminator in some files
    lay = unet_layout(unet)
    tensors = {"unet." + k: v for k, v in rename(unet, unet_prefixes(lay), "U-Net").items()}
    for k, v in rename(vae, vae_prefixes(vae), "VAE").items():
        if k.split(".")[-2] in ("to_q", "to_k", "to_v") or ".to_out.0." in k:
            v = v.reshape(v.shape[0], -1) if k.endswith("weight") else v  # 1x1 convolutions as linear layers
        tensors["vae." + k] = v
    if sd2:
        text = convert_openclip(_sub(sd, OPENCLIP))
    else:
        text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in _sub(sd, CLIP).items()
                if not k.endswith("position_ids")}
    tensors.update({"text_encoder." + k: v for k, v in text.items()})
    configs = {"unet": unet_config(unet, lay, sd2), "vae": vae_config(vae), "text_encoder": text_config(text, sd2)}
    in_channels = configs["unet"]["in_channels"]
    if prediction is None:
        prediction = "epsilon"
        if sd2 and in_channels == 4:
            unet_sd = {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}
            prediction = "v_prediction" if is_v_prediction(unet_sd, configs["unet"]) else "epsilon"
    if prediction == "v_prediction":
        configs["unet"]["sample_size"], configs["vae"]["sample_size"] = 96, 768
    variant = ("sd2" if sd2 else "sd1") + ("-v" if prediction == "v_prediction" else "")
    config = {**configs, "scheduler": {**SCHEDULER, "prediction_type": prediction}, "prediction_type": prediction,
              "in_channels": in_channels, "source_format": "ldm-single-file",
              "variant": variant + ("-inpainting" if in_channels == 9 else ""),
              "tokenizer": {"pad_token": "!" if sd2 else "<|endoftext|>"}}
    return config, tensors


def convert(path: Path, dest: Path, trust: bool = False) -> None:
    """Write the studio layout of the checkpoint file ``path`` into the empty folder ``dest``, with the shipped
    CLIP vocabulary and the file's AutoV2 hash in studio.json."""
    from engine.filecheck import sha256_file
    from plugins.stable_diffusion.clip_vocab import write_vocab
    from plugins.stable_diffusion.layout import write_folder

    path, dest = Path(path), Path(dest)
    config, tensors = convert_state_dict(read_checkpoint(path, trust), sidecar_prediction(path))
    with tempfile.TemporaryDirectory(dir=dest.parent) as tok:
        write_vocab(Path(tok))
        write_folder(dest, tensors, config, Path(tok))
    sha = sha256_file(path)
    (dest / "studio.json").write_text(json.dumps({"source_file": path.name, "sha256": sha, "autov2": sha[:10]},
                                                 indent=2))
