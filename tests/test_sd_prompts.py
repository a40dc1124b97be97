"""A1111 prompt syntax (plugins/stable_diffusion/prompts.py) and the CLIP tokenizer (against transformers)."""
import numpy as np
import pytest

from plugins.stable_diffusion.prompts import chunks, encode_prompts, parse_prompt_attention, weighted


@pytest.mark.parametrize("text,want", [  # the examples AUTOMATIC1111 documents for its parser
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("[faint] ((strong)) (set:0.7)", [["faint", 1 / 1.1], [" ", 1.0], ["strong", 1.1 * 1.1], [" ", 1.0],
                                      ["set", 0.7]]),
    ("one BREAK two", [["one", 1.0], ["BREAK", -1], ["two", 1.0]]),
    ("", [["", 1.0]]),
])
def test_parse_prompt_attention(text, want):
    got = parse_prompt_attention(text)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert np.allclose([w for _, w in got], [w for _, w in want])


@pytest.mark.parametrize("text", ["a (cat:1.2.3) on a sofa", "(dog:..)", "(x:.)"])
def test_a_weight_that_is_not_a_number_is_one_sentence(text):
    from engine.errors import UsageError

    with pytest.raises(UsageError, match="is not a number; write a weight as"):
        parse_prompt_attention(text)  # it was "ValueError: could not convert string to float"


def _tok(text):  # one id per character, "," = 44: enough to check the chunking rules
    return [ord(c) for c in text if c != " "]


def test_chunks_frame_pad_break_and_comma_backtrack():
    ids, ws, _ = chunks("ab", _tok, bos=1, eos=2, pad=0, comma=44)
    assert ids == [[1, 97, 98, 2] + [0] * 73] and len(ws[0]) == 77 and ws[0][1:3] == [1.0, 1.0]
    ids, _, _ = chunks("a BREAK b", _tok, 1, 2, 2, 44)
    assert len(ids) == 2 and ids[0][:3] == [1, 97, 2] and ids[1][:3] == [1, 98, 2]
    long = "x" * 70 + "," + "y" * 10  # the chunk is full at a token 6 after the comma: the tail moves on
    ids, _, _ = chunks(long, _tok, 1, 2, 2, 44)
    assert len(ids) == 2 and ids[0][71] == 44 and ids[0][72] == 2 and ids[1][1:5] == [ord("y")] * 4
    ids, ws, _ = chunks("(a:1.5) b", _tok, 1, 2, 2, 44)
    assert ws[0][1] == 1.5 and ws[0][2] == 1.0
    assert all(len(r) == 77 for r in chunks("z" * 200, _tok, 1, 2, 2, 44)[0])


def test_weighting_keeps_the_mean():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, 77, 8)).astype(np.float32) + 0.3
    w = np.ones(77, np.float32)
    assert np.array_equal(weighted(h, w), h)  # all weights 1: unchanged (so plain prompts match diffusers)
    w[3] = 1.5
    z = weighted(h, w)
    assert np.isclose(z.mean(), h.mean()) and not np.allclose(z, h)


def test_long_prompts_and_negative_get_equal_length(tmp_path):
    from sd_fixtures import clip_vocab

    from plugins.stable_diffusion.tokenizer import ClipTokenizer

    clip_vocab(tmp_path)
    tok = ClipTokenizer(tmp_path)
    calls = []

    def encode(ids):
        calls.append(ids.shape)
        return np.random.default_rng(len(calls)).standard_normal((len(ids), 77, 4)).astype(np.float32)

    pos, neg, extra = encode_prompts(", ".join(["a red cat on the blue sofa"] * 12), "a dog", tok, encode)
    assert pos.shape == neg.shape and pos.shape[1] == 77 * (extra + 1) and extra >= 1


def test_clip_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sd_fixtures import clip_vocab

    from plugins.stable_diffusion.tokenizer import ClipTokenizer

    clip_vocab(tmp_path)
    ref = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = ClipTokenizer(tmp_path)
    for text in ["a red cat", "A  Photo   OF a Dog!!", "painting of a sofa, 4k, (blue) [cat]", "café 東京 ça",
                 "it's the dog's sofa", ""]:
        assert ours.tokens(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert (ours.bos, ours.eos) == (ref.bos_token_id, ref.eos_token_id)
