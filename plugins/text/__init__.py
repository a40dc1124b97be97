"""Built-in plugin: text generation with decoder-only language models (Llama and GPT-2 families).

Runs model folders as transformers writes them (``LlamaForCausalLM``, ``GPT2LMHeadModel``) on the torch backend
(CPU or CUDA) or on an ONNX export (onnxruntime). torch is imported inside functions, never at import time.
"""
from __future__ import annotations

import time
from pathlib import Path

from engine import hookimpl
from engine.architectures import Architecture
from engine.errors import UsageError
from plugins.text.families import FAMILIES, family
from engine.generators import (MERGE_FIRST, Generator, GeneratorInfo, Trainer, finetuner, lazy, Option, Progress,
                               Result, timed)

INFO = GeneratorInfo(
    id="text", title="Text", description="Continue a prompt with a language model (streams as it writes).",
    takes=("text",), makes="text",
    options=(
        Option("max_new_tokens", "int", 200, "How many tokens to write at most", min=1, max=2048),
        Option("temperature", "float", 0.8, "Randomness; 0 always picks the most likely token", min=0.0, max=2.0),
        Option("top_k", "int", 50, "Sample among the k most likely tokens (0 = all)", min=0, max=10000),
        Option("top_p", "float", 0.95, "Sample among the most likely tokens whose probability reaches p (1 = all)",
               min=0.01, max=1.0),
        Option("repetition_penalty", "float", 1.0, "Discourage repeating tokens already used (1 = off)",
               min=1.0, max=3.0),
        Option("presence_penalty", "float", 0.0, "OpenAI's presence penalty: lower every token already written "
               "by this much (0 = off; negative favours them)", min=-2.0, max=2.0),
        Option("frequency_penalty", "float", 0.0, "OpenAI's frequency penalty: lower a written token by this much "
               "for each time it was written (0 = off)", min=-2.0, max=2.0),
        Option("stop", "str", "", "Stop before any of these strings; separate several with |, write \\n for a "
                                  "new line"),
    ),
    families=tuple(f.name for f in FAMILIES),
    prompt_required=False,
    takes_lora=True,
)


def _pipeline(request, context):
    from plugins.text.models import end_token_ids, load_tokenizer, read_config
    from plugins.text.pipeline import TextPipeline, TorchDecoder

    model = request.model
    if model is None:
        raise UsageError("The text generator needs a model; pass one with --model.")

    def load():
        folder = Path(model.path)
        cfg = read_config(folder)
        tokenizer = load_tokenizer(folder)
        if request.backend == "onnx":
            from plugins.text.onnx import load_decoder

            decoder, export = load_decoder(folder, model.hash, export=request.export)
            notes = list(export.notes)
        else:
            from engine.nn.lora import apply_adapters
            from plugins.text.models import load_model

            net = apply_adapters(load_model(folder, model.family, request.device), request.adapters)
            decoder, notes = TorchDecoder(net, request.device), []
        bos = cfg.get("bos_token_id")
        pipe = TextPipeline(decoder, tokenizer, bos_token_id=bos if isinstance(bos, int) else None,
                            eos_token_ids=end_token_ids(folder, cfg), add_bos=family(model.family).add_bos)
        pipe.load_notes = notes  # what opening it noticed; the first generation on it reports them
        return pipe
    return context.loaded("text", request, load, onnx_lora=MERGE_FIRST)


CHAT_INFO = GeneratorInfo(
    id="chat", title="Chat", description="Talk with a language model in turns, in the model's own chat template.",
    takes=("messages",), makes="text", options=INFO.options, families=INFO.families, prompt_required=False,
    takes_lora=True,
)


def _text_request(request):
    from plugins.text.pipeline import TextRequest, parse_stop
    from plugins.text.sampling import SamplingOptions

    opts = request.options
    return TextRequest(max_new_tokens=opts["max_new_tokens"], sampling=SamplingOptions.from_options(opts),
                       stop=parse_stop(opts.get("stop", "")), seed=request.seed)


def generate(request, context):
    where = request.backend + (f", {Path(request.export).name}" if request.export else "")
    yield Progress(0, 1, f"loading {request.model.name if request.model else 'the model'} ({where})")
    t0 = time.perf_counter()
    pipe = _pipeline(request, context)
    notes = pipe.__dict__.pop("load_notes", [])
    load_s = time.perf_counter() - t0
    context.cancel.raise_if_cancelled()
    req = _text_request(request)
    yield Progress(0, req.max_new_tokens, "writing")
    for event in timed(pipe.run(request.prompt or "", req, context.cancel), load_s):
        if isinstance(event, Result):
            event.warnings.extend(notes)
        yield event


def generate_batch(requests: list, context) -> list:
    """Several prompts with the same model, backend and options (each with its own seed) as one left-padded batch
    (plugins.text.pipeline); each gets the tokens it gets alone. One Result per request, in order."""
    t0 = time.perf_counter()
    pipe = _pipeline(requests[0], context)
    notes = pipe.__dict__.pop("load_notes", [])
    load_s = time.perf_counter() - t0
    results = [None] * len(requests)
    events = pipe.run_batch([r.prompt or "" for r in requests], [_text_request(r) for r in requests],
                            context.cancel)
    for i, event in events:
        if isinstance(event, Result):
            event.info["timings"] = {"load_s": round(load_s, 4), "generate_s": event.info.get("seconds")}
            event.warnings.extend(notes)
            results[i] = event
    return results


def _checker(name: str):
    def check(folder: Path) -> None:
        from plugins.text.models import check_folder

        check_folder(folder, name)
    return check


@hookimpl
def register_generators(register):
    register(Generator(INFO, generate, batch=generate_batch))
    register(Generator(CHAT_INFO, lazy("plugins.text.chat", "generate")))


@hookimpl
def register_architectures(register):
    for f in FAMILIES:
        register(Architecture(family=f.name, generator="text", check=_checker(f.name), needs_tokenizer=True,
                              title=f.title, matches=lambda cfg, t=f.model_type: cfg.get("model_type") == t))


@hookimpl
def register_exporters(register):
    for f in FAMILIES:
        register(f.name, lazy("plugins.text.onnx", "export_text"))


@hookimpl
def register_trainers(register):
    register(Trainer("text", "Train a Llama language model on a folder of text (the built-in Shakespeare model)",
                     lazy("plugins.text.train", "main")))


@hookimpl
def register_finetuners(register):
    register(finetuner("text", "LoRA on a text model from a folder of .txt files (PEFT format)",
                       "plugins.text.finetune", data="text", generator="text"))
