"""Tiny random captioners saved by transformers (BLIP; ViT/DeiT + GPT-2/BERT vision-encoder-decoders), for tests
and benchmarks. Nothing is downloaded: the weights are random, the vocabulary is written here."""
from __future__ import annotations

from pathlib import Path

WORDS = ("a picture of photo the red green blue big small circle square triangle star on left right top bottom "
         "and with two three cat dog sits near").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
VOCAB = SPECIALS + WORDS  # ids: PAD 0, UNK 1, CLS 2, SEP 3, MASK 4, DEC 5


def _sharpen(model, factor: float, cross: float = 4.0):
    """Scale the random matrices so greedy tokens vary, the cross-attention values more so captions depend on
    the image (random weights otherwise give every image the same caption)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):  # some inits leave these tiny
                p.fill_(1.0)
            if p.dim() >= 2:
                p.mul_(factor * (cross if "crossattention" in name and ("value" in name or "c_attn" in name
                                                                        or "output.dense" in name) else 1.0))


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True, bos_token="[DEC]")
    tok.save_pretrained(str(folder))
    return tok


def save_blip(folder, seed: int = 0, sharpen: float = 2.0, image_size: int = 32, vocab_txt_only: bool = False):
    """A tiny BlipForConditionalGeneration folder (config.json, model.safetensors, tokenizer, preprocessor)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40, bos_token_id=5, sep_token_id=3,
                         pad_token_id=0, eos_token_id=3),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, initializer_range=0.02))
    model = BlipForConditionalGeneration(cfg).eval()
    _sharpen(model, sharpen)
    model.save_pretrained(str(folder))
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(str(folder))
    _bert_tokenizer(folder)
    if vocab_txt_only:
        (folder / "tokenizer.json").unlink()
    return model


def save_ved(folder, encoder: str = "deit", decoder: str = "bert", seed: int = 0, sharpen: float = 2.0):
    """A tiny VisionEncoderDecoderModel folder with a ViT or DeiT encoder and a GPT-2 or BERT decoder; the DeiT
    preprocessor resizes to 40 and center-crops 32 (bicubic), as DeiT's does at 256/224."""
    import torch
    from transformers import (BertConfig, DeiTConfig, DeiTImageProcessorPil, GPT2Config, ViTConfig,
                              ViTImageProcessorPil, VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8)
    enc = DeiTConfig(**kw) if encoder == "deit" else ViTConfig(**kw)
    if decoder == "bert":
        dec = BertConfig(vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=40, is_decoder=True, add_cross_attention=True)
    else:
        dec = GPT2Config(n_embd=24, n_layer=2, n_head=4, vocab_size=len(VOCAB), n_positions=40,
                         add_cross_attention=True, is_decoder=True, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec, decoder_start_token_id=2, pad_token_id=0,
                                                                  eos_token_id=3)
    model = VisionEncoderDecoderModel(cfg).eval()
    _sharpen(model, sharpen)
    model.save_pretrained(str(folder))
    if encoder == "deit":
        DeiTImageProcessorPil(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                              do_convert_rgb=True
                              ).save_pretrained(str(folder))
    else:
        ViTImageProcessorPil(size={"height": 32, "width": 32}, do_convert_rgb=True).save_pretrained(str(folder))
    _bert_tokenizer(folder)
    return model


def processor(folder):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(folder), backend="pil")


def random_images(n: int, seed: int = 0):
    """``n`` PIL images of odd sizes and mixed modes (RGB, L, RGBA, P)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(17, 71)), int(rng.integers(17, 71))
        arr = np.empty((h, w, 3), dtype=np.uint8)
        arr[:] = rng.integers(0, 256, 3)  # a flat background, a block of another colour, a little noise
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        arr[y:y + h // 2, x:x + w // 2] = rng.integers(0, 256, 3)
        arr = np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(arr)
        mode = ("RGB", "L", "RGBA", "P")[i % 4]
        if mode == "RGBA":
            im = rgb.convert("RGBA")
            im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        else:
            im = rgb.convert(mode)
        out.append(im)
    return out
