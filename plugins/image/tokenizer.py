"""A word-level tokenizer for prompts (``tokenizers`` library), and encoding with the studio's checks.

Layout of the ids: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, then the words. Every prompt is encoded as
[BOS] words... [EOS] and padded with [PAD] to the text encoder's context length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ModelError

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD, UNK, BOS, EOS = 0, 1, 2, 3


def build_tokenizer(words):
    """A WordLevel tokenizer over ``words`` (lower-cased, split on whitespace and punctuation)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def shapes_tokenizer():
    from engine.shapes import all_captions
    return build_tokenizer(w for c in all_captions() for w in c.split())


@dataclass
class Encoded:
    ids: list  # length == context, [BOS] ... [EOS] [PAD]...
    unknown: list = field(default_factory=list)  # words the tokenizer does not know
    truncated: int = 0  # how many words were cut


class PromptEncoder:
    """Turns a prompt into a fixed-length id list and says what it could not represent."""

    def __init__(self, tokenizer, context: int):
        self.tokenizer = tokenizer
        self.context = context
        vocab = tokenizer.get_vocab()
        if any(vocab.get(s) != i for i, s in enumerate(SPECIALS)):
            raise ModelError("tokenizer.json must have [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3 as its first ids.")

    @classmethod
    def from_file(cls, path: Path, context: int) -> "PromptEncoder":
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise ModelError(f"The tokenizer file {path} cannot be read ({e}); restore it from the model's source.") from None
        return cls(tok, context)

    def encode(self, prompt: str) -> Encoded:
        enc = self.tokenizer.encode(prompt or "", add_special_tokens=False)
        ids = list(enc.ids)
        unknown = [(prompt or '')[a:b] for (a, b), i in zip(enc.offsets, ids) if i == UNK]
        room = self.context - 2
        truncated = max(0, len(ids) - room)
        ids = [BOS] + ids[:room] + [EOS]
        return Encoded(ids + [PAD] * (self.context - len(ids)), unknown, truncated)


def encode_prompts(encoder: "PromptEncoder", prompt: str, negative: str):
    """Encode the prompt and the negative prompt; return (prompt_encoding, negative_encoding, warnings).

    Shared by the torch and onnxruntime pipelines, so both warn the same way about empty prompts, unknown
    words and prompts cut to the context.
    """
    warnings = []
    enc = encoder.encode(prompt)
    if not prompt.strip():
        warnings.append("The prompt is empty, so the image is unconditional (any scene the model likes).")
    if enc.unknown:
        warnings.append("These prompt words are unknown to the model and were ignored: "
                        + ", ".join(dict.fromkeys(enc.unknown)) + ".")
    if enc.truncated:
        warnings.append(f"The prompt is longer than the model's {encoder.context - 2}-word context; "
                        f"the last {enc.truncated} word(s) were cut.")
    neg = encoder.encode(negative)
    if neg.unknown:
        warnings.append("These negative-prompt words are unknown to the model and were ignored: "
                        + ", ".join(dict.fromkeys(neg.unknown)) + ".")
    if neg.truncated:
        warnings.append(f"The negative prompt was cut by {neg.truncated} word(s) to fit the context.")
    return enc, neg, warnings
