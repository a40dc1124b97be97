"""Issue #18, caption models: `studio finetune caption` on a tiny VisionEncoderDecoderModel saved by transformers,
teaching a word its word-level vocabulary lacks; the PEFT adapter (LoRA + trainable tokens + the grown tokenizer)
loads in peft on transformers' model with the studio's logits, and an adapter made by peft loads in the studio."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

WORDS = [f"w{i}" for i in range(24)]


def save_tiny(folder):
    """A tiny ViT + GPT-2 captioner (transformers' save_pretrained) with a word-level tokenizer.json."""
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    from plugins.caption.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    enc = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                    patch_size=4)
    dec = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=tok.get_vocab_size(), n_positions=24,
                     add_cross_attention=True, is_decoder=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec, decoder_start_token_id=1, pad_token_id=0,
                                                                  eos_token_id=2)
    VisionEncoderDecoderModel(cfg).eval().save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def imported(tmp_path, n: int, caption):
    """The tiny captioner imported into the store, and a folder of ``n`` random images captioned ``caption(i)``."""
    from PIL import Image

    from engine.plugins import PluginHost
    from engine.store import ModelStore

    save_tiny(tmp_path / "tiny-cap")
    entry = ModelStore(PluginHost().load()).import_(tmp_path / "tiny-cap")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / f"im{i}.png")
        (data / f"im{i}.txt").write_text(caption(i))
    return entry, data


def hf_model(folder, vocab: int):
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    model.decoder.resize_token_embeddings(vocab)
    return model


def studio_logits(folder, adapter, pixels, ids):
    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters
    from plugins.caption.model import load_caption_model

    model = apply_adapters(load_caption_model(folder, "cpu", torch.float32), [AdapterRef("a", adapter, "", 1.0)])
    with torch.no_grad():
        return model(pixels, ids)


def test_caption_finetune_teaches_a_word_and_peft_reads_it(tmp_path, studio_home):
    from peft import PeftModel

    from engine.generators import AdapterRef
    from plugins.caption.finetune import main
    from plugins.caption.pipeline import CaptionPipeline

    entry, data = imported(tmp_path, 8, lambda i: f"w{i} zork w{i + 1}")
    assert main(["--model", entry.name, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "6",
                 "--batch", "4", "--eval-every", "3", "--checkpoint-every", "3", "--lr", "1e-2",
                 "--threads", "1"]) == 0
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    new_id = json.loads((adapter / "tokenizer.json").read_text())["model"]["vocab"]["zork"]
    assert new_id == 28 and config["trainable_token_indices"]["decoder.transformer.wte"] == [new_id]
    recipe = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert recipe["data"]["new_words"] == ["zork"] and recipe["kind"] == "caption"

    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 5, new_id, 7], [1, new_id, 4, 2]])
    ours = studio_logits(entry.path, adapter, pixels, ids)
    assert ours.shape[-1] == 29  # the grown vocabulary
    base = hf_model(entry.path, 29)
    with torch.no_grad():
        plain = base(pixel_values=pixels, decoder_input_ids=ids).logits
        theirs = PeftModel.from_pretrained(base, adapter).eval()(pixel_values=pixels, decoder_input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (theirs - plain).abs().max() > 1e-3  # the adapter learned something
    # the generator path: the adapter's tokenizer decodes the new word
    pipe = CaptionPipeline.from_folder(entry.path, adapters=[AdapterRef("a", adapter, "", 1.0)])
    assert pipe.tokenizer.token_to_id("zork") == new_id
    assert pipe.tokenizer.decode(pipe.tokenizer.encode("w2 zork").ids) == "w2 zork"
    from engine.errors import UsageError
    from engine.merge import merge_lora
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    merged = merge_lora(ModelStore(PluginHost().load()), entry.name, [str(adapter)], "merged")  # a new model
    pipe = CaptionPipeline.from_folder(merged.path)
    assert pipe.tokenizer.token_to_id("zork") == new_id
    from plugins.caption.model import load_caption_model

    with torch.no_grad():
        folded = load_caption_model(merged.path, "cpu", torch.float32)(pixels, ids)
    assert (folded - ours).abs().max() < 1e-4  # the merged model gives the adapter's logits
    assert folded.argmax(-1).tolist() == ours.argmax(-1).tolist()
    with pytest.raises(UsageError, match="no tokenizer.json"):
        (adapter / "tokenizer.json").unlink()
        merge_lora(ModelStore(PluginHost().load()), entry.name, [str(adapter)], "merged-2")


@pytest.mark.parametrize("ids,tied_only", [([28, 29], False), ([5, 9], False), ([5, 9], True)])
def test_a_peft_adapter_with_trainable_tokens_loads_in_the_studio(tmp_path, ids, tied_only):
    """New ids (the layers grow) or existing ones; rows for the embedding and the head, or (tied_only) for the
    embedding alone. (Rows for the embedding alone at new ids are not compared: peft's head then reads the rows
    that resize_token_embeddings drew at random, the studio's head the trained ones it is tied to.)"""
    from peft import LoraConfig, get_peft_model

    save_tiny(tmp_path / "tiny-cap")
    base = hf_model(tmp_path / "tiny-cap", 30)  # two more rows: 28, 29
    tokens = {"decoder.transformer.wte": ids} if tied_only else {"decoder.transformer.wte": ids,
                                                                  "decoder.lm_head": ids}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "c_attn", "q_attn", "c_fc"],
                        trainable_token_indices=tokens)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    peft_model.eval().save_pretrained(tmp_path / "peft-adapter")
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([[1, ids[0], ids[1], 9]])
    with torch.no_grad():
        theirs = peft_model(pixel_values=pixels, decoder_input_ids=tokens).logits
    ours = studio_logits(tmp_path / "tiny-cap", tmp_path / "peft-adapter", pixels, tokens)
    if ids[0] < 28:  # no growth: the studio's model keeps its 28 rows, peft's (resized) has 30
        theirs = theirs[..., :28]
    assert (ours - theirs).abs().max() < 1e-4


