"""BLIP and more vision-encoder-decoder pairs against transformers, on tiny random models saved by transformers:
captions identical (greedy and beam 3, with and without a prefix) on 20 images, encoder states within 1e-4,
preprocessing within 1e-6 of transformers' (PIL) image processors on odd sizes and modes."""
import json

import numpy as np
import pytest
import torch

import caption_refs as R
from engine.errors import ModelError
from plugins.caption.model import load_config
from plugins.caption.pipeline import CaptionPipeline

torch.set_num_threads(1)
N = 20


def _generate(ref, tok, pixels, prefix, beams, blip):
    kw = dict(max_new_tokens=8, num_beams=beams, do_sample=False)
    with torch.no_grad():
        if blip:
            ids = tok(prefix, return_tensors="pt").input_ids if prefix else None
            out = ref.generate(pixel_values=pixels, input_ids=ids, **kw)
        else:
            out = ref.generate(pixel_values=pixels, **kw)
    return tok.decode(out[0], skip_special_tokens=True).strip()


def _parity(folder, ref, blip, prefixes):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    proc = R.processor(folder)
    pipe = CaptionPipeline.from_folder(folder)
    texts = set()
    for im in R.random_images(N, seed=3):
        want = proc(images=im, return_tensors="np")["pixel_values"]
        got = pipe.pixel_values(im)
        assert np.abs(want - got).max() <= 1e-6, im.mode
        px = torch.from_numpy(want)
        with torch.no_grad():
            states = ref.vision_model(pixel_values=px).last_hidden_state if blip else ref.encoder(px).last_hidden_state
            ours = pipe.runner.model.vision_model(px) if blip else pipe.runner.model.encoder(px)
        assert (states - ours).abs().max().item() <= 1e-4
        for prefix in prefixes:
            for beams in (1, 3):
                expect = _generate(ref, tok, px, prefix, beams, blip)
                assert pipe(want, max_new_tokens=8, num_beams=beams, prefix=prefix).text == expect, (prefix, beams)
                texts.add(expect)
    assert len(texts) > N // 2  # the captions depend on the image: a parity that could fail


def test_blip_captions_match_transformers(tmp_path):
    ref = R.save_blip(tmp_path / "blip")
    _parity(tmp_path / "blip", ref, True, ["", "a picture of"])


def test_deit_bert_pair_matches_transformers(tmp_path):
    ref = R.save_ved(tmp_path / "ved", "deit", "bert")
    assert load_config(tmp_path / "ved").encoder.distillation
    _parity(tmp_path / "ved", ref, False, [""])


def test_blip_from_vocab_txt_and_batched_greedy(tmp_path):
    R.save_blip(tmp_path / "b", vocab_txt_only=True)
    pipe = CaptionPipeline.from_folder(tmp_path / "b")
    images = R.random_images(5, seed=9)
    one = [pipe(im, max_new_tokens=8, prefix="a picture of") for im in images]
    batch = pipe.caption_batch(np.concatenate([pipe.pixel_values(im) for im in images]), 8, "a picture of")
    assert [o.text for o in one] == [o.text for o in batch]
    assert all(o.text.startswith("a picture of") for o in batch)


def test_sixteen_bit_images(tmp_path):
    """16-bit files holding 8-bit values match transformers exactly; true 16-bit samples are scaled to 8 bits
    (transformers' convert('RGB') clips them to white, which the studio deliberately does not copy)."""
    from PIL import Image

    R.save_blip(tmp_path / "b")
    proc, pipe = R.processor(tmp_path / "b"), CaptionPipeline.from_folder(tmp_path / "b")
    a = np.random.default_rng(0).integers(0, 256, (23, 37)).astype(np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    assert np.abs(proc(images=im, return_tensors="np")["pixel_values"] - pipe.pixel_values(im)).max() <= 1e-6
    wide = Image.fromarray((a * 257).astype(np.uint16))
    assert np.abs(pipe.pixel_values(wide) - pipe.pixel_values(im)).max() <= 1e-6


@pytest.mark.parametrize("section,kind,word", [("encoder", "swin", "swin"), ("encoder", "beit", "beit"),
                                               ("decoder", "roberta", "roberta"), ("decoder", "trocr", "trocr")])
def test_unsupported_pairs_are_refused_by_name(tmp_path, section, kind, word):
    R.save_ved(tmp_path / "m", "vit", "bert")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg[section]["model_type"] = kind
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=word):
        load_config(tmp_path / "m")


