"""ONNX export of the text decoders (Llama and its families, GPT-2) and their onnxruntime runner.

The export folder is laid out so onnxruntime-genai and Optimum's ``ORTModelForCausalLM`` load it as it is:
``model.onnx`` with inputs ``input_ids`` (batch, sequence) int64, ``attention_mask`` (batch, total_sequence) int64
(1 = token, 0 = padding), ``position_ids`` (batch, sequence) int64 and ``past_key_values.{i}.key/value``
(batch, n_kv, past_sequence, head_dim); outputs ``logits`` (batch, sequence, vocab) float32 and
``present.{i}.key/value`` (batch, n_kv, total_sequence, head_dim). Prefill passes an empty past
(past_sequence = 0). Beside it: ``genai_config.json``, ``config.json``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json`` and the studio's manifest ``onnx.json``.
torch is imported inside the export functions only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from engine.backends.decoders import decoder_parity, export_decoder, quantized_parity, torch_stepper
from engine.configs import read_json

log = logging.getLogger(__name__)


# ----- runtime (no torch) ------------------------------------------------------------------------
def load_decoder(model_folder, model_hash=None, threads=None, export=None):
    """(OnnxDecoder, export) for a text model folder's export ``export`` (default: the preferred one)."""
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import open_export

    export = open_export(Path(model_folder), model_hash, threads, export)
    return OnnxDecoder(export.session("decoder"), export.manifest["config"]), export


# ----- export (torch) ----------------------------------------------------------------------------
def load_torch_model(folder, family: str):
    """The fp32 torch model of a Llama or GPT-2 folder, in eval mode (plugins.text.models.load_model)."""
    import torch

    from plugins.text.models import load_model

    return load_model(folder, family, "cpu", torch.float32)


def runtime_config(model, family: str) -> dict:
    from plugins.text.llama import LlamaForCausalLM

    c = model.config
    if isinstance(model, LlamaForCausalLM):
        return {"family": family, "n_layers": c.num_hidden_layers, "n_kv_heads": c.num_key_value_heads,
                "n_heads": c.num_attention_heads, "hidden_size": c.hidden_size, "head_dim": c.head_dim, "vocab_size": c.vocab_size, "max_positions": c.max_position_embeddings,
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}
    return {"family": family, "n_layers": c.n_layer, "n_kv_heads": c.n_head, "n_heads": c.n_head,
            "hidden_size": c.n_embd, "head_dim": c.n_embd // c.n_head,
            "vocab_size": c.vocab_size, "max_positions": c.n_positions, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id}


