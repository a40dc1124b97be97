"""Checking and loading Llama / GPT-2 model folders (config.json, safetensors, tokenizer.json).

``check_folder(folder, family)`` validates without loading tensors (it reads the safetensors headers and builds
the expected shapes on torch's meta device); ``load_model(folder, family, device, dtype)`` returns the torch
model; ``load_tokenizer(folder)`` the ``tokenizers.Tokenizer``. Problems raise ``ModelError`` with one sentence.
"""
from __future__ import annotations

import logging
from pathlib import Path

from engine.configs import read_json
from engine.errors import ModelError
from engine.tokenizer import load_tokenizer  # noqa: F401  (a model folder's tokenizer.json)

from plugins.text.families import BY_MODEL_TYPE, BY_NAME

log = logging.getLogger(__name__)


def read_config(folder) -> dict:
    return read_json(Path(folder) / "config.json", "a config.json")


def build_model(cfg: dict, family: str, device=None, empty: bool = False):
    """A randomly initialised model of the family for this config (``device="meta"`` allocates nothing;
    ``empty``: parameters left uninitialised, for ``load_state_dict(..., assign=True)`` to replace)."""
    import contextlib

    import torch

    from engine.weights import no_init

    fam = BY_NAME.get(family) or BY_MODEL_TYPE.get(cfg.get("model_type"))
    if fam is None or cfg.get("model_type") != fam.model_type:
        raise ModelError(f"Unknown model family {cfg.get('model_type')!r}; supported: "
                         f"{', '.join(BY_MODEL_TYPE)}.")
    cfg = {**dict(fam.defaults), **cfg, **dict(fam.settings)}
    try:
        with torch.device(device or "cpu"), (no_init() if empty else contextlib.nullcontext()):
            if fam.network == "llama":
                from plugins.text.llama import LlamaConfig, LlamaForCausalLM
                return LlamaForCausalLM(LlamaConfig.from_dict(cfg))
            from engine.nn.gpt2 import GPT2Config, GPT2LMHeadModel
            return GPT2LMHeadModel(GPT2Config.from_dict(cfg))
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as exc:
        raise ModelError(f"config.json does not describe a valid {family} model ({exc}).") from None


FUSED = ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")  # Phi-3's names for q/k/v and gate/up in one


def split_fused(state: dict, cfg: dict) -> dict:
    """Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` weights as the separate q/k/v and gate/up ones the network
    has. ``state`` maps names to tensors, or to (shape, dtype) pairs as read from safetensors headers."""
    if not any(k.endswith(FUSED) for k in state):
        return state
    nh = int(cfg["num_attention_heads"])
    hs = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // nh)
    nkv = int(cfg.get("num_key_value_heads") or nh)
    out = {}
    for k, v in state.items():
        if k.endswith(FUSED[0]):
            parts, names = (nh * hs, nkv * hs, nkv * hs), ("q_proj", "k_proj", "v_proj")
        elif k.endswith(FUSED[1]):
            half = (v[0][0] if isinstance(v, tuple) else v.shape[0]) // 2
            parts, names = (half, half), ("gate_proj", "up_proj")
        else:
            out[k] = v
            continue
        base = k[: -len("qkv_proj.weight" if k.endswith(FUSED[0]) else "gate_up_proj.weight")]
        if isinstance(v, tuple):  # (shape, dtype): the split shapes, or the fused one where it does not split
            rows = v[0][0]
            for n, r in zip(names, parts if sum(parts) == rows else (rows,) * len(names)):
                out[base + n + ".weight"] = ((r,) + tuple(v[0][1:]), v[1])
        else:
            if sum(parts) != v.shape[0]:
                raise ModelError(f"Weight {k} has {v.shape[0]} rows but config.json implies {sum(parts)}.")
            for n, t in zip(names, v.split(parts)):
                out[base + n + ".weight"] = t.contiguous()
    return out


def _expected(model) -> dict:
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    return shapes, tied


