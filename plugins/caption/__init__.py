"""Built-in plugin: image captioning with a vision encoder-decoder (ViT encoder + GPT-2 decoder).

Runs folders of transformers' ``VisionEncoderDecoderModel`` (config.json model_type ``vision-encoder-decoder``).
torch is imported inside the functions, never at import time.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine import hookimpl
from engine.architectures import Architecture
from engine.errors import ModelError, UsageError
from engine.generators import (MERGE_FIRST, Generator, GeneratorInfo, Trainer, finetuner, lazy, Option, Partial,
                               Progress, Result)

INFO = GeneratorInfo(
    id="caption", title="Caption", description="Describe an image in words.",
    takes=("image",), makes="text",
    options=(
        Option("max_new_tokens", "int", 20, "Longest caption, in tokens", min=1, max=256),
        Option("num_beams", "int", 1, "Beam search width (1 = greedy, streams words as they come)", min=1, max=16),
        Option("prefix", "str", "", "Text the caption starts with, as BLIP's conditional captioning "
                                    "('a picture of'); empty for none"),
    ),
    families=("vision-encoder-decoder", "blip"),
    takes_lora=True,
)


def _pipeline(request, context):
    from plugins.caption.pipeline import CaptionPipeline

    model = request.model
    if model is None:
        raise UsageError("The caption generator needs a model; pass one with --model.")
    return context.loaded("caption", request, lambda: CaptionPipeline.from_folder(
        model.path, device=request.device, backend=request.backend, model_hash=model.hash, export=request.export,
        adapters=request.adapters), onnx_lora=MERGE_FIRST)


def generate(request, context):
    if request.image is None:
        raise UsageError("The caption generator needs an image; pass one with --image.")
    opts = request.options
    yield Progress(0, 2, "loading model")
    t0 = time.perf_counter()
    pipe = _pipeline(request, context)
    t1 = time.perf_counter()
    pixels = pipe.pixel_values(request.image)
    context.cancel.raise_if_cancelled()
    yield Progress(1, 2, "captioning")
    check = context.cancel.raise_if_cancelled
    prefix = opts.get("prefix", "")
    if opts["num_beams"] == 1:
        it = pipe.stream(pixels, opts["max_new_tokens"], check, prefix)
        while True:
            try:
                piece = next(it)
            except StopIteration as stop:
                out = stop.value
                break
            yield Partial(text=piece)
    else:
        out = pipe(pixels, opts["max_new_tokens"], opts["num_beams"], check, prefix)
    t2 = time.perf_counter()
    yield Progress(2, 2, "done")
    yield _result(out, opts, {"load_s": round(t1 - t0, 4), "caption_s": round(t2 - t1, 4)}, request.model)


# generation_config.json settings that change transformers' captions and that the studio does not apply: said in
# the result, so a caption that differs from generate() is explained (num_beams and max_new_tokens are applied)
UNAPPLIED = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "length_penalty": 1.0, "min_length": 0,
             "min_new_tokens": None, "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "bad_words_ids": None}


def unapplied_settings(folder) -> list:
    """``key=value`` for each UNAPPLIED setting a model folder's generation_config.json gives another value, and
    its max_length when it is shorter than the studio's default caption."""
    from engine.store import read_generation_config

    gen = read_generation_config(folder)
    out = [f"{k}={gen[k]!r}" for k, default in UNAPPLIED.items() if k in gen and gen[k] != default]
    if isinstance(gen.get("max_length"), int) and "max_new_tokens" not in gen:
        out.append(f"max_length={gen['max_length']} (set max_new_tokens instead)")
    return out


def _result(out, opts, timings: dict, model=None) -> Result:
    warnings = [] if out.finished else [f"The caption was cut at max_new_tokens={opts['max_new_tokens']}."]
    unapplied = unapplied_settings(model.path) if model is not None else []
    if unapplied:
        warnings.append(f"The model's generation_config.json also sets {', '.join(unapplied)}, which the studio "
                        "does not apply; the caption may differ from transformers' generate().")
    info = {"score": round(out.score, 6), "timings": timings}
    if out.beams:
        info["beams"] = [{"text": t, "score": round(s, 6)} for t, s in out.beams]
    return Result(text=out.text, token_ids=list(out.token_ids), warnings=warnings, info=info)


