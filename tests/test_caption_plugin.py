"""The caption plugin: registration, generation events, options, errors and folder checks (tiny random model)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from plugins.caption.model import CaptionConfig, CaptionModel, save_folder
from plugins.caption.tokenizer import BOS, EOS, PAD, shapes_tokenizer
from plugins.caption.vit import ViTConfig
from engine.errors import CancelledError, ModelError, UsageError
from engine.generators import Context, ModelRef, Partial, Progress, Request, Result
from engine.plugins import PluginHost
from engine.nn.gpt2 import GPT2Config

torch.set_num_threads(1)


@pytest.fixture
def folder(tmp_path):
    tok = shapes_tokenizer()
    bos, eos, pad = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    cfg = CaptionConfig(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  image_size=16, patch_size=4),
                        GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=24, n_embd=48, n_layer=1, n_head=4,
                                   add_cross_attention=True, bos_token_id=bos, eos_token_id=eos), bos, eos, pad)
    torch.manual_seed(0)
    model = CaptionModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    path = tmp_path / "tiny-captioner"
    save_folder(model, tok, path)
    (path / "studio.json").write_text(json.dumps({"generator": "caption", "family": "vision-encoder-decoder"}))
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(path)
    return path


def run(folder, image, context=None, backend="torch", **options):
    from plugins.caption import INFO, generate

    req = Request(image=image, options=INFO.resolve_options(options), model=ModelRef("tiny", folder,
                  "vision-encoder-decoder", "hash-" + folder.name, json.loads((folder / "config.json").read_text())),
                  backend=backend)
    return list(generate(req, context or Context()))


def test_registered_and_recognised():
    host = PluginHost(builtins=("plugins.caption",)).load()
    info = host.generator("caption").info
    assert info.takes == ("image",) and info.makes == "text"
    assert {o.name for o in info.options} == {"max_new_tokens", "num_beams", "prefix"}
    arch = host.architecture_for({"model_type": "vision-encoder-decoder"})
    assert arch.family == "vision-encoder-decoder" and arch.generator == "caption"


def test_listing_does_not_import_torch():
    code = "import sys, plugins.caption; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_greedy_streams_and_beam_reports_alternatives(folder, image):
    context = Context()
    events = run(folder, image, context, max_new_tokens=6)
    assert isinstance(events[0], Progress) and isinstance(events[-1], Result)
    result = events[-1]
    pieces = [e.text for e in events if isinstance(e, Partial)]
    assert "".join(pieces) == result.text and result.text
    assert 1 <= len(result.token_ids) <= 6
    assert len(context.cache) == 1
    beams = run(folder, image, context, max_new_tokens=6, num_beams=3)[-1]
    assert len(context.cache) == 1  # the model is loaded once
    scores = [b["score"] for b in beams.info["beams"]]
    assert scores == sorted(scores, reverse=True)
    assert beams.text == beams.info["beams"][0]["text"]
    one = run(folder, image, context, max_new_tokens=6, num_beams=1)[-1]
    assert one.text == result.text and one.token_ids == result.token_ids


def test_errors(folder, image, tmp_path):
    with pytest.raises(UsageError, match="needs an image"):
        run(folder, None)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(UsageError, match="not an image the studio reads"):
        run(folder, bad)
    with pytest.raises(UsageError, match="no ONNX export"):  # the ONNX backend needs `studio export-onnx` first
        run(folder, image, backend="onnx")
    context = Context()
    context.cancel.cancel()
    with pytest.raises(CancelledError):
        run(folder, image, context)


def test_check_folder(folder):
    from plugins.caption import check_folder
    from safetensors.torch import load_file, save_file

    check_folder(folder)
    state = load_file(str(folder / "model.safetensors"))
    state["decoder.transformer.wpe.weight"] = state["decoder.transformer.wpe.weight"][:10].contiguous()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match="wpe.weight has shape"):
        check_folder(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["decoder"]["n_positions"] = 10
    cfg["decoder"]["vocab_size"] = 20
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="wte.weight has shape"):
        check_folder(folder)
    (folder / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelError):
        check_folder(folder)
