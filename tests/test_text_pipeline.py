"""The generation loop: seeds, stop strings, UTF-8 streaming, truncation, cancel, sampling filters."""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.errors import CancelledError
from engine.generators import CancelToken, Partial, Result
from plugins.text.llama import LlamaConfig, LlamaForCausalLM
from plugins.text.pipeline import NoCacheDecoder, TextPipeline, TextRequest, TorchDecoder, parse_stop
from plugins.text.sampling import SamplingOptions, choose, top_k_filter, top_p_filter

torch.set_num_threads(1)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: token i (i >= 1) is one byte, id 0 is <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([], trainers.BpeTrainer(vocab_size=257, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                    show_progress=False))
    return tok


TOK = byte_tokenizer()


class Scripted:
    """A fake decoder that always makes the next token of ``script`` the only likely one."""

    def __init__(self, text: str, max_positions=64):
        self.script = [TOK.token_to_id(c) for c in _byte_symbols(text)]
        self.max_positions = max_positions
        self.calls = []

    def step(self, ids, past):
        n = 0 if past is None else past
        self.calls.append(np.asarray(ids).shape[1])
        logits = np.full((1, TOK.get_vocab_size()), -10.0, dtype=np.float32)
        logits[0, self.script[min(n, len(self.script) - 1)]] = 10.0
        return logits, n + 1


def _byte_symbols(text):
    # the ByteLevel alphabet character of each UTF-8 byte
    from tokenizers.pre_tokenizers import ByteLevel

    return [s for s in "".join(w for w, _ in ByteLevel(add_prefix_space=False, use_regex=False)
                               .pre_tokenize_str(text))]


def _run(decoder, prompt="Hi", **kw):
    sampling = kw.pop("sampling", SamplingOptions(temperature=0))
    pipe = TextPipeline(decoder, TOK, bos_token_id=0, eos_token_ids=[0])
    events = list(pipe.run(prompt, TextRequest(sampling=sampling, **kw)))
    return [e.text for e in events if isinstance(e, Partial)], events[-1]


def test_streams_multibyte_utf8_whole():
    text = "naïve 😀 café"
    parts, result = _run(Scripted(text), max_new_tokens=len(text.encode()))
    assert result.text == text
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)
    assert len(parts) == len(text)  # one piece per character, though 😀 takes four tokens
    assert len(result.token_ids) == len(text.encode())


def test_stop_string_cuts_and_is_not_streamed():
    text = "Thou art.\n\nEnter HAMLET"
    parts, result = _run(Scripted(text), max_new_tokens=40, stop=parse_stop("\\n\\n|Exeunt"))
    assert result.text == "Thou art."
    assert "".join(parts) == "Thou art."
    assert result.info["stopped_by"] == "stop"


def test_parse_stop():
    assert parse_stop("") == ()
    assert parse_stop("a|b\\nc|x\\|y") == ("a", "b\nc", "x|y")


def test_eos_stops():
    parts, result = _run(Scripted("ab"), max_new_tokens=10)  # script then repeats 'b'; no EOS
    assert result.text == "a" + "b" * 9
    dec = Scripted("ab")
    dec.script[1] = 0
    _, result = _run(dec, max_new_tokens=10)
    assert result.text == "a" and result.token_ids[-1] == 0 and result.info["stopped_by"] == "eos"


def test_left_truncation_warning():
    dec = Scripted("x" * 40, max_positions=32)
    _, result = _run(dec, prompt="y" * 100, max_new_tokens=8)
    assert result.warnings and "too long" in result.warnings[0]
    assert result.info["prompt_tokens"] == 32 - 8
    assert dec.calls[0] == 24


def test_generation_past_context_slides_window():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    _, result = _run(TorchDecoder(model), prompt="abc", max_new_tokens=40,
                     sampling=SamplingOptions(temperature=1.0))
    assert len(result.token_ids) == 40 or result.info["stopped_by"] == "eos"