def generate_batch(requests: list, context) -> list:
    """Caption several images with the same model and options in one pass (greedy: one batched decode; beam
    search: one image after another). One Result, or the UsageError of an unreadable image, per request."""
    import numpy as np

    from engine.errors import StudioError
    from engine.images import check_still

    opts = requests[0].options
    t0 = time.perf_counter()
    pipe = _pipeline(requests[0], context)
    t1 = time.perf_counter()
    results, pixels, rows = [None] * len(requests), [], []
    for i, request in enumerate(requests):
        try:
            check_still(request.image)
            pixels.append(pipe.pixel_values(request.image))
            rows.append(i)
        except StudioError as exc:
            results[i] = exc
    check = context.cancel.raise_if_cancelled
    if pixels and opts["num_beams"] == 1:
        outs = pipe.caption_batch(np.concatenate(pixels), opts["max_new_tokens"], opts.get("prefix", ""), check)
    else:
        outs = [pipe(px, opts["max_new_tokens"], opts["num_beams"], check, opts.get("prefix", "")) for px in pixels]
    each = round((time.perf_counter() - t1) / max(1, len(rows)), 4)
    for i, out in zip(rows, outs):
        results[i] = _result(out, opts, {"load_s": round(t1 - t0, 4), "caption_s": each, "batch": len(rows)},
                             requests[0].model)
    return results


def check_folder(folder: Path) -> None:
    """Weights, tokenizer and image processor agree with config.json; raises ModelError with a one-line reason."""
    from plugins.caption.model import check_state_shapes, load_config
    from plugins.caption.pipeline import Preprocess
    from plugins.caption.tokenizer import load_tokenizer
    from engine.weights import read_shapes

    folder = Path(folder)
    config = load_config(folder)
    Preprocess.from_folder(folder, config.encoder.image_size)
    shapes = {k: v[0] for k, v in read_shapes(folder).items()}
    check_state_shapes(config, shapes, f"{folder.name}/model.safetensors")
    tok = load_tokenizer(folder)
    V = config.decoder.vocab_size
    if getattr(tok, "get_vocab_size", None) is None:
        return
    if tok.get_vocab_size() > V:
        raise ModelError(f"{folder.name}/tokenizer.json has {tok.get_vocab_size()} tokens but the decoder only {V}.")
    for name, value in (("decoder_start_token_id", config.decoder_start_token_id),
                        ("eos_token_id", config.eos_token_id)):
        if not 0 <= value < V:
            raise ModelError(f"{folder.name}/config.json: {name} {value} is outside the vocabulary of {V} tokens.")


@hookimpl
def register_generators(register):
    register(Generator(INFO, generate, batch=generate_batch))


@hookimpl
def register_architectures(register):
    register(Architecture(family="vision-encoder-decoder", generator="caption",
                          matches=lambda cfg: cfg.get("model_type") == "vision-encoder-decoder",
                          check=check_folder, needs_tokenizer=True,
                          title="Vision encoder-decoder (ViT or DeiT + GPT-2 or BERT)"))
    register(Architecture(family="blip", generator="caption", matches=lambda cfg: cfg.get("model_type") == "blip",
                          check=check_folder, needs_tokenizer=False,  # tokenizer.json or vocab.txt
                          title="BLIP captioner"))


@hookimpl
def register_exporters(register):
    register("vision-encoder-decoder", lazy("plugins.caption.onnx", "export_caption"))
    register("blip", lazy("plugins.caption.onnx", "export_caption"))


@hookimpl
def register_trainers(register):
    register(Trainer("caption", "Train the shapes captioner (ViT + GPT-2)", lazy("plugins.caption.train", "main")))


@hookimpl
def register_finetuners(register):
    register(finetuner("caption", "LoRA on a captioner from captioned images (PEFT format; teaches new words)",
                       "plugins.caption.finetune", data="images", generator="caption"))
