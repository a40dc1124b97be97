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
                  pad_token: str = "<|endoftext|>"):
    """A tiny StableDiffusionPipeline (``variant``: sd1, sd2-v with a linear-projection U-Net and v-prediction,
    or inpaint with a 9-channel U-Net) saved by diffusers into ``folder``; returns the pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = folder.parent / f".{folder.name}-tok"
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
