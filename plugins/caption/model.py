"""Vision encoder-decoder captioner in the layout of transformers' ``VisionEncoderDecoderModel``.

A ViT encoder (``encoder.*``, plugins/caption/vit.py), an optional ``enc_to_dec_proj`` (present when the encoder's
hidden size differs from the decoder's, as transformers adds it), and a GPT-2 decoder with cross-attention
(``decoder.*``, engine/nn/gpt2.py). A folder saved by transformers loads by key copy.

The network offers two calls that a decoding loop needs (plugins/caption/decode.py drives them):
``encode(pixel_values) -> encoder states`` once per image, and ``decoder.step``-style calls through
``TorchCaptionRunner`` (``OnnxCaptionRunner`` in plugins/caption/onnx.py offers the same calls on onnxruntime).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from plugins.caption.bert import BertDecoderConfig, BertLMHeadDecoder, clean_bert_state
from plugins.caption.vit import ViTConfig, ViTModel, rename_legacy_keys
from engine.configs import read_json
from engine.errors import ModelError
from engine.nn.cache import no_cudnn_attention_on_cuda
from engine.nn.gpt2 import IGNORED_SUFFIXES, GPT2Config, GPT2LMHeadModel
from engine.weights import check_shapes

log = logging.getLogger(__name__)


@dataclass
class CaptionConfig:
    encoder: ViTConfig
    decoder: object  # GPT2Config or BertDecoderConfig
    decoder_start_token_id: int
    eos_token_id: int
    pad_token_id: int
    extra: dict = field(default_factory=dict)  # config.json as read

    @property
    def decoder_width(self) -> int:
        return self.decoder.n_embd if isinstance(self.decoder, GPT2Config) else self.decoder.hidden_size

    @property
    def needs_projection(self) -> bool:
        return self.encoder.hidden_size != self.decoder_width

    @classmethod
    def from_dict(cls, cfg: dict) -> "CaptionConfig":
        if cfg.get("model_type") != "vision-encoder-decoder":
            raise ModelError(f"config.json has model_type {cfg.get('model_type')!r}, not 'vision-encoder-decoder'.")
        enc, dec = cfg.get("encoder"), cfg.get("decoder")
        if not isinstance(enc, dict) or not isinstance(dec, dict):
            raise ModelError("config.json of a vision-encoder-decoder model needs 'encoder' and 'decoder' sections.")
        encoder = ViTConfig.from_dict(enc)
        kind = dec.get("model_type")
        if kind not in DECODER_TYPES:
            raise ModelError(f"The caption decoder {kind!r} is not supported; this studio runs GPT-2 and BERT "
                             "decoders (RoBERTa, BART, TrOCR and others are not implemented).")
        if not dec.get("add_cross_attention", False):
            raise ModelError(f"The {kind} decoder has no cross-attention (add_cross_attention is false in config.json).")
        if kind == "bert":
            decoder = BertDecoderConfig.from_dict(dec, 0, type_vocab=True, where="BERT decoder")
            decoder.encoder_hidden_size = decoder.hidden_size  # VisionEncoderDecoderModel projects to it
            cross = dec.get("cross_attention_hidden_size")
            if cross is not None and cross != decoder.hidden_size:
                raise ModelError("The BERT decoder's cross_attention_hidden_size differs from its hidden_size, "
                                 "which it cannot use; remove it so an enc_to_dec_proj layer is used instead.")
        else:
            try:
                decoder = GPT2Config.from_dict(dec)
            except (TypeError, ValueError) as exc:
                raise ModelError(f"The decoder section of config.json is invalid ({exc}).") from None
            if decoder.n_embd % decoder.n_head:
                raise ModelError("The GPT-2 decoder's n_embd is not a multiple of n_head.")
            cross = dec.get("cross_attention_hidden_size")
            if cross is not None and cross != decoder.n_embd:
                raise ModelError("The decoder's cross_attention_hidden_size differs from its n_embd, which GPT-2 "
                                 "cannot use; remove it so an enc_to_dec_proj layer is used instead.")

        def token(name, *fallbacks):
            for source in (cfg, dec):
                for key in (name,) + fallbacks:
                    if source.get(key) is not None:
                        return int(source[key])
            return None

        eos = token("eos_token_id")
        start = token("decoder_start_token_id", "bos_token_id")
        if eos is None or start is None:
            raise ModelError("config.json names no decoder_start_token_id/bos_token_id or eos_token_id.")
        pad = token("pad_token_id")
        return cls(encoder, decoder, start, eos, eos if pad is None else pad, extra=cfg)

    def to_dict(self) -> dict:
        """config.json as transformers writes it for a ViT + GPT-2 VisionEncoderDecoderModel."""
        dec = {f: getattr(self.decoder, f) for f in self.decoder.__dataclass_fields__}
        dec.update(model_type="gpt2", is_decoder=True, add_cross_attention=True, attn_pdrop=0.0, embd_pdrop=0.0,
                   resid_pdrop=0.0, initializer_range=0.02, reorder_and_upcast_attn=False, use_cache=True,
                   pad_token_id=self.pad_token_id, bos_token_id=self.decoder_start_token_id,
                   eos_token_id=self.eos_token_id)
        return {
            "model_type": "vision-encoder-decoder", "is_encoder_decoder": True, "tie_word_embeddings": False,
            "architectures": ["VisionEncoderDecoderModel"],
            "encoder": self.encoder.to_dict(), "decoder": dict(sorted(dec.items())),
            "decoder_start_token_id": self.decoder_start_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }


DECODER_TYPES = ("gpt2", "bert")


class CaptionModel(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.config = config
        self.encoder = ViTModel(config.encoder)
        bert = isinstance(config.decoder, BertDecoderConfig)
        self.decoder = BertLMHeadDecoder(config.decoder) if bert else GPT2LMHeadModel(config.decoder)
        if config.needs_projection:
            self.enc_to_dec_proj = nn.Linear(config.encoder.hidden_size, config.decoder_width)

    def encode(self, pixel_values):
        """(B, 3, H, W) -> encoder states (B, N+1, n_embd), projected to the decoder's width when needed."""
        h = self.encoder(pixel_values)
        if self.config.needs_projection:
            h = self.enc_to_dec_proj(h)
        return h

    def forward(self, pixel_values, decoder_input_ids):
        """Teacher-forced logits (B, T, V) without a cache (training, parity tests)."""
        if isinstance(self.decoder, BertLMHeadDecoder):
            return self.decoder(decoder_input_ids, cross=self.decoder.cross_kv(self.encode(pixel_values)))[0]
        logits, _ = self.decoder(decoder_input_ids, encoder_hidden_states=self.encode(pixel_values), use_cache=False)
        return logits


