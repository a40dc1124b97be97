"""A single-file Stable Diffusion checkpoint, as AUTOMATIC1111 and civitai distribute them (a ``.safetensors`` with
the original LDM key names ``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``), converted
by key mapping into the studio's layout (layout.py, diffusers' key names).

The variant comes from the keys and shapes: SD 1.x (CLIP ViT-L text encoder, ``cond_stage_model.transformer``),
SD 2.x (OpenCLIP text encoder, ``cond_stage_model.model``: its fused q/k/v split, its last layer dropped as SD 2
uses the penultimate one; v-prediction unless the file says it is the 512-pixel base model), and an inpainting U-Net
(9 input channels). The configs are built from the shapes, with SD's own values for what shapes do not tell (heads).
The tokenizer is CLIP's, shipped with the studio (resources/clip). A ``.ckpt`` pickle loads only with ``--trust``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

from engine.errors import ModelError

UNET, VAE, CLIP, OPENCLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", \
    "cond_stage_model.model."
SUFFIXES = (".safetensors", ".ckpt")
VOCAB = Path(__file__).resolve().parents[2] / "resources" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _keys(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def detect(path: Path) -> bool:
    """A file named .safetensors with LDM U-Net keys, or a .ckpt (checked when converted)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in SUFFIXES:
        return False
    if path.suffix.lower() == ".ckpt":
        return True
    try:
        keys = _keys(path)
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours to import
        return False
    return any(k.startswith(UNET) or k.startswith("conditioner.embedders.") for k in keys)


