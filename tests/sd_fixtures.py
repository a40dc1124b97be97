"""Tiny random Stable Diffusion pipelines saved by diffusers (and a tiny CLIP vocabulary), for the SD tests."""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ["a", "red", "cat", "dog", "on", "the", "blue", "sofa", "painting", "of", "photo"]


def clip_vocab(folder: Path) -> None:
    """vocab.json + merges.txt of a small byte-level CLIP BPE: the 256 byte characters (plain and ending a word),
    merges that spell a few words, and the start/end tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.append(parts[0])
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


def save_pipeline(folder: Path, variant: str = "sd1", seed: int = 0, fp16: bool = False, shard: str | None = None,
                  pad_token: str = "<|endoftext|>", vocab_dir: Path | None = None):
    """A tiny StableDiffusionPipeline (``variant``: sd1, sd2-v with a linear-projection U-Net and v-prediction,
    or inpaint with a 9-channel U-Net) saved by diffusers into ``folder``; returns the pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = vocab_dir or folder.parent / f".{folder.name}-tok"
    if vocab_dir is None:
        clip_vocab(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token=pad_token,
                              model_max_length=77)
    sd2 = variant.startswith("sd2")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="gelu" if sd2 else "quick_gelu",
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)).eval()
    unet = UNet2DConditionModel(sample_size=16, in_channels=9 if variant == "inpaint" else 4, out_channels=4,
                                block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16,
                                attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16,
                        layers_per_block=1, sample_size=32).eval()
    with torch.no_grad():  # larger weights than the initialisation, so that a wrong detail shows in the image
        for module in (unet, vae, text):
            for name, p in module.named_parameters():
                p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.05))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if variant == "sd2-v" else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    kw = {}
    if fp16:
        pipe = pipe.to(torch.float16)
        kw["variant"] = "fp16"
    if shard:
        kw["max_shard_size"] = shard
    pipe.save_pretrained(folder, safe_serialization=True, **kw)
    return pipe.to(torch.float32)


RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_ldm(pipe, openclip: bool = False) -> dict:
    """The pipeline's weights under the original LDM key names of a single-file checkpoint (what A1111 and civitai
    distribute), written out rule by rule from the LDM layout (diffusers' from_single_file checks the result)."""
    import re

    import torch

    out = {}
    L = pipe.unet.config.layers_per_block
    for k, v in pipe.unet.state_dict().items():
        name = k
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
        if m:
            kind, lvl, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if part == "resnets":
                head, _, tail = rest.partition(".")
                rest = RESNET_TO_LDM[head] + "." + tail
            i = (1 + lvl * (L + 1) + j) if kind == "down" else (lvl * (L + 1) + j)
            name = f"{'input' if kind == 'down' else 'output'}_blocks.{i}.{0 if part == 'resnets' else 1}.{rest}"
        elif (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)):
            name = f"input_blocks.{1 + int(m.group(1)) * (L + 1) + L}.0.op.{m.group(2)}"
        elif (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)):
            lvl = int(m.group(1))
            has_attn = any(x.startswith(f"up_blocks.{lvl}.attentions.") for x in pipe.unet.state_dict())
            name = f"output_blocks.{lvl * (L + 1) + L}.{2 if has_attn else 1}.conv.{m.group(2)}"
        elif (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            rest = m.group(3)
            if m.group(1) == "resnets":
                head, _, tail = rest.partition(".")
                rest = RESNET_TO_LDM[head] + "." + tail
            index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m.group(1), m.group(2))]
            name = f"middle_block.{index}.{rest}"
        else:
            for a, b in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                         ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
                if k.startswith(a + "."):
                    name = b + k[len(a):]
        out["model.diffusion_model." + name] = v
    vn = len(pipe.vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in pipe.vae.state_dict().items():
        name = k.replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1.", name)
        name = re.sub(r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2.", name)
        name = re.sub(r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", name)
        if m:
            name = f"decoder.up.{vn - 1 - int(m.group(1))}.{'block' if m.group(2) == 'resnets' else 'upsample'}." \
                   f"{m.group(3)}"
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", name)
        if m:
            name = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if v.dim() == 2:
                v = v[:, :, None, None]
        out["first_stage_model." + name] = v
    text = pipe.text_encoder.state_dict()
    if not openclip:
        out.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
        return out
    p = "cond_stage_model.model."
    t = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in text.items()}
    out[p + "token_embedding.weight"] = t["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = t["embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"], out[p + "ln_final.bias"] = t["final_layer_norm.weight"], t["final_layer_norm.bias"]
    layers = pipe.text_encoder.config.num_hidden_layers
    for i in range(layers + 1):  # OpenCLIP has one more layer, which SD 2 does not use
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"{p}transformer.resblocks.{i}."
        for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for q in ("weight", "bias"):
                out[f"{dst}{b}.{q}"] = t[f"{src}{a}.{q}"] + (0.5 if i == layers else 0)
        for q in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{q}"] = torch.cat([t[f"{src}self_attn.{x}_proj.{q}"] for x in "qkv"])
    out[p + "text_projection"] = torch.zeros(t["final_layer_norm.weight"].shape[0], 8)
    return out