def check_weights(folder, family: str, cfg: dict | None = None, model=None) -> None:
    from engine.nn import gpt2
    from engine.weights import check_shapes, read_shapes

    cfg = cfg if cfg is not None else read_config(folder)
    if model is None:  # a meta build allocates nothing, but its ops import torch._dynamo (seconds)
        model = build_model(cfg, family, device="meta")
    expected, tied = _expected(model)
    found = split_fused(read_shapes(folder), cfg)
    found = {k: v for k, v in found.items()
             if not k.endswith(gpt2.IGNORED_SUFFIXES) and not k.endswith("rotary_emb.inv_freq")}
    if BY_NAME[family].network == "gpt2" and found and not any(k.startswith("transformer.") for k in found):
        found = {"transformer." + k: v for k, v in found.items()}
    check_shapes({k: shape for k, (shape, _) in found.items()}, expected, f"Model folder {Path(folder).name}",
                 optional={"lm_head.weight"} if tied else ())
    for k, (_, dtype) in found.items():
        if dtype not in ("F32", "F16", "BF16"):
            raise ModelError(f"Weight {k} is stored as {dtype}; only float32, float16 and bfloat16 are supported.")


def check_folder(folder, family: str) -> None:
    """Raise ModelError unless config, weights and tokenizer fit together."""
    cfg = read_config(folder)
    check_weights(folder, family, cfg)
    tok = load_tokenizer(folder)
    if tok.get_vocab_size() > int(cfg.get("vocab_size", 0)):
        raise ModelError(f"tokenizer.json has {tok.get_vocab_size()} tokens but the model only "
                         f"{cfg.get('vocab_size')}; the tokenizer does not belong to this model.")
    from engine.store import read_generation_config

    for name, source in (("config.json", cfg), ("generation_config.json", read_generation_config(folder))):
        for key in ("bos_token_id", "eos_token_id"):
            v = source.get(key)
            ids = v if isinstance(v, list) else [v] if v is not None else []
            if not all(type(i) is int and 0 <= i < int(cfg["vocab_size"]) for i in ids):
                raise ModelError(f"{name}'s {key} is {str(v)[:40]!r}; it must be a token number below the "
                                 f"vocabulary size {cfg['vocab_size']} (the file is damaged or was edited).")


def load_model(folder, family: str, device: str = "cpu", dtype=None):
    """The torch model in eval mode; fp16 on CUDA unless ``dtype`` says otherwise, fp32 on the CPU."""
    import torch

    from engine.weights import load_state_dict

    cfg = read_config(folder)
    model = build_model(cfg, family, empty=True)  # no random initialisation: the weights are assigned below
    check_weights(folder, family, cfg, model)
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    state = load_state_dict(folder)  # memory-mapped from the safetensors file(s); float32 ones are used in place
    if BY_NAME[family].network == "llama":
        from plugins.text.llama import load_hf_state_dict
    else:
        from engine.nn.gpt2 import load_hf_state_dict
    try:
        load_hf_state_dict(model, {k: v.float() for k, v in split_fused(state, cfg).items()}, assign=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelError(f"Weights of {Path(folder).name} do not load: {exc}.") from None
    if any(k.endswith(FUSED) for k in state):  # LoRA files name the fused layers (engine.nn.lora)
        model.fused_layers = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    from engine.nn.cache import no_cudnn_attention_on_cuda
    no_cudnn_attention_on_cuda(device)
    return model.to(device=device, dtype=dtype).eval()


def end_token_ids(folder, cfg: dict) -> list:
    """The tokens that end generation: generation_config.json's eos_token_id when it gives one (it wins for
    generation settings, with a log note when it differs from config.json's), else config.json's."""
    from engine.store import read_generation_config

    gen = token_ids(read_generation_config(folder), "eos_token_id")
    base = token_ids(cfg, "eos_token_id")
    if gen and base and set(gen) != set(base):
        log.info("%s: generation_config.json ends generation at tokens %s, config.json says %s; using the "
                 "generation config's.", Path(folder).name, gen, base)
    return gen or base


def token_ids(cfg: dict, key: str) -> list:
    v = cfg.get(key)
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [int(v)]