def test_blip_question_answering_is_refused(tmp_path):
    R.save_blip(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["architectures"] = ["BlipForQuestionAnswering"]
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="BlipForQuestionAnswering"):
        load_config(tmp_path / "b")


def test_a_dark_sixteen_bit_file_stays_dark(tmp_path):
    """A 16-bit PNG of 200s out of 65535 (near black) was read as grey 200; with one pixel at 300 as 1."""
    from PIL import Image

    from engine.images import load_image

    for top in (200, 300):
        a = np.full((8, 8), 200, np.uint16)
        a[0, 0] = top
        Image.fromarray(a).save(tmp_path / "dark.png")
        assert np.asarray(load_image(tmp_path / "dark.png"))[4, 4].tolist() == [1, 1, 1]


def test_blip_without_a_preprocessor_config_uses_blips_defaults(tmp_path):
    """It got ViT's normalisation (0.5) and other captions, with no word; a zero image_std was taken as given."""
    R.save_blip(tmp_path / "b")
    with_file = CaptionPipeline.from_folder(tmp_path / "b")
    config = json.loads((tmp_path / "b" / "preprocessor_config.json").read_text())
    (tmp_path / "b" / "preprocessor_config.json").unlink()
    without = CaptionPipeline.from_folder(tmp_path / "b")
    for im in R.random_images(3, seed=5):
        assert np.abs(with_file.pixel_values(im) - without.pixel_values(im)).max() <= 1e-6
    (tmp_path / "b" / "preprocessor_config.json").write_text(json.dumps({**config, "image_std": [0, 0, 0]}))
    with pytest.raises(ModelError, match="image_std .* must be positive numbers"):
        CaptionPipeline.from_folder(tmp_path / "b")


def test_the_models_generation_config_sets_the_beams_and_says_what_it_does_not_apply(tmp_path, studio_home):
    """A checkpoint whose generation_config.json asks for beam search was captioned greedily, with no note; the
    settings the studio does not apply (no_repeat_ngram_size ...) are now named in the result's warnings."""
    from PIL import Image
    from transformers import AutoTokenizer

    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    folder = tmp_path / "ved"
    ref = R.save_ved(folder, "vit", "gpt2")
    (folder / "generation_config.json").write_text(json.dumps(
        {"num_beams": 3, "max_new_tokens": 8, "no_repeat_ngram_size": 3, "length_penalty": 1.0}))
    image = tmp_path / "in.png"
    R.random_images(1, seed=5)[0].convert("RGB").save(image)
    host = PluginHost().load()
    record = execute(prepare(host, ModelStore(host), Job("caption", image=str(image), model=str(folder))),
                     history=False)
    assert record.recipe["options"]["num_beams"] == 3 and record.recipe["options"]["max_new_tokens"] == 8
    assert any("also sets no_repeat_ngram_size=3, which the studio does not apply" in w
               for w in record.recipe["warnings"]), record.recipe["warnings"]
    px = torch.from_numpy(R.processor(folder)(images=[Image.open(image)], return_tensors="np")["pixel_values"])
    with torch.no_grad():
        out = ref.generate(pixel_values=px, num_beams=3, max_new_tokens=8, do_sample=False, no_repeat_ngram_size=0)
    assert record.result.text == AutoTokenizer.from_pretrained(str(folder)).decode(out[0],
                                                                                   skip_special_tokens=True).strip()
