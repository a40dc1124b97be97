"""Caption tokenizers: a word-level ``tokenizer.json`` for the shapes world, and loading any ``tokenizer.json``."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import ModelError
from engine.tokenizer import load_tokenizer as load_tokenizer_json

def load_tokenizer(folder):
    """A model folder's ``tokenizer.json``, or a BERT WordPiece tokenizer from its ``vocab.txt`` (BLIP and BERT
    folders saved without a fast tokenizer; lower-casing as ``tokenizer_config.json`` says, on by default)."""
    folder = Path(folder)
    vocab = folder / "vocab.txt"
    if (folder / "tokenizer.json").is_file() or not vocab.is_file():
        return load_tokenizer_json(folder)
    from tokenizers import BertWordPieceTokenizer

    lower = True
    try:
        lower = bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("do_lower_case", True))
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return BertWordPieceTokenizer(str(vocab), lowercase=lower)
    except Exception:  # tokenizers raises a plain Exception subclass
        raise ModelError(f"{vocab} is not a WordPiece vocabulary; re-download the model.") from None


PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def build_word_tokenizer(words):
    """A ``tokenizers.Tokenizer`` with a word-level vocabulary: the specials first, then ``words`` sorted."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    # Join words with spaces when decoding (WordPiece decoder with an impossible prefix does exactly that).
    tok.decoder = decoders.WordPiece(prefix="\u0000##", cleanup=False)
    return tok


def shapes_tokenizer():
    """The word-level tokenizer of the captioned-shapes grammar."""
    from engine.shapes import all_captions

    words = {w for c in all_captions() for w in c.split()}
    return build_word_tokenizer(words)


def add_words(tokenizer, texts) -> tuple:
    """A word-level tokenizer grown by the words of ``texts`` it lacks, given the next free ids (a fine-tune that
    teaches a new word): (tokenizer, [new words]). Other tokenizers split unknown words into pieces and come back
    unchanged."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str()) if hasattr(tokenizer, "to_str") else {}
    if (spec.get("model") or {}).get("type") != "WordLevel":
        return tokenizer, []
    vocab = spec["model"]["vocab"]
    next_id = tokenizer.get_vocab_size(with_added_tokens=True)
    new = []
    for text in texts:
        text = tokenizer.normalizer.normalize_str(text) if tokenizer.normalizer else text
        for word in tokenizer.pre_tokenizer.pre_tokenize_str(text) if tokenizer.pre_tokenizer else []:
            if tokenizer.token_to_id(word[0]) is None and word[0] not in new:
                new.append(word[0])
    for i, word in enumerate(new):
        vocab[word] = next_id + i
    return (Tokenizer.from_str(json.dumps(spec)) if new else tokenizer), new
