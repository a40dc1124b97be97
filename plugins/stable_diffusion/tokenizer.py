"""CLIP's byte-level BPE tokenizer from ``vocab.json`` + ``merges.txt`` through the ``tokenizers`` library, as
transformers' CLIPTokenizerFast builds it: NFC, runs of white space made one space, lower case, CLIP's word split,
``</w>`` ending each word. prompts.py frames the ids into 77-token chunks."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelError

WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    def __init__(self, folder: Path, pad_token: str = "<|endoftext|>"):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        folder = Path(folder)
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as exc:
            raise ModelError(f"The CLIP tokenizer files in {folder} cannot be read ({exc}).") from None
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        for name in ("<|startoftext|>", "<|endoftext|>", pad_token):
            if name not in vocab:
                raise ModelError(f"vocab.json in {folder} has no {name!r} token; it is not a CLIP vocabulary.")
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token="<|endoftext|>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        self.tokenizer = tok
        self.bos, self.eos, self.pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad_token]

    def tokens(self, text: str) -> list:
        """The ids of ``text`` without the start and end tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids
