"""GGUF files (llama.cpp, LM Studio, GPT4All, Jan, Ollama) turned into a Hugging Face style model folder:
``config.json`` from the GGUF metadata, the tensors dequantized to float16 in ``model.safetensors`` (under
transformers' names), ``tokenizer.json`` rebuilt from the GGUF vocabulary, and ``tokenizer_config.json`` carrying
the chat template. Uses the ``gguf`` package (imported on first use).

    gguf_to_folder(Path("model.gguf"), dest_folder)   # then the store imports dest_folder as usual
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from engine.errors import ModelError

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF general.architecture -> model_type
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
               "Q6_K")
# llama.cpp's tensor names -> transformers' ({} is the layer number)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
# pre-tokenizer regexes of llama.cpp's "tokenizer.ggml.pre" names (as the matching tokenizer.json files split)
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
}


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - a field this gguf version cannot decode is left out
            continue
    return out


def _unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row order for the ``llama`` architecture (its convert script permutes them)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise ModelError("Importing GGUF files needs the gguf package; install it with `pip install gguf`.") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on a damaged file
        raise ModelError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}: {exc}).") from None


def config_from_metadata(meta: dict, path: Path) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path.name} is a GGUF of architecture {arch!r}, which the studio does not import "
                         f"(supported: {', '.join(ARCHITECTURES)}).")

    def key(name, default=None):
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise ModelError(f"{path.name} lacks the GGUF metadata {arch}.{name}; the file is incomplete.")
        return v

    n_head = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    cfg = {
        "architectures": [], "model_type": ARCHITECTURES[arch], "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "head_dim": int(key("attention.key_length", hidden // n_head)),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)), "hidden_act": "silu",
        "vocab_size": len(meta.get("tokenizer.ggml.tokens") or []) or int(key("vocab_size")),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if meta.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ModelError(f"{path.name} uses rope scaling {meta[f'{arch}.rope.scaling.type']!r}, which the GGUF "
                         "import does not carry over yet.")
    return cfg


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, original: int):
    """llama.cpp's ``rope_freqs`` for Llama 3's rope scaling (convert_hf_to_gguf.py, LlamaModel): what each
    rotary frequency is divided by."""
    import numpy as np

    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (original / wavelen - low) / (high - low)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))


def rope_from_factors(factors, cfg: dict, path: Path) -> dict:
    """The config keys of a GGUF's ``rope_freqs`` tensor: Llama 3's rope scaling with the parameters that give
    these factors (GGUF keeps only the factors), or nothing when they are all 1; ModelError when no Llama 3
    scaling gives them (the model would run with the wrong positions)."""
    import numpy as np

    factors = np.asarray(factors, dtype=np.float64)
    if np.allclose(factors, 1.0):
        return {}
    factor = float(factors.max())
    for original in (2 ** k for k in range(4, 21)):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            want = llama3_factors(cfg["rope_theta"], cfg["head_dim"], factor, low, high, original)
            if want.shape == factors.shape and np.allclose(want, factors, rtol=1e-3):
                return {"rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                         "high_freq_factor": high, "original_max_position_embeddings": original}}
    raise ModelError(f"{path.name} scales its rotary positions (rope_freqs) in a way other than Llama 3's, which the "
                     "GGUF import cannot carry over.")


def tensors_from_gguf(reader, cfg: dict, path: Path) -> dict:
    """{transformers name: float16 numpy array}, dequantized."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype.name not in QUANT_TYPES:
            raise ModelError(f"{path.name} stores {t.name} as {qtype.name}, a quantization type the import does not "
                             f"read (supported: {', '.join(QUANT_TYPES)}).")
        shape = tuple(reversed([int(d) for d in t.shape]))
        if qtype.name == "BF16":
            raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
            w = raw.view(np.float32).reshape(shape)
        else:
            w = np.asarray(dequantize(t.data, qtype), dtype=np.float32).reshape(shape)
        name = TOP_NAMES.get(t.name)
        if name is None and t.name.startswith("blk."):
            _, n, rest = t.name.split(".", 2)
            if rest in LAYER_NAMES:
                name = f"model.layers.{int(n)}.{LAYER_NAMES[rest]}"
        if name is None:
            if t.name == "rope_freqs.weight":  # Llama 3.1/3.2's rope scaling, as llama.cpp stores it
                cfg.update(rope_from_factors(w.reshape(-1), cfg, path))
                continue
            raise ModelError(f"{path.name} has the tensor {t.name}, which the GGUF import does not place.")
        if cfg["model_type"] == "llama" and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif cfg["model_type"] == "llama" and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w.astype(np.float16 if qtype.name != "F32" else np.float32))
    return out


def tokenizer_from_metadata(meta: dict, path: Path):
    """A ``tokenizers.Tokenizer`` rebuilt from the GGUF vocabulary (byte-level BPE, tokenizer.ggml.model gpt2)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_bpe(meta)
    if kind != "gpt2":
        raise ModelError(f"{path.name} has a {kind!r} tokenizer; the GGUF import rebuilds byte-level BPE (gpt2) "
                         "and SentencePiece BPE (llama) tokenizers only so far.")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=
                               meta.get("tokenizer.ggml.pre") == "llama-bpe"))
    split = SPLITS.get(meta.get("tokenizer.ggml.pre", "default"))
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty in (3, 4)]
    if special:
        tok.add_special_tokens(special)
    return tok


def _sentencepiece_bpe(meta: dict):
    """SentencePiece BPE (tokenizer.ggml.model llama: Llama 2, Mistral, Phi-3): merges ranked by the merged
    piece's score, byte fallback, spaces as U+2581 with one in front (as transformers' LlamaConverter builds it)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, t in enumerate(tokens):
        if types[i] != 1:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                merges.append((-scores[i], vocab[a], vocab[b], a, b))
    merges.sort()
    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=tokens[unk], fuse_unk=True,
                               byte_fallback=True))
    prefix = [normalizers.Prepend("\u2581")] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
    tok.normalizer = normalizers.Sequence(prefix + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty in (2, 3, 4)]
    if special:
        tok.add_special_tokens(special)
    return tok


def gguf_to_folder(path: Path, dest: Path) -> None:
    """Write the model folder for the GGUF file ``path`` into ``dest`` (which exists and is empty)."""
    from safetensors.numpy import save_file

    reader = read_gguf(path)
    meta = _fields(reader)
    cfg = config_from_metadata(meta, path)
    if not len(reader.tensors):  # llama.cpp's ggml-vocab-*.gguf: a tokenizer and no model
        raise ModelError(f"{path.name} holds no weights (a vocabulary-only GGUF); import a GGUF file with the "
                         "model's tensors.")
    tensors = tensors_from_gguf(reader, cfg, path)
    cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
    if cfg["model_type"] == "qwen2" and not any(k.endswith("q_proj.bias") for k in tensors):
        raise ModelError(f"{path.name} is a qwen2 GGUF without q/k/v biases; the file is incomplete.")
    tok = tokenizer_from_metadata(meta, path)
    save_file(tensors, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(dest / "tokenizer.json"))
    tcfg = {"model_max_length": cfg["max_position_embeddings"]}
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for key in ("bos", "eos", "unknown", "padding"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            tcfg[{"unknown": "unk_token", "padding": "pad_token"}.get(key, f"{key}_token")] = tokens[i]
    if meta.get("tokenizer.chat_template"):
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    (dest / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    if cfg.get("eos_token_id") is not None:
        (dest / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg["eos_token_id"]}, indent=2))
    log.info("converted %s (%s, %d tensors) into %s", path.name, cfg["model_type"], len(tensors), dest)