def build_model(config):
    """The torch network of a config: CaptionModel (vision-encoder-decoder) or BlipCaptionModel."""
    from plugins.caption.blip import BlipCaptionModel, BlipConfig

    return BlipCaptionModel(config) if isinstance(config, BlipConfig) else CaptionModel(config)


def _clean_state(state: dict, config=None) -> dict:
    from plugins.caption.blip import BlipConfig, clean_state

    if isinstance(config, BlipConfig):
        return clean_state(dict(state))
    if config is not None and isinstance(config.decoder, BertDecoderConfig):
        state = clean_bert_state(dict(state), "decoder.")
    out = {}
    for key, value in state.items():
        if key.endswith(IGNORED_SUFFIXES) or key.startswith("encoder.pooler."):
            continue
        if key.startswith("encoder."):
            key = "encoder." + rename_legacy_keys(key[len("encoder."):])
        out[key] = value
    if "decoder.lm_head.weight" not in out and "decoder.transformer.wte.weight" in out:
        out["decoder.lm_head.weight"] = out["decoder.transformer.wte.weight"]
    return out


def expected_shapes(config: CaptionConfig) -> dict:
    """{parameter name: shape} of a model of this config (built on the meta device: no memory, no maths)."""
    with torch.device("meta"):
        model = build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_shapes(config: CaptionConfig, shapes: dict, where: str, model=None) -> None:
    """ModelError when the weights named in ``shapes`` ({name: shape}) do not fit ``config`` (or ``model``,
    when one is already built: that avoids a meta-device build, whose ops import torch._dynamo)."""
    shapes = _clean_state(shapes, config)
    want = expected_shapes(config) if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(shapes, want, where)


def load_config(folder):
    """CaptionConfig (vision-encoder-decoder) or BlipConfig (blip) of a model folder."""
    from plugins.caption.blip import BlipConfig

    cfg = read_json(Path(folder) / "config.json", "a config.json")
    return BlipConfig.from_dict(cfg) if cfg.get("model_type") == "blip" else CaptionConfig.from_dict(cfg)


def load_caption_model(folder, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> CaptionModel:
    """The model of a folder (config.json + safetensors), in eval mode. dtype: float32 on CPU, float16 on CUDA
    unless given."""
    from engine.weights import load_state_dict

    config = load_config(folder)
    state = _clean_state(load_state_dict(folder), config)
    model = build_model(config)
    check_state_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, f"Model folder {folder}", model)
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    no_cudnn_attention_on_cuda(device)
    return model.to(device=device, dtype=dtype).eval()


class TorchCaptionRunner:
    """The network calls of a decoding loop, with numpy in and out so another backend can stand in.

    ``encode(pixel_values (1, 3, H, W) float32) -> state``; ``start(state, batch) -> past`` (a KV cache whose
    cross-attention K/V are computed once); ``step(ids (B, 1) int64, past) -> (logits (B, V) float32, past)``;
    ``reorder(past, index) -> past`` for beam search.
    """

    def __init__(self, model: CaptionModel):
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.inference_mode()
    def encode(self, pixel_values):
        x = torch.as_tensor(pixel_values, device=self.device, dtype=self.dtype)
        return self.model.encode(x)

    @torch.inference_mode()
    def start(self, state, batch: int = 1):
        past = self.model.decoder.new_cache()
        past.cross = self.model.decoder.cross_kv(state.expand(batch, -1, -1))
        return past

    @torch.inference_mode()
    def step(self, ids, past):
        logits, past = self.model.decoder.step(torch.as_tensor(ids, device=self.device), past)
        return logits.cpu().numpy(), past

    @torch.inference_mode()
    def reorder(self, past, index):
        past.reorder(torch.as_tensor(index, device=self.device))
        return past


def save_folder(model: CaptionModel, tokenizer, folder, dtype=torch.float16) -> None:
    """Write config.json, model.safetensors (``dtype``), tokenizer.json and preprocessor_config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tied = cfg.decoder.tie_word_embeddings
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
               if not (tied and k == "decoder.lm_head.weight")}  # tied to decoder.transformer.wte.weight
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    S = cfg.encoder.image_size
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": S, "width": S},
           "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