def test_an_adapter_for_another_captioner_is_refused(tmp_path, studio_home):
    from engine.errors import UsageError
    from plugins.caption.model import load_caption_model
    from engine.generators import AdapterRef
    from engine.nn.lora import apply_adapters
    from peft import LoraConfig, get_peft_model

    save_tiny(tmp_path / "tiny-cap")
    peft_model = get_peft_model(hf_model(tmp_path / "tiny-cap", 28), LoraConfig(r=4, target_modules=["c_fc"]))
    peft_model.save_pretrained(tmp_path / "a")
    with pytest.raises(UsageError, match="another base model"):
        apply_adapters(load_caption_model("resources/models/shapes-captioner", "cpu", torch.float32),
                       [AdapterRef("a", tmp_path / "a", "", 1.0)])


def test_a_cancelled_caption_finetune_resumes_to_the_same_loss(tmp_path, studio_home):
    """The new-token rows are checkpointed with the adapter: a run stopped at step 3 and resumed ends where an
    uninterrupted one does."""
    from engine.datasets import captioned_images
    from engine.errors import CancelledError
    from engine.finetune import Settings, run
    from engine.generators import CancelToken
    from plugins.caption.finetune import CaptionTask, parse_args

    entry, data = imported(tmp_path, 6, lambda i: f"w{i} zork")
    a = parse_args(["--model", entry.name, "--data", str(data), "--batch", "3", "--dropout", "0.1"])
    settings = Settings(steps=6, lr=1e-2, batch=3, seed=0, checkpoint_every=1, eval_every=2, warmup=10,
                        weight_decay=0.0, clip=1.0)
    want = run(CaptionTask(entry, captioned_images(data), a), settings,
               tmp_path / "straight")
    token = CancelToken()

    def stop_at_3(e):
        if e.get("step") == 3:
            token.cancel()

    with pytest.raises(CancelledError):
        run(CaptionTask(entry, captioned_images(data), a), settings,
            tmp_path / "stopped", cancel=token, report=stop_at_3)
    got = run(CaptionTask(entry, captioned_images(data), a), settings,
              tmp_path / "stopped", resume=True)
    assert abs(got["final_loss"] - want["final_loss"]) < 1e-4
    assert abs(got["final_val_loss"] - want["final_val_loss"]) < 1e-4


@pytest.mark.parametrize("kind", ["blip", "vit-bert"])
def test_blip_and_bert_decoders_finetune_and_peft_reads_the_adapter(tmp_path, studio_home, kind):
    """Sub-word vocabularies spell a new word from pieces: no new tokens, the adapter alone."""
    from PIL import Image
    from peft import PeftModel
    from transformers import BlipForConditionalGeneration, VisionEncoderDecoderModel

    from caption_refs import save_blip, save_ved
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from plugins.caption.finetune import main

    folder = tmp_path / kind
    save_blip(folder) if kind == "blip" else save_ved(folder, encoder="vit", decoder="bert")
    entry = ModelStore(PluginHost().load()).import_(folder)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"im{i}.png")
        (data / f"im{i}.txt").write_text(["a red star on the left", "two dogs near a cat"][i % 2])
    assert main(["--model", entry.name, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "4",
                 "--batch", "2", "--eval-every", "2", "--checkpoint-every", "2", "--lr", "1e-2",
                 "--threads", "1"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert not (adapter / "tokenizer.json").exists()
    cls = BlipForConditionalGeneration if kind == "blip" else VisionEncoderDecoderModel
    base = cls.from_pretrained(folder, torch_dtype=torch.float32).eval()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5 if kind == "blip" else 2, 6, 12, 14, 3]])
    ours = studio_logits(entry.path, adapter, pixels, ids)
    with torch.no_grad():
        def logits(m):
            if kind == "blip":
                return m(pixel_values=pixels, input_ids=ids).logits
            return m(pixel_values=pixels, decoder_input_ids=ids).logits
        plain = logits(base)
        theirs = logits(PeftModel.from_pretrained(base, adapter).eval())
    assert (ours - theirs).abs().max() < 1e-4
    assert (theirs - plain).abs().max() > 1e-4


def test_a_finetune_is_a_history_row_that_replays_identically(tmp_path, studio_home, capsys):
    from engine.history import History
    from plugins.caption.finetune import main
    from studio.cli import main as cli

    entry, data = imported(tmp_path, 6, lambda i: f"w{i} zork")
    assert main(["--model", entry.name, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "4",
                 "--batch", "2", "--eval-every", "2", "--checkpoint-every", "2", "--threads", "1"]) == 0
    row = History().list()[0]
    assert row.generator == "finetune" and row.recipe["kind"] == "caption" and row.model == entry.name
    assert row.recipe["finetune"]["data"]["new_words"] == ["zork"] and row.recipe["args"]["steps"] == 4
    assert row.outputs[0]["path"] == str(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    capsys.readouterr()
    assert cli(["history", "replay", str(row.id), "--out", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "identical to the original adapter" in out and str(tmp_path / "again") in out
