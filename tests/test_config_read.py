"""Every family reads its config.json through engine/nn/config.read: a hand-edited or broken value is one ModelError
sentence naming the part and the key (it used to be a TypeError from deep inside a network for most of them), and
the loose spellings real configs use still load."""
import json

import pytest

import caption_refs as R
from engine.diffusion.schedulers import SchedulerConfig
from engine.errors import ModelError
from engine.nn.clip_text import CLIPTextConfig
from engine.nn.gpt2 import GPT2Config
from engine.nn.unet import UNetConfig
from engine.nn.vae import VAEConfig
from plugins.caption.model import load_config
from plugins.text.models import build_model

CLIP = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize("reader,bad,words", [
    (CLIPTextConfig.from_dict, dict(CLIP, hidden_size="8"), "text encoder's hidden_size is '8'"),
    (CLIPTextConfig.from_dict, dict(CLIP, num_attention_heads=0), "not a multiple of num_attention_heads"),
    (CLIPTextConfig.from_dict, dict(CLIP, num_attention_heads=3), r"hidden_size \(8\) is not a multiple"),
    (CLIPTextConfig.from_dict, dict(CLIP, layer_norm_eps="tiny"), "layer_norm_eps is 'tiny'.*a number"),
    (CLIPTextConfig.from_dict, dict(CLIP, hidden_act="swiglu"), "activation 'swiglu' is not supported"),
    (GPT2Config.from_dict, dict(n_layer=2.5), "GPT-2's n_layer is 2.5.*whole number"),
    (GPT2Config.from_dict, dict(num_attention_heads=None), "GPT-2's n_head is None"),
    (UNetConfig.from_dict, dict(layers_per_block="2"), "U-Net's layers_per_block"),
    (UNetConfig.from_dict, dict(transformer_layers_per_block=[1, 2, 10]), "Unsupported U-Net config"),
    (VAEConfig.from_dict, dict(latent_channels=True), "VAE's latent_channels is True"),
    (SchedulerConfig.from_dict, dict(num_train_timesteps="1000"), "scheduler's num_train_timesteps"),
    (SchedulerConfig.from_dict, [1, 2], "scheduler section of the model's config is not a JSON object"),
])
def test_bad_values_are_one_sentence(reader, bad, words):
    with pytest.raises(ModelError, match=words):
        reader(bad)


def test_loose_spellings_still_load():
    assert CLIPTextConfig.from_dict(dict(CLIP, hidden_size=8.0, layer_norm_eps=1)).hidden_size == 8
    assert UNetConfig.from_dict({"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D"] * 2,
                                 "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 8}).block_out_channels == (32, 64)
    assert VAEConfig.from_dict({"sample_size": [256, 256]}).sample_size == 256
    assert GPT2Config.from_dict({"hidden_size": 48, "num_attention_heads": 4}).n_embd == 48


def _edit(folder, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change,words", [
    (lambda c: c["encoder"].update(hidden_size="32"), "ViT encoder's hidden_size is '32'"),
    (lambda c: c["encoder"].update(patch_size=[4, 8]), "patch_size must be square"),
    (lambda c: c["decoder"].pop("vocab_size"), "BERT decoder section of the model's config has no 'vocab_size'"),
    (lambda c: c["decoder"].update(num_attention_heads=5), "BERT decoder's hidden_size"),
])
def test_a_broken_captioner_config_says_which_key(tmp_path, change, words):
    R.save_ved(tmp_path / "m", "vit", "bert")
    _edit(tmp_path / "m", change)
    with pytest.raises(ModelError, match=words):
        load_config(tmp_path / "m")


def test_blip_vision_reads_as_a_vit_with_blips_defaults(tmp_path):
    R.save_blip(tmp_path / "b")
    cfg = load_config(tmp_path / "b")
    want = json.loads((tmp_path / "b" / "config.json").read_text())["vision_config"]
    assert (cfg.encoder.hidden_size, cfg.encoder.image_size, cfg.encoder.layer_norm_eps) == \
        (want["hidden_size"], want["image_size"], want["layer_norm_eps"])
    _edit(tmp_path / "b", lambda c: c["vision_config"].pop("layer_norm_eps"))
    assert load_config(tmp_path / "b").encoder.layer_norm_eps == 1e-5  # BLIP's default, not ViT's 1e-12
    _edit(tmp_path / "b", lambda c: c["vision_config"].update(num_attention_heads="four"))
    with pytest.raises(ModelError, match="BLIP vision model's num_attention_heads is 'four'"):
        load_config(tmp_path / "b")


def test_a_config_that_leaves_keys_out_means_what_it_means_in_transformers():
    """ViTConfig's defaults were the built-in captioner's sizes (128 wide, 32 px), not transformers' (768, 224):
    every network config's defaults are its reference's."""
    import dataclasses

    import transformers

    from engine.nn.clip_text import CLIPTextConfig
    from engine.nn.gpt2 import GPT2Config
    from plugins.caption.vit import ViTConfig
    from plugins.text.llama import LlamaConfig

    pairs = [(ViTConfig.from_dict({"model_type": "vit"}), transformers.ViTConfig()),
             (ViTConfig.from_dict({"model_type": "deit"}), transformers.DeiTConfig()),
             (CLIPTextConfig(), transformers.CLIPTextConfig()), (GPT2Config(), transformers.GPT2Config()),
             (LlamaConfig(), transformers.LlamaConfig())]
    for ours, reference in pairs:
        for f in dataclasses.fields(ours):
            if hasattr(reference, f.name):
                assert getattr(ours, f.name) == getattr(reference, f.name), (type(reference).__name__, f.name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_a_broken_text_config_says_which_key(family):
    cfg = {"model_type": family, "vocab_size": 32, "hidden_size": "16", "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ModelError, match="hidden_size is '16'.*whole number"):
        build_model(cfg, family, device="meta")


def test_no_heads_is_a_sentence_not_a_division_by_zero():
    cfg = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 0}
    with pytest.raises(ModelError, match="num_attention_heads and num_key_value_heads must be at least 1"):
        build_model(cfg, "llama", device="meta")


@pytest.mark.parametrize("reader", ["plugins.text.models:read_config", "plugins.image.model:read_config",
                                    "plugins.stable_diffusion.model:read_config", "plugins.caption.model:load_config"])
@pytest.mark.parametrize("text,words", [(None, "has no config.json; a model folder needs a config.json"),
                                        ("{not json", "is not valid JSON; the model folder is damaged"),
                                        ("[1, 2]", "does not hold a JSON object"),
                                        (b"\xff\xfe{", "is not valid JSON")])
def test_every_family_reads_its_config_json_by_one_rule(tmp_path, reader, text, words):
    import importlib

    module, name = reader.split(":")
    folder = tmp_path / "model"
    folder.mkdir()
    if isinstance(text, bytes):
        (folder / "config.json").write_bytes(text)
    elif text is not None:
        (folder / "config.json").write_text(text)
    with pytest.raises(ModelError, match=words):
        getattr(importlib.import_module(module), name)(folder)


def test_a_damaged_preprocessor_config_is_a_sentence(tmp_path):
    from plugins.caption.pipeline import Preprocess

    (tmp_path / "preprocessor_config.json").write_text("[224]")
    with pytest.raises(ModelError, match="preprocessor_config.json does not hold a JSON object"):
        Preprocess.from_folder(tmp_path, 224)