def test_seed_reproducible_and_cache_equals_no_cache():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    s = SamplingOptions(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2)
    a = _run(TorchDecoder(model), sampling=s, max_new_tokens=24, seed=7)[1].token_ids
    b = _run(TorchDecoder(model), sampling=s, max_new_tokens=24, seed=7)[1].token_ids
    c = _run(TorchDecoder(model), sampling=s, max_new_tokens=24, seed=8)[1].token_ids
    d = _run(NoCacheDecoder(TorchDecoder(model)), sampling=s, max_new_tokens=24, seed=7)[1].token_ids
    assert a == b == d
    assert a != c


def test_cancel_between_tokens():
    cancel = CancelToken()
    pipe = TextPipeline(Scripted("abcdef"), TOK, bos_token_id=0, eos_token_ids=[0])
    it = pipe.run("x", TextRequest(max_new_tokens=6, sampling=SamplingOptions(temperature=0)), cancel)
    assert isinstance(next(it), Partial)
    cancel.cancel()
    with pytest.raises(CancelledError):
        next(it)


def test_sampling_filters():
    logits = np.array([1.0, 3.0, 2.0, 0.0], dtype=np.float32)
    assert np.isinf(top_k_filter(logits, 2)[[0, 3]]).all() and not np.isinf(top_k_filter(logits, 2)[[1, 2]]).any()
    kept = ~np.isinf(top_p_filter(logits, 0.5))
    assert kept.tolist() == [False, True, False, False]
    rng = np.random.default_rng(0)
    picks = {choose(logits, [], SamplingOptions(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}
    # repetition penalty makes the seen best token lose under greedy
    assert choose(logits, [1], SamplingOptions(temperature=0, repetition_penalty=2.0), rng) == 2
    # a temperature so small the scores overflow is its limit, greedy (it was NaN probabilities and token 0)
    with np.errstate(all="raise"):
        assert choose(logits, [], SamplingOptions(temperature=1e-300, top_k=0, top_p=1.0), rng) == 1


def test_presence_and_frequency_penalties_as_openai_defines_them():
    """logit[j] -= presence * (count[j] > 0) + frequency * count[j], over the written tokens only (the prompt's do
    not count): what OpenAI's API documents and vLLM does."""
    from plugins.text.sampling import apply_presence_frequency

    logits = np.array([1.0, 3.0, 2.0, 0.0], dtype=np.float32)
    got = apply_presence_frequency(logits, [1, 1, 3], presence=0.5, frequency=0.25)
    assert np.allclose(got, [1.0, 3.0 - 0.5 - 0.5, 2.0, 0.0 - 0.5 - 0.25])
    assert np.array_equal(apply_presence_frequency(logits, [], 2.0, 2.0), logits)
    rng = np.random.default_rng(0)
    greedy = SamplingOptions(temperature=0, frequency_penalty=1.5)
    assert choose(logits, [1, 1], greedy, rng) == 1  # token 1 only in the prompt: no penalty
    assert choose(logits, [1, 1], greedy, rng, generated=[1]) == 2  # written once: 3 - 1.5 < 2
    assert choose(logits, [], SamplingOptions(temperature=0, presence_penalty=-2.0), rng, generated=[2]) == 2
    assert SamplingOptions.from_options({"presence_penalty": 0.5, "frequency_penalty": 0.25}) == SamplingOptions(
        temperature=0.8, presence_penalty=0.5, frequency_penalty=0.25)


def test_empty_prompt_warns_as_the_image_generator_does():
    for prompt in ("", "  "):
        _, result = _run(Scripted("ab"), prompt=prompt, max_new_tokens=2)
        assert result.warnings == ["The prompt is empty, so the text starts from nothing (whatever the model likes)."]
    pipe = TextPipeline(Scripted("ab"), TOK, bos_token_id=0, eos_token_ids=[0])
    req = TextRequest(sampling=SamplingOptions(temperature=0), max_new_tokens=2)
    results = [e for _, e in pipe.run_batch(["", "Hi"], [req, req]) if isinstance(e, Result)]
    assert [len(r.warnings) for r in results] == [1, 0]
    assert not _run(Scripted("ab"), prompt="Hi", max_new_tokens=2)[1].warnings
