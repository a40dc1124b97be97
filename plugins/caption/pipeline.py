"""Caption an image with a vision-encoder-decoder model folder: preprocessing, decoding, detokenising.

    pipe = CaptionPipeline.from_folder("resources/models/shapes-captioner")
    out = pipe("scene.png", num_beams=1, max_new_tokens=20)   # -> CaptionOutput(text, token_ids, score, ...)
    for piece in pipe.stream("scene.png"): ...               # greedy, text pieces as they are decoded
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from plugins.caption.decode import beam_search, greedy_tokens
from engine.errors import ModelError


@dataclass
class CaptionOutput:
    text: str
    token_ids: list  # generated ids, without the start and end tokens
    score: float  # mean log-probability per generated token (end token included)
    finished: bool  # False when max_new_tokens cut the caption
    beams: list = field(default_factory=list)  # beam search: [(text, score)] best first


@dataclass
class Preprocess:
    size: int
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    resample: int = 2
    rescale: float = 1 / 255

    @classmethod
    def from_folder(cls, folder, image_size: int) -> "Preprocess":
        """From transformers' ``preprocessor_config.json`` when present, else ViT's defaults at ``image_size``."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            return cls(image_size)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ModelError(f"{path} is not valid JSON; re-download or re-export the model.") from None
        size = cfg.get("size", image_size)
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", image_size))
        if size != image_size:
            raise ModelError(f"{path} resizes to {size} pixels but the encoder takes {image_size}.")
        norm = cfg.get("do_normalize", True)
        return cls(image_size, tuple(cfg.get("image_mean", (0.5,) * 3)) if norm else (0.0,) * 3,
                   tuple(cfg.get("image_std", (0.5,) * 3)) if norm else (1.0,) * 3, int(cfg.get("resample", 2)),
                   float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0)

    def __call__(self, image) -> np.ndarray:
        from engine.images import to_pixel_values

        return to_pixel_values(image, self.size, self.mean, self.std, self.resample, self.rescale)


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
                    model_hash: str | None = None, export=None) -> "CaptionPipeline":
        """``model_hash``: with the onnx backend, an export made from another version of the model is refused;
        ``export``: the registered export folder to run (default: the preferred one)."""
        from plugins.caption.tokenizer import load_tokenizer

        if backend == "onnx":
            return cls.from_export(folder, model_hash=model_hash, export=export)
        from plugins.caption.model import TorchCaptionRunner, load_caption_model

        model = load_caption_model(folder, device=device)
        return cls(TorchCaptionRunner(model), load_tokenizer(folder), model.config,
                   Preprocess.from_folder(folder, model.config.encoder.image_size))

    def pixel_values(self, image) -> np.ndarray:
        """A path, bytes or PIL image -> (1, 3, S, S) float32 (UsageError for unreadable images)."""
        from engine.images import load_image

        return self.preprocess(load_image(image))

    def _limit(self, max_new_tokens: int) -> int:
        return max(1, min(max_new_tokens, self.max_positions))

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True).strip()

    def stream(self, image, max_new_tokens: int = 20, check_cancel: Optional[Callable[[], None]] = None
               ) -> Iterator[str]:
        """Greedy decoding; yields each new piece of text; returns (StopIteration.value) a CaptionOutput."""
        pixels = image if isinstance(image, np.ndarray) else self.pixel_values(image)
        ids, total, text = [], 0.0, ""
        for tok, logp in greedy_tokens(self.runner, pixels, self.start_id, self.eos_id,
                                       self._limit(max_new_tokens), check_cancel):
            total += logp
            if tok == self.eos_id:
                return CaptionOutput(text, ids, total / (len(ids) + 1), True)
            ids.append(tok)
            new = self._decode(ids)
            piece = new[len(text):] if new.startswith(text) else new
            text = new
            if piece:
                yield piece
        return CaptionOutput(text, ids, total / max(1, len(ids)), False)

    def __call__(self, image, max_new_tokens: int = 20, num_beams: int = 1,
                 check_cancel: Optional[Callable[[], None]] = None) -> CaptionOutput:
        pixels = image if isinstance(image, np.ndarray) else self.pixel_values(image)
        if num_beams <= 1:
            it = self.stream(pixels, max_new_tokens, check_cancel)
            while True:
                try:
                    next(it)
                except StopIteration as stop:
                    return stop.value
        hyps = beam_search(self.runner, pixels, self.start_id, self.eos_id, self._limit(max_new_tokens), num_beams,
                           check_cancel=check_cancel)
        best = hyps[0]
        ids = [t for t in best.tokens if t != self.eos_id]
        return CaptionOutput(self._decode(ids), ids, best.logprob / max(1, len(best.tokens)), best.finished,
                             beams=[(self._decode(h.tokens), h.score) for h in hyps])