def autov2(path: Path) -> str:
    """AUTOMATIC1111's and civitai's short model hash: the first 10 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


def _read(path: Path, trust: bool) -> dict:
    if path.suffix.lower() == ".ckpt":
        if not trust:
            raise ModelError(f"{path.name} is a pickle checkpoint, which can run code when loaded; pass --trust if "
                             "you trust this file (or use its .safetensors version).")
        from engine.weights import load_pickle

        data = load_pickle(path)
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ModelError(f"{path.name} does not hold a state dict of tensors.")
        return {k: v for k, v in data.items() if hasattr(v, "shape")}
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - truncated or damaged
        raise ModelError(f"{path.name} cannot be read as safetensors ({exc}); it may be truncated: download it "
                         "again.") from None


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def groups(channels: list) -> int:
    """The group norms' group count, which weights do not record: SD's 32 (smaller for narrower test models)."""
    import math

    return math.gcd(32, *channels)


# ----- the U-Net ----------------------------------------------------------------------------------------------
def unet_layout(sd: dict) -> tuple:
    """(levels, layers per block, channels per level, attention per level) from the LDM U-Net's keys."""
    ops = sorted(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if not ops:
        raise ModelError("The checkpoint's U-Net has no downsampling blocks (input_blocks.N.0.op); it is not a "
                         "Stable Diffusion U-Net.")
    layers = ops[0] - 1
    levels = len(ops) + 1
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        channels.append(int(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in sd)
    return levels, layers, channels, attention


def convert_unet(sd: dict) -> tuple:
    levels, layers, channels, attention = unet_layout(sd)
    out = {}

    def put(src: str, dst: str) -> None:
        for k, v in sd.items():
            if k.startswith(src + "."):
                rest = k[len(src) + 1:]
                for a, b in RESNET.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[f"{dst}.{rest}"] = v

    put("time_embed.0", "time_embedding.linear_1")
    put("time_embed.2", "time_embedding.linear_2")
    put("input_blocks.0.0", "conv_in")
    put("out.0", "conv_norm_out")
    put("out.2", "conv_out")
    for level in range(levels):
        for j in range(layers):
            i = 1 + level * (layers + 1) + j
            put(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}")
            put(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}")
        if level < levels - 1:
            put(f"input_blocks.{1 + level * (layers + 1) + layers}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
    put("middle_block.0", "mid_block.resnets.0")
    put("middle_block.1", "mid_block.attentions.0")
    put("middle_block.2", "mid_block.resnets.1")
    for level in range(levels):
        for j in range(layers + 1):
            i = level * (layers + 1) + j
            put(f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}")
            if f"output_blocks.{i}.1.proj_in.weight" in sd:
                put(f"output_blocks.{i}.1", f"up_blocks.{level}.attentions.{j}")
            if j == layers and level < levels - 1:
                up = 2 if f"output_blocks.{i}.1.proj_in.weight" in sd else 1
                put(f"output_blocks.{i}.{up}.conv", f"up_blocks.{level}.upsamplers.0.conv")
    return out, (levels, layers, channels, attention)


def unet_config(sd: dict, shape: tuple, sd2: bool) -> dict:
    levels, layers, channels, attention = shape
    attn = next(i for i, a in enumerate(attention) if a)
    proj = sd[f"input_blocks.{1 + attn * (layers + 1)}.1.proj_in.weight"]
    cross = sd[f"input_blocks.{1 + attn * (layers + 1)}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    return {"_class_name": "UNet2DConditionModel", "sample_size": 96 if sd2 else 64,
            "in_channels": int(sd["input_blocks.0.0.weight"].shape[1]), "out_channels": int(sd["out.2.weight"].shape[0]),
            "block_out_channels": channels, "layers_per_block": layers, "cross_attention_dim": int(cross),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "attention_head_dim": [c // 64 for c in channels] if sd2 else 8,
            "use_linear_projection": proj.dim() == 2, "norm_num_groups": groups(channels)}


# ----- the VAE ------------------------------------------------------------------------------------------------
def convert_vae(sd: dict) -> tuple:
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    out = {}
    for k, v in sd.items():
        name = k
        for pat, rep in ((r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
                         (r"^encoder\.down\.(\d+)\.downsample\.conv", r"encoder.down_blocks.\1.downsamplers.0.conv"),
                         (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
                         (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
                         (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.")):
            name = re.sub(pat, rep, name)
        m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", name)
        if m:
            level = levels - 1 - int(m.group(1))
            name = (f"decoder.up_blocks.{level}.resnets.{m.group(3)}" if m.group(2) == "block"
                    else f"decoder.up_blocks.{level}.upsamplers.0.{m.group(3)}")
        name = name.replace(".nin_shortcut.", ".conv_shortcut.")
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", name)
        if m:
            name = f"{m.group(1)}.mid_block.attentions.0.{VAE_ATTN[m.group(2)]}.{m.group(3)}"
            if v.dim() == 4:
                v = v[:, :, 0, 0]  # 1x1 convolutions in LDM, linear layers in diffusers
        out[name] = v
    channels = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    return out, {"_class_name": "AutoencoderKL", "block_out_channels": channels, "layers_per_block": layers,
                 "latent_channels": int(sd["quant_conv.weight"].shape[0]) // 2,
                 "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
                 "norm_num_groups": groups(channels), "scaling_factor": 0.18215}


# ----- the text encoders --------------------------------------------------------------------------------------
def convert_clip(sd: dict) -> tuple:
    """SD 1.x: transformers' CLIPTextModel under ``transformer.``; the keys are already transformers' (with or
    without ``text_model.``)."""
    from engine.nn.clip_text import strip_prefix

    out = strip_prefix(sd)
    return out, _text_config(out, "", "quick_gelu")


def convert_openclip(sd: dict) -> tuple:
    """SD 2.x: OpenCLIP's text tower; q/k/v split out of in_proj, the last layer dropped (SD 2 reads the
    penultimate layer's output through the final norm)."""
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    out = {"embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "embeddings.position_embedding.weight": sd["positional_embedding"],
           "final_layer_norm.weight": sd["ln_final.weight"], "final_layer_norm.bias": sd["ln_final.bias"]}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(n - 1):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            fused = sd[f"{src}attn.in_proj_{p}"]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}.{p}"] = part.contiguous()
    return out, _text_config(out, "", "gelu")


def _text_config(sd: dict, prefix: str, act: str) -> dict:
    emb = sd[f"{prefix}embeddings.token_embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k)))
    hidden = int(emb.shape[1])
    return {"vocab_size": int(emb.shape[0]), "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64 or 1,
            "intermediate_size": int(sd[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "max_position_embeddings": int(sd[f"{prefix}embeddings.position_embedding.weight"].shape[0]),
            "hidden_act": act, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1 if act == "quick_gelu" else 0}


def byte_characters() -> dict:
    """GPT-2's and CLIP's byte -> printable character table (the byte-level BPE alphabet), in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocabulary(dest: Path) -> Path:
    """vocab.json + merges.txt of CLIP's tokenizer, built from the shipped BPE merges exactly as CLIP builds them:
    the 256 byte characters, the same ending a word, the 48,894 merges joined, then the start and end tokens."""
    lines = gzip.open(VOCAB, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(byte_characters().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                     encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                     encoding="utf-8")
    return dest


def convert(path: Path, dest: Path, trust: bool = False, vocab_dir: Path | None = None) -> None:
    """Write the studio layout of the checkpoint file ``path`` into the empty folder ``dest``."""
    from plugins.stable_diffusion.layout import write_folder

    path = Path(path)
    tensors = _read(path, trust)
    keys = set(tensors)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelError(f"{path.name} is an SDXL checkpoint; the studio runs Stable Diffusion 1.x and 2.x so far.")
    if any(k.startswith(UNET + "joint_blocks.") for k in keys):
        raise ModelError(f"{path.name} is a Stable Diffusion 3 checkpoint; the studio runs SD 1.x and 2.x so far.")
    missing = [p + "*" for p in (UNET, VAE) if not any(k.startswith(p) for k in keys)]
    sd2 = any(k.startswith(OPENCLIP) for k in keys)
    if not sd2 and not any(k.startswith(CLIP) for k in keys):
        missing.append(f"{CLIP}* or {OPENCLIP}*")
    if missing:
        raise ModelError(f"{path.name} matches no Stable Diffusion variant: it has no {', '.join(missing)} keys.")
    unet, shape = convert_unet(_strip(tensors, UNET))
    vae, vae_cfg = convert_vae(_strip(tensors, VAE))
    text, text_cfg = (convert_openclip(_strip(tensors, OPENCLIP)) if sd2 else convert_clip(_strip(tensors, CLIP)))
    ucfg = unet_config(_strip(tensors, UNET), shape, sd2)
    vae_cfg["sample_size"] = 768 if sd2 else 512
    step = tensors.get("global_step")
    v_pred = sd2 and ucfg["in_channels"] == 4 and not (step is not None and int(step) == 875000)
    prediction = "v_prediction" if v_pred else "epsilon"
    scheduler = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": prediction, "steps_offset": 1,
                 "set_alpha_to_one": False, "clip_sample": False}
    from plugins.stable_diffusion.folder import variant_name

    config = {"unet": ucfg, "vae": vae_cfg, "text_encoder": {"_class_name": "CLIPTextModel", **text_cfg},
              "scheduler": scheduler, "prediction_type": prediction, "in_channels": ucfg["in_channels"],
              "variant": variant_name(text_cfg["hidden_size"], prediction, ucfg["in_channels"]),
              "tokenizer": {"pad_token": "!" if sd2 else "<|endoftext|>"}, "source_format": "ldm-single-file",
              "source_file": path.name, "autov2": autov2(path)}
    out = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"vae.{k}": v for k, v in vae.items()},
           **{f"text_encoder.{k}": v for k, v in text.items()}}
    vocab = vocab_dir or clip_vocabulary(Path(dest).parent / f".{Path(dest).name}-clip")
    size = len(json.loads((vocab / "vocab.json").read_text(encoding="utf-8")))
    if text_cfg["vocab_size"] != size:
        raise ModelError(f"{path.name}'s text encoder has {text_cfg['vocab_size']} tokens, CLIP's tokenizer {size}; "
                         "it is not a Stable Diffusion text encoder the studio knows.")
    write_folder(dest, out, config, vocab)
