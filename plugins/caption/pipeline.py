"""Caption an image with a vision-encoder-decoder model folder: preprocessing, decoding, detokenising.

    pipe = CaptionPipeline.from_folder("resources/models/shapes-captioner")
    out = pipe("scene.png", num_beams=1, max_new_tokens=20)   # -> CaptionOutput(text, token_ids, score, ...)
    for piece in pipe.stream("scene.png"): ...               # greedy, text pieces as they are decoded
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from plugins.caption.decode import beam_search, greedy_batch, greedy_tokens
from engine.configs import read_json
from engine.errors import ModelError


@dataclass
class CaptionOutput:
    text: str
    token_ids: list  # generated ids, without the start and end tokens
    score: float  # mean log-probability per generated token (end token included)
    finished: bool  # False when max_new_tokens cut the caption
    beams: list = field(default_factory=list)  # beam search: [(text, score)] best first


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD, BlipImageProcessor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Preprocess:
    """Image processor settings of ``preprocessor_config.json``, applied as transformers' (PIL) image processors
    apply them: resize (square, or shortest edge), center crop, rescale, normalise (engine.images.to_pixel_values)."""
    size: object  # int S, or (H, W)
    mean: Optional[tuple] = (0.5, 0.5, 0.5)
    std: Optional[tuple] = (0.5, 0.5, 0.5)
    resample: int = 2
    rescale: Optional[float] = 1 / 255
    crop: Optional[tuple] = None  # (H, W) center crop after resizing
    shortest_edge: Optional[int] = None

    @property
    def out_size(self) -> tuple:
        if self.crop is not None:
            return tuple(self.crop)
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    @classmethod
    def from_dict(cls, cfg: dict, image_size: int, where: str = "preprocessor_config.json") -> "Preprocess":
        def hw(value, name):
            if isinstance(value, int):
                return (value, value)
            if isinstance(value, dict) and "height" in value and "width" in value:
                return (int(value["height"]), int(value["width"]))
            raise ModelError(f"{where}: {name} {value!r} is not a size this studio reads (an int or height/width).")

        size, shortest = cfg.get("size", image_size), None
        if isinstance(size, dict) and "shortest_edge" in size and "height" not in size:
            shortest, size = int(size["shortest_edge"]), None
            if not cfg.get("do_center_crop", False):
                raise ModelError(f"{where} resizes by the shortest edge without a center crop; the encoder needs "
                                 "a fixed size.")
        elif cfg.get("do_resize", True):
            size = hw(size, "size")
        else:
            size = (image_size, image_size)  # not resized: the image must already have the size (resized anyway)
        crop = hw(cfg.get("crop_size", image_size), "crop_size") if cfg.get("do_center_crop", False) else None
        norm = cfg.get("do_normalize", True)
        if norm and not all(isinstance(v, (int, float)) and v > 0 for v in cfg.get("image_std", (0.5,) * 3)):
            raise ModelError(f"{where}: image_std {cfg.get('image_std')!r} must be positive numbers.")
        pre = cls(size, tuple(cfg.get("image_mean", (0.5,) * 3)) if norm else None,
                  tuple(cfg.get("image_std", (0.5,) * 3)) if norm else None, int(cfg.get("resample", 2)),
                  float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None, crop, shortest)
        if shortest is None and pre.out_size != (image_size, image_size):
            raise ModelError(f"{where} makes images of {pre.out_size[1]} x {pre.out_size[0]} pixels but the encoder "
                             f"takes {image_size} x {image_size}.")
        return pre

    @classmethod
    def from_folder(cls, folder, image_size: int) -> "Preprocess":
        """From transformers' ``preprocessor_config.json`` when present, else the defaults of the model type's image
        processor at ``image_size`` (BLIP's: CLIP's mean and std, bicubic; otherwise ViT's), with a log note."""
        import logging

        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            blip = read_json(Path(folder) / "config.json").get("model_type") == "blip"
            logging.getLogger(__name__).warning("%s has no preprocessor_config.json; images are prepared with %s "
                                                "image processor's defaults.", Path(folder).name,
                                                "BLIP's" if blip else "ViT's")
            return cls(image_size, CLIP_MEAN, CLIP_STD, 3) if blip else cls(image_size)
        return cls.from_dict(read_json(path), image_size, str(path))

    def __call__(self, image) -> np.ndarray:
        from engine.images import to_pixel_values

        return to_pixel_values(image, self.size, self.mean, self.std, self.resample, self.rescale, self.crop,
                               self.shortest_edge)


class CaptionPipeline:
    def __init__(self, runner, tokenizer, config, preprocess: Preprocess):
        self.runner, self.tokenizer, self.config, self.preprocess = runner, tokenizer, config, preprocess
        self.start_id, self.eos_id = config.decoder_start_token_id, config.eos_token_id
        self.max_positions = config.decoder.n_positions

    @classmethod
    def from_export(cls, folder, export_dir=None, model_hash: str | None = None,
                    threads: int | None = None, export=None) -> "CaptionPipeline":
        """onnxruntime sessions in place of the torch model (plugins/caption/onnx.py): the model folder's registered
        export, or ``export_dir`` (an ``--out`` export, which the backend itself never opens)."""
        from plugins.caption.tokenizer import load_tokenizer
        from plugins.caption.onnx import load_caption

        runner, config = load_caption(folder, model_hash, threads, export_dir, export)
        return cls(runner, load_tokenizer(folder), config, Preprocess.from_folder(folder, config.encoder.image_size))

    @classmethod
    def from_folder(cls, folder, device: str = "cpu", backend: str = "torch",
                    model_hash: str | None = None, export=None, adapters=()) -> "CaptionPipeline":
        """``model_hash``: with the onnx backend, an export made from another version of the model is refused;
        ``export``: the registered export folder to run (default: the preferred one); ``adapters``: LoRA
        (engine.generators.AdapterRef) on the torch backend; one that adds words brings its tokenizer.json."""
        from plugins.caption.tokenizer import load_tokenizer

        if backend == "onnx":
            return cls.from_export(folder, model_hash=model_hash, export=export)
        from plugins.caption.model import TorchCaptionRunner, load_caption_model

        from engine.nn.lora import apply_adapters

        model = apply_adapters(load_caption_model(folder, device=device), adapters)
        folders = [Path(a.path) if Path(a.path).is_dir() else Path(a.path).parent for a in adapters]
        grown = [f for f in folders if (f / "tokenizer.json").is_file()]
        return cls(TorchCaptionRunner(model), load_tokenizer(grown[-1] if grown else folder), model.config,
                   Preprocess.from_folder(folder, model.config.encoder.image_size))

    def pixel_values(self, image) -> np.ndarray:
        """A path, bytes or PIL image -> (1, 3, S, S) float32 (UsageError for unreadable images)."""
        from engine.images import load_image

        return self.preprocess(load_image(image))

    def prompt(self, prefix: str = "") -> list:
        """The decoder's first ids: the start token, then the prefix's tokens (BLIP's "a picture of")."""
        from engine.errors import UsageError

        prefix = (prefix or "").strip()
        enc = self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else None
        ids = enc.ids if enc else []
        unk = getattr(self.tokenizer.model, "unk_token", None)
        unknown = [prefix[a:b] for t, (a, b) in zip(enc.tokens, enc.offsets) if t == unk] if enc and unk else []
        if unknown:  # they would be dropped from the caption without a word
            raise UsageError(f"This model does not know the word(s) {', '.join(repr(w) for w in unknown)} of the "
                             "caption prefix; use words from its vocabulary.")
        if 1 + len(ids) >= self.max_positions:
            raise UsageError(f"The caption prefix is {len(ids)} tokens long; this model reads at most "
                             f"{self.max_positions - 2}.")
        return [self.start_id] + list(ids)

    def _limit(self, max_new_tokens: int, prompt_len: int = 1) -> int:
        return max(1, min(max_new_tokens, self.max_positions - prompt_len))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True).strip()

    def caption_batch(self, pixels: np.ndarray, max_new_tokens: int = 20, prefix: str = "",
                      check_cancel: Optional[Callable[[], None]] = None) -> list:
        """Greedy captions of a batch (B, 3, H, W) in one pass: a CaptionOutput per image."""
        prompt = self.prompt(prefix)
        hyps = greedy_batch(self.runner, pixels, prompt, self.eos_id, self._limit(max_new_tokens, len(prompt)),
                            check_cancel)
        out = []
        for h in hyps:
            ids = [t for t in h.tokens if t != self.eos_id]
            out.append(CaptionOutput(self._decode(prompt[1:] + ids), ids, h.score, h.finished))
        return out

    def stream(self, image, max_new_tokens: int = 20, check_cancel: Optional[Callable[[], None]] = None,
               prefix: str = "") -> Iterator[str]:
        """Greedy decoding; yields each new piece of text (the prefix first); returns (StopIteration.value) a
        CaptionOutput whose text starts with the prefix, as transformers decodes BLIP's output."""
        pixels = image if isinstance(image, np.ndarray) else self.pixel_values(image)
        prompt = self.prompt(prefix)
        ids, total, text = [], 0.0, ""
        for tok, logp in greedy_tokens(self.runner, pixels, prompt, self.eos_id,
                                       self._limit(max_new_tokens, len(prompt)), check_cancel):
            total += logp
            if tok == self.eos_id:
                return CaptionOutput(text or self._decode(prompt[1:]), ids, total / (len(ids) + 1), True)
            ids.append(tok)
            new = self._decode(prompt[1:] + ids)
            piece = new[len(text):] if new.startswith(text) else new
            text = new
            if piece:
                yield piece
        return CaptionOutput(text, ids, total / max(1, len(ids)), False)

    def __call__(self, image, max_new_tokens: int = 20, num_beams: int = 1,
                 check_cancel: Optional[Callable[[], None]] = None, prefix: str = "") -> CaptionOutput:
        pixels = image if isinstance(image, np.ndarray) else self.pixel_values(image)
        if num_beams <= 1:
            it = self.stream(pixels, max_new_tokens, check_cancel, prefix)
            while True:
                try:
                    next(it)
                except StopIteration as stop:
                    return stop.value
        prompt = self.prompt(prefix)
        hyps = beam_search(self.runner, pixels, prompt, self.eos_id, self._limit(max_new_tokens, len(prompt)),
                           num_beams, check_cancel=check_cancel)
        best = hyps[0]
        ids = [t for t in best.tokens if t != self.eos_id]
        return CaptionOutput(self._decode(prompt[1:] + ids), ids, best.logprob / max(1, len(best.tokens)),
                             best.finished, beams=[(self._decode(prompt[1:] + h.tokens), h.score) for h in hyps])