# ----- quality of the quantized graphs -----------------------------------------------------------------------------
def corpus_dir() -> Path:
    env = os.environ.get("STUDIO_SHAKESPEARE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"


# the text the studio ships (public domain), held out from every model it trains: where the Shakespeare corpus is
# not (an installed studio), the quantized graphs are measured and gated on it
SHIPPED_TEXT = Path(__file__).resolve().parents[2] / "resources" / "data" / "psalms" / "psalms_kjv.txt"


def heldout_text(studio: dict, chars: int = 6000):
    """(name, text): the first ``chars`` characters of the model's first held-out work (default hamlet.txt), else
    of the psalms the studio ships."""
    works = (studio.get("scores") or {}).get("heldout_works") or ["hamlet.txt"]
    if isinstance(works, str):
        works = [w.strip() for w in works.split(",")]
    path = corpus_dir() / works[0]
    if not path.is_file():
        path = SHIPPED_TEXT
        if not path.is_file():
            return None, None
    return path.name, path.read_text(encoding="utf-8")[:chars]


def bits_per_char(logits_fn, ids: list, n_chars: int, context: int) -> float:
    """Total nats of the tokens over non-overlapping windows of ``context`` tokens / ln 2 / characters."""
    nats = 0.0
    for start in range(0, len(ids) - 1, context):
        window = np.array(ids[start:start + context + 1], dtype=np.int64)
        if len(window) < 2:
            break
        logits = np.asarray(logits_fn(window[None, :-1])[0], dtype=np.float64)  # (T, V)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nats -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
    return nats / math.log(2) / n_chars


def top1_agreement(fp32_fn, q_fn, ids: list, context: int) -> tuple:
    """(agreeing positions, positions, largest |logit difference|, largest |fp32 logit|): the quantized graph's
    top-1 token against the fp32 graph's at every position of ``ids``, read in non-overlapping windows of
    ``context`` tokens."""
    agree = total = 0
    diff = scale = 0.0
    for start in range(0, len(ids), context):
        window = np.array([ids[start:start + context]], dtype=np.int64)
        f, q = np.asarray(fp32_fn(window)[0]), np.asarray(q_fn(window)[0])
        agree += int((f.argmax(-1) == q.argmax(-1)).sum())
        total += window.shape[1]
        diff, scale = max(diff, float(np.abs(f - q).max())), max(scale, float(np.abs(f).max()))
    return agree, total, diff, scale


def heldout_gate(quality: dict, scheme: str) -> dict:
    """The quantized graph's top-1 agreement and logit difference on held-out text, judged by the gate's own rule
    (QUANT_TOLERANCE): the gate's random prompts are few, and a graph that passed them could still drift on real
    text (a manifest recorded 566/1000 beside a passed gate). {} when no held-out text was read."""
    from engine.backends.decoders import QUANT_TOLERANCE

    measured = quality.pop("_heldout", None)
    if measured is None:
        return {}
    agree, total, diff, scale = measured
    tol = QUANT_TOLERANCE[scheme]
    top1, limit = agree / max(total, 1), tol["max_rel_logit_diff"] * scale
    return {f"heldout_text_{scheme}": {
        "against": "the fp32 ONNX graph", "scheme": scheme, "max_abs_diff": float(f"{diff:.3g}"),
        "tolerance": float(f"{limit:.3g}"), "top1_agreement": round(top1, 4),
        "min_top1_agreement": tol["min_top1_agreement"], "passed": bool(top1 >= tol["min_top1_agreement"]),
        "rule": f"top-1 agreement >= {tol['min_top1_agreement']:.0%} and max |logit diff| <= "
                f"{tol['max_rel_logit_diff']:g} x max |fp32 logit|, as the gate's",
        "inputs": quality.get(f"top1_agreement_{scheme}_vs_fp32", "")}}


def text_quality(folder: Path, studio: dict, torch_model, fp32_decoder, q_decoder, vocab: int, max_pos: int,
                 scheme: str = "int8", greedy_tokens: int = 32) -> dict:
    """Held-out bits per character under torch fp32, onnxruntime fp32 and the quantized graph (``scheme``),
    and for how many greedy tokens the quantized graph follows the fp32 one."""
    from tokenizers import Tokenizer

    out = {}
    name, text = heldout_text(studio)
    tok_path = Path(folder) / "tokenizer.json"
    if text and tok_path.is_file():
        ids = [i for i in Tokenizer.from_file(str(tok_path)).encode(text).ids if i < vocab]
        context = min(max_pos - 1, 256)
        step = torch_stepper(torch_model)
        bpc_t = bits_per_char(lambda x: step(x, None)[0], ids, len(text), context)
        bpc_f = bits_per_char(lambda x: fp32_decoder(x)[0], ids, len(text), context)
        bpc_q = bits_per_char(lambda x: q_decoder(x)[0], ids, len(text), context)
        out.update({"heldout": f"first {len(text)} characters of {name}", "bpc_torch_fp32": round(bpc_t, 4),
                    "bpc_onnx_fp32": round(bpc_f, 4), f"bpc_onnx_{scheme}": round(bpc_q, 4),
                    f"bpc_cost_{scheme}": round(bpc_q - bpc_f, 4)})
        measured = top1_agreement(lambda x: fp32_decoder(x)[0], lambda x: q_decoder(x)[0], ids[:1000], context)
        out[f"top1_agreement_{scheme}_vs_fp32"] = f"{measured[0]}/{measured[1]} tokens of {name}"
        out["_heldout"] = measured  # for heldout_gate
        prompt = np.array([ids[:16]], dtype=np.int64)
    else:
        out["heldout"] = "not measured (held-out text or tokenizer not found)"
        prompt = np.random.default_rng(0).integers(0, vocab, size=(1, 16), dtype=np.int64)
    n = min(greedy_tokens, max_pos - prompt.shape[1])
    seqs = []
    for dec in (fp32_decoder, q_decoder):
        toks, (logits, past) = [], dec.step(prompt)
        for _ in range(n):
            t = int(logits[0].argmax())
            toks.append(t)
            logits, past = dec.step(np.array([[t]], dtype=np.int64), past)
        seqs.append(toks)
    same = next((i for i, (a, b) in enumerate(zip(*seqs)) if a != b), n)
    out[f"greedy_{scheme}_matches_fp32_for_tokens"] = f"{same}/{n}"
    return out


def compact_graph(model, family: str):
    """What the exporter traces for a Llama: a copy of the model in its export form (fused projections,
    grouped-query attention without repeats: LlamaForCausalLM.fuse_for_export), wrapped to take and give flat
    tensors; None for the other families (engine.backends.decoders picks their form)."""
    import copy

    from engine.backends.decoders import decoder_wrapper

    from plugins.text.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        return None
    return decoder_wrapper(copy.deepcopy(model).fuse_for_export(), model.config.num_hidden_layers, positions=True)


# ----- the files other runtimes read ------------------------------------------------------------------
# onnxruntime-genai model types that run a plain decoder graph with separate past key/value inputs; anything else
# (GPT-2 included: genai's "gpt2" type expects a combined past) runs as "llama", which is the same decoder loop
GENAI_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3_text")


def hf_config(folder: Path, model) -> dict:
    """The model's transformers config.json (from its folder; written from the model for a studio-trained one)."""
    path = Path(folder) / "config.json"
    config = {}
    if path.is_file():
        config = read_json(path)
    if "model_type" not in config and hasattr(model.config, "to_hf_dict"):
        config = model.config.to_hf_dict()
    config["use_cache"] = True
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    return config


def write_open_layout(folder: Path, out_dir: Path, model, cfg: dict, graph: str = "model.onnx") -> list:
    """config.json, generation_config.json, tokenizer.json, tokenizer_config.json and genai_config.json beside
    ``graph``: what onnxruntime-genai and Optimum read. Returns the names written."""
    from engine.store import read_generation_config
    from plugins.text.models import end_token_ids

    out_dir, folder = Path(out_dir), Path(folder)
    config = hf_config(folder, model)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    written = ["config.json"]
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    gen = {**gen, **read_generation_config(folder)}  # a damaged file is passed over, as when generating
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    written.append("generation_config.json")
    ends = end_token_ids(folder, {"eos_token_id": cfg["eos_token_id"]})  # generation_config.json's win, as when
    eos = ends[0] if len(ends) == 1 else ends or cfg["eos_token_id"]  # the studio generates (an Instruct model's
    # end-of-turn token is often only there)
    pad = config.get("pad_token_id")
    if (folder / "tokenizer.json").is_file():
        shutil.copyfile(folder / "tokenizer.json", out_dir / "tokenizer.json")
        written.append("tokenizer.json")
        if (folder / "tokenizer_config.json").is_file():
            shutil.copyfile(folder / "tokenizer_config.json", out_dir / "tokenizer_config.json")
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            name = (lambda i: tok.id_to_token(i) if isinstance(i, int) else None)
            first = (lambda i: i[0] if isinstance(i, list) and i else i)
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_positions"],
                  "bos_token": name(first(cfg["bos_token_id"])), "eos_token": name(first(eos)),
                  "clean_up_tokenization_spaces": False}
            (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n", encoding="utf-8")
        written.append("tokenizer_config.json")
    mtype = config.get("model_type")
    genai = {"model": {
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
        "context_length": cfg["max_positions"], "vocab_size": cfg["vocab_size"],
        "type": mtype if mtype in GENAI_TYPES else "llama",
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": graph, "head_size": cfg["head_dim"], "hidden_size": cfg["hidden_size"],
            "num_attention_heads": cfg["n_heads"], "num_hidden_layers": cfg["n_layers"],
            "num_key_value_heads": cfg["n_kv_heads"],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"}}},
        "search": {"do_sample": False, "num_beams": 1, "max_length": cfg["max_positions"], "min_length": 0,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "num_return_sequences": 1, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0}}
    (out_dir / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n", encoding="utf-8")
    written.append("genai_config.json")
    return written


# ----- the exporter ---------------------------------------------------------------------------------
def export_text(model_ref, out_dir: Path, options: dict) -> dict:
    """Exporter registered for the llama and gpt2 families (see engine.onnx_export for the contract)."""
    import torch

    from engine.backends.common import describe_graphs, quantize_graphs, replace_graphs
    from engine.backends.decoder import OnnxDecoder
    from engine.backends.runtime import open_session

    say = options.get("log") or (lambda m: None)
    torch.manual_seed(0)
    model = load_torch_model(model_ref.path, model_ref.family)
    cfg = runtime_config(model, model_ref.family)
    path = Path(out_dir) / "model.onnx"
    say(f"exporting the {model_ref.family} decoder ({cfg['n_layers']} layers) to ONNX")
    export_decoder(model, cfg, path, module=compact_graph(model, model_ref.family), positions=True)
    graphs, opset = describe_graphs({"decoder": path})
    write_open_layout(Path(model_ref.path), out_dir, model, cfg, path.name)
    fp32 = OnnxDecoder(open_session(path), cfg)
    say("checking parity with PyTorch")
    parity = {"decoder_logits": decoder_parity(torch_stepper(model), fp32, cfg["vocab_size"])}
    options.get("gate", lambda p: None)(parity)
    result = {"graphs": graphs, "parity": parity, "config": cfg, "opset": opset}
    scheme = options.get("quantize")
    if scheme:
        say(f"quantizing the weights to {scheme} and gating the quantized graph against fp32")
        qpath = quantize_graphs({"decoder": path}, scheme)["decoder"]
        qdec = OnnxDecoder(open_session(qpath), cfg)
        gate = {f"decoder_logits_{scheme}": quantized_parity(fp32, qdec, cfg["vocab_size"], scheme)}
        options.get("gate", lambda p: None)(gate)  # refuse a quantized graph that drifts, before the slow part
        parity.update(gate)
        say(f"measuring the quality cost of {scheme}")
        quality = text_quality(Path(model_ref.path), model_ref.studio, model, fp32, qdec, cfg["vocab_size"],
                               cfg["max_positions"], scheme)
        quality[f"{scheme}_vs_torch_logits"] = decoder_parity(torch_stepper(model), qdec,
                                                              cfg["vocab_size"])["max_abs_diff"]
        held = heldout_gate(quality, scheme)
        options.get("gate", lambda p: None)(held)
        parity.update(held)
        del fp32, qdec
        replace_graphs(((qpath, path),))
        result["graphs"], _ = describe_graphs({"decoder": path})
        result["quantization"] = {"quality": quality}
    return result
