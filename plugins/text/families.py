"""The decoder families the text generator runs. Each is one of the networks of this package (``llama``: llama.py,
``gpt2``: engine/nn/gpt2.py) with its own config.json ``model_type`` and a few settings, so a family that differs
from one of them only in settings is one entry here. No torch at import: the plugin registers from this table."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # the store's family name
    title: str
    model_type: str  # config.json "model_type"
    network: str  # "llama" | "gpt2"
    settings: tuple = ()  # (key, value) pairs laid over config.json for the network (what the family implies)
    defaults: tuple = ()  # (key, value) pairs for keys config.json may leave out: transformers' config defaults
    add_bos: bool = True  # whether a prompt starts with the BOS token


GEMMA = (("norm_offset", True), ("embed_scale", True), ("sandwich_norms", True))
TIED = (("tie_word_embeddings", True),)  # Gemma's configs as Google ships them have no such key: tied
QWEN = (("use_sliding_window", False),)  # Qwen2/Qwen3Config: a sliding_window is given but off unless said

FAMILIES = (
    Family("llama", "Llama", "llama", "llama"),
    Family("gpt2", "GPT-2", "gpt2", "gpt2", add_bos=False),
    Family("qwen2", "Qwen2 / Qwen2.5", "qwen2", "llama", settings=(("qkv_bias", True),), add_bos=False,
           defaults=QWEN),
    Family("qwen3", "Qwen3", "qwen3", "llama", settings=(("qk_norm", True),), add_bos=False, defaults=QWEN),
    Family("mistral", "Mistral", "mistral", "llama"),
    Family("phi3", "Phi-3 / Phi-3.5", "phi3", "llama"),  # fused qkv_proj / gate_up_proj: split on load (models.py)
    Family("gemma2", "Gemma 2", "gemma2", "llama", settings=GEMMA, defaults=TIED),
    Family("gemma3_text", "Gemma 3 (text)", "gemma3_text", "llama", settings=GEMMA + (("qk_norm", True),),
           defaults=TIED),
)
BY_NAME = {f.name: f for f in FAMILIES}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES}


def family(name: str) -> Family:
    return BY_NAME[name]


def prompt_ids(tokenizer, prompt: str, bos, add_bos: bool) -> list:
    """A prompt's token ids as the text generator reads them: with the BOS token first where the family adds it (or
    where the prompt is empty); the API server counts a prompt against the context with this too."""
    ids = tokenizer.encode(prompt or "").ids
    if bos is not None and (not ids or (add_bos and ids[0] != bos)):
        ids = [bos] + ids
    return ids
