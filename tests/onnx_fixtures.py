"""Tiny random model folders for the ONNX tests (not a test module itself)."""
from __future__ import annotations

import json
from pathlib import Path


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<unk>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="\u0000##", cleanup=False)
    return tok


def text_folder(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny random Llama or GPT-2 model folder (fp16 safetensors, config.json, tokenizer.json, studio.json)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "llama":
        from plugins.text.llama import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                          bos_token_id=0, eos_token_id=1)
        model = LlamaForCausalLM(cfg)
        config = cfg.to_hf_dict()
    else:
        from engine.nn.gpt2 import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=64, n_positions=96, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                         eos_token_id=1)
        model = GPT2LMHeadModel(cfg)
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_positions": 96,
                  "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 0, "eos_token_id": 1,
                  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}
    with torch.no_grad():  # larger logits than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if family == "gpt2":
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    word_tokenizer(64).save(str(folder / "tokenizer.json"))
    (folder / "studio.json").write_text(json.dumps({"generator": "text", "family": family, "title": folder.name}))
    return folder


def caption_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny random ViT + GPT-2 captioner folder with the shapes word tokenizer."""
    import torch

    from plugins.caption.model import CaptionConfig, CaptionModel, save_folder
    from plugins.caption.tokenizer import BOS, EOS, PAD, shapes_tokenizer
    from plugins.caption.vit import ViTConfig
    from engine.nn.gpt2 import GPT2Config

    tok = shapes_tokenizer()
    bos, eos, pad = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    enc = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=16, patch_size=4)
    dec = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=24, n_layer=2, n_head=2,
                     add_cross_attention=True, bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = CaptionModel(CaptionConfig(enc, dec, decoder_start_token_id=bos, eos_token_id=eos, pad_token_id=pad))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    save_folder(model, tok, folder)
    (folder / "studio.json").write_text(json.dumps({"generator": "caption", "family": "vision-encoder-decoder"}))
    return folder


def entry_for(folder: Path, family: str, generator: str, builtin: bool = False):
    from engine.store import ModelEntry, content_hash

    return ModelEntry(folder.name, folder, family, generator, builtin, content_hash(folder), 0, folder.name,
                      json.loads((folder / "config.json").read_text()),
                      json.loads((folder / "studio.json").read_text()))


def exporter_host():
    from engine.plugins import DEFAULT_PLUGINS, PluginHost

    return PluginHost(safe_mode=True, disabled=[], builtins=DEFAULT_PLUGINS).load()


def image_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny random text-to-image folder (U-Net + CLIP text encoder, shapes tokenizer)."""
    import torch

    from plugins.image.model import ImageModelConfig, build, save
    from plugins.image.tokenizer import shapes_tokenizer
    from plugins.image.train import default_config

    config = default_config(channels=(8, 16), text_dim=16, text_layers=1, heads=2, size=16)
    config["unet"]["norm_num_groups"] = 4
    torch.manual_seed(seed)
    unet, text = build(ImageModelConfig.from_dict(config))
    save(folder, config, unet, text, shapes_tokenizer(),
         {"generator": "image", "family": "shapes-diffusion", "title": folder.name})
    return folder


def exported_text(base: Path, family: str) -> Path:
    """A tiny text model of ``family`` in ``base/tiny``, exported to ONNX (one onnxruntime thread)."""
    import os

    from engine.onnx_export import export_model

    os.environ["STUDIO_ONNX_THREADS"] = "1"
    folder = text_folder(base / "tiny", family)
    export_model(exporter_host(), entry_for(folder, family, "text"))
    return folder


def copy_of(folder: Path, dest: Path) -> Path:
    """A copy of a model folder (copy2 keeps the files' times, as a move or backup would)."""
    import shutil

    shutil.copytree(folder, dest)
    return dest
