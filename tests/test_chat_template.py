"""Chat templates: the studio renders real templates exactly as transformers' apply_chat_template does (text and
token ids), refuses templates that reach outside the sandbox, reports template errors in one line."""
import json
from pathlib import Path

import pytest

from engine import chat
from engine.errors import ModelError, UsageError
from engine.tokenizer import load_tokenizer

DATA = Path(__file__).parent / "data" / "chat_templates"
BUILTIN = Path(__file__).resolve().parent.parent / "resources" / "models" / "shakespeare-llama"

# the special tokens each template writes, and its bos / eos as the model's tokenizer_config.json names them
TEMPLATES = {
    "meta-llama-Llama-3.1-8B-Instruct": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                          "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                                         "<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                          "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                                         "<|begin_of_text|>", "<|eot_id|>"),
    "Qwen-Qwen2.5-7B-Instruct": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"], None,
                        "<|im_end|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>"),
    "microsoft-Phi-3.5-mini-instruct": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
                                        "<s>", "<|endoftext|>"),
    "google-gemma-2-2b-it": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
}
END_OF_TURN = {"meta-llama-Llama-3.1-8B-Instruct": "<|eot_id|>", "meta-llama-Llama-3.2-3B-Instruct": "<|eot_id|>",
               "Qwen-Qwen2.5-7B-Instruct": "<|im_end|>", "Qwen-Qwen3-0.6B": "<|im_end|>",
               "mistralai-Mistral-Nemo-Instruct-2407": "</s>", "microsoft-Phi-3.5-mini-instruct": "<|end|>",
               "google-gemma-2-2b-it": "<end_of_turn>"}

SYSTEM = {"role": "system", "content": "You are terse. Ünïcode and \"quotes\" stay."}
TURNS = [{"role": "user", "content": "Hello there!"},
         {"role": "assistant", "content": "  Hi. How can I help?  "},
         {"role": "user", "content": "Name a prime\nnumber."}]


def _byte_tokenizer(specials, bos, eos):
    """A tiny byte-level BPE (every byte a token, no merges) with the template's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(dict.fromkeys(specials + [t for t in (bos, eos) if t])))
    return tok


def _hf_folder(tmp_path, name, source=None):
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos = TEMPLATES[name]
    hf = PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer(specials, bos, eos), bos_token=bos, eos_token=eos,
                                 chat_template=source or (DATA / f"{name}.jinja").read_text(encoding="utf-8"))
    folder = tmp_path / name
    hf.save_pretrained(folder)
    return hf, folder


def _hf_render(hf, messages, agp):
    """transformers' text and ids, or the message of the exception its template raised."""
    try:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp)
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=agp)
    except Exception as exc:  # noqa: BLE001 - e.g. Gemma's 'System role not supported'
        return None, None, str(exc)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return text, list(ids), None


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_real_templates_match_transformers(tmp_path, name):
    hf, folder = _hf_folder(tmp_path, name)
    template = chat.load_template(folder)
    assert not template.fallback
    tokenizer = load_tokenizer(folder)
    for messages in ([*TURNS], [SYSTEM, *TURNS], [TURNS[0]], [SYSTEM, TURNS[0]], TURNS[:2]):
        for agp in (True, False):
            want_text, want_ids, want_error = _hf_render(hf, messages, agp)
            if want_error is not None:  # the template refuses these messages: the studio says the same, in one line
                with pytest.raises(ModelError) as err:
                    template.render(messages, agp)
                assert want_error in str(err.value) and "\n" not in str(err.value)
                continue
            text = template.render(messages, add_generation_prompt=agp)
            assert text == want_text, (name, len(messages), agp)
            assert chat.encode(tokenizer, text) == want_ids, (name, len(messages), agp)
    assert template.end_of_turn().split()[0] == END_OF_TURN[name]
    ids, strings = chat.stop_markers(template, tokenizer)
    assert ids == (tokenizer.token_to_id(END_OF_TURN[name]),) and strings == ()


def test_template_list_and_jinja_file(tmp_path):
    import json

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0]['content'] }}"}]}))
    assert chat.load_template(folder).render([chat.Message("user", "hi")]) == "hi"
    (folder / "chat_template.jinja").write_text("J{{ messages | length }}")  # the file wins, as in transformers
    assert chat.load_template(folder).render([chat.Message("user", "hi")]) == "J1"


def test_builtin_model_has_its_own_template():
    template = chat.load_template(BUILTIN)
    tokenizer = load_tokenizer(BUILTIN)
    assert not template.fallback
    text = template.render([chat.Message("system", "A garden."), chat.Message("user", "Who goes there?")])
    assert text == "<|endoftext|>[A garden.]\n\nRomeo.\nWho goes there?\n\nJuliet.\n"
    assert chat.encode(tokenizer, text)[0] == 0  # the BOS token the model was trained with
    assert chat.stop_markers(template, tokenizer) == ((), ("\n\n",))


def test_builtin_template_file_leaves_the_model_hash_alone():
    from engine.store import HASHED_FILES

    assert "tokenizer_config.json" not in HASHED_FILES


def test_fallback_template_says_so(tmp_path):
    template = chat.load_template(tmp_path)
    assert template.fallback
    assert template.render([chat.Message("user", "hi")]) == "User: hi\n\nAssistant:"


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ messages['__class__'] }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{% import 'os' as os %}{{ os }}",
    "{% from 'x' import y %}",
    "{% include 'other.jinja' %}",
    "{% extends 'base.jinja' %}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
])
def test_escaping_templates_are_refused_before_running(source):
    with pytest.raises(chat.TemplateRefused, match="refuses it and did not run it"):
        chat.ChatTemplate(source)


def test_sandbox_stops_what_the_static_check_cannot_see():
    hidden = chat.ChatTemplate("{% set n = '__cla' + 'ss__' %}{{ messages | attr(n) }}")
    assert hidden.render([chat.Message("user", "hi")]) == ""  # the sandbox gives nothing back
    called = chat.ChatTemplate("{% set n = '__cla' + 'ss__' %}{{ (messages | attr(n)).mro() }}")
    with pytest.raises(ModelError):
        called.render([chat.Message("user", "hi")])
    mutating = chat.ChatTemplate("{{ messages.append(1) }}")
    with pytest.raises(chat.TemplateRefused):
        mutating.render([chat.Message("user", "hi")])


def test_raising_template_gives_one_line():
    template = chat.ChatTemplate("{{ raise_exception('Roles must\nalternate') }}", name="m")
    with pytest.raises(ModelError, match=r"^The chat template of m failed: Roles must alternate$"):
        template.render([chat.Message("user", "hi")])
    with pytest.raises(ModelError, match="does not parse"):
        chat.ChatTemplate("{% for m in messages %}")


def test_messages_are_checked():
    with pytest.raises(UsageError, match="empty"):
        chat.parse_messages([])
    with pytest.raises(UsageError, match="role 'tool'"):
        chat.parse_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(UsageError, match="Message 1"):
        chat.parse_messages([{"role": "user"}])
    with pytest.raises(UsageError, match="ends with an assistant"):
        chat.parse_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(UsageError, match="list of messages"):
        chat.parse_messages({"role": "user", "content": "a"})
    with pytest.raises(UsageError, match="Message 2 holds a part of type 'image_url'"):
        chat.parse_messages([{"role": "system", "content": "s"},
                             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(UsageError, match="Part 2 of message 1 has no \"text\" string"):  # (it said "a part of
        chat.parse_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}])  # type
    # 'text'; this chat reads text only")
    with pytest.raises(UsageError, match="Message 1 must be"):
        chat.parse_messages([{"role": "user", "content": []}])


def test_openai_style_messages_file(tmp_path):
    """A request body as OpenAI clients write it today: a developer message and content as text parts."""
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"model": "x", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Speak,"}, {"type": "text", "text": "ROMEO."}]}]}))
    unread = []
    assert chat.load_messages_file(path, unread) == (chat.Message("system", "Be brief."),
                                                     chat.Message("user", "Speak,\nROMEO."))
    assert unread == ["model"]  # the CLI names what it does not read (max_tokens was ignored silently)


def test_context_budget_edges():
    template = chat.load_template(BUILTIN)
    tokenizer = load_tokenizer(BUILTIN)
    msgs = [chat.Message("user", "word " * 40)]
    n = chat.measure(template, tokenizer, msgs, 256, 8).tokens
    context = n + 8  # a context whose budget is exactly n (8 tokens kept for the answer)
    assert chat.budget(context, 8) == n and chat.measure(template, tokenizer, msgs, context, 8).fits
    assert not chat.measure(template, tokenizer, msgs, context - 1, 8).fits


def test_drop_oldest_keeps_system_and_last_turn():
    template = chat.load_template(BUILTIN)
    tokenizer = load_tokenizer(BUILTIN)
    msgs = [chat.Message("system", "S"), chat.Message("user", "one " * 30), chat.Message("assistant", "two " * 30),
            chat.Message("user", "three")]
    full = chat.measure(template, tokenizer, msgs, 1000, 10).tokens
    kept, dropped = chat.drop_oldest(template, tokenizer, msgs, full + 10 - 1, 10)
    assert [m.role for m in dropped] == ["user", "assistant"]
    assert kept == (msgs[0], msgs[3])
    with pytest.raises(UsageError, match="last message alone"):
        chat.drop_oldest(template, tokenizer, msgs, 12, 2)


def _drop_one_turn_at_a_time(template, tokenizer, messages, context, max_new_tokens):
    """The rule drop_oldest keeps, measured after every step (what it did before it halved)."""
    msgs, dropped = list(messages), []
    while not chat.measure(template, tokenizer, msgs, context, max_new_tokens).fits:
        first = [i for i, m in enumerate(msgs[:-1]) if m.role != "system"][0]
        dropped.append(msgs.pop(first))
        if dropped[-1].role == "user" and first < len(msgs) - 1 and msgs[first].role == "assistant":
            dropped.append(msgs.pop(first))
    return tuple(msgs), tuple(dropped)


def test_drop_oldest_counts_a_long_conversation_a_few_times_not_once_a_turn(monkeypatch):
    """Dropping turns from 60 measured the conversation once a turn (seconds each for a long one, on the window's
    thread); it halves now, with the same result as one turn at a time, at every context."""
    template = chat.load_template(BUILTIN)
    tokenizer = load_tokenizer(BUILTIN)
    msgs = [chat.Message("system", "Be brief.")] + [
        chat.Message("user" if i % 2 == 0 else "assistant", f"turn {i} " + "word " * (i % 7 + 3)) for i in range(60)]
    msgs.append(chat.Message("user", "and now?"))
    full = chat.measure(template, tokenizer, msgs, 10_000, 10).tokens
    for context in (full + 10, full, full * 2 // 3, full // 3, 80):
        assert chat.drop_oldest(template, tokenizer, msgs, context, 10) == \
            _drop_one_turn_at_a_time(template, tokenizer, msgs, context, 10), context
    calls = []
    real = chat.encode
    monkeypatch.setattr(chat, "encode", lambda tok, text: calls.append(1) or real(tok, text))
    chat.drop_oldest(template, tokenizer, msgs, full // 3, 10)
    assert len(calls) <= 9  # log2(61 steps) + the last step (it was 40 measures)
    memo = chat.TokenMemo(tokenizer)
    calls.clear()
    assert chat.measure(template, memo, msgs, full + 10, 10).fits
    assert chat.drop_oldest(template, memo, msgs, full + 10, 10) == (tuple(msgs), ())
    assert len(calls) == 1  # counted once: the meter's count serves Send


def test_nested_loops_are_stopped_not_run_for_hours():
    """jinja2's sandbox caps one range() at 100,000 items; two nested ones ran for hours (the queue's worker with
    them). All the range() calls of one render share a budget of a million."""
    import time

    from engine.chat import ChatTemplate, Message, TemplateRefused

    slow = ChatTemplate("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
                        "{{ messages[0].content }}", name="m")
    started = time.perf_counter()
    with pytest.raises(TemplateRefused, match="loops run past 1,000,000 steps"):
        slow.render([Message("user", "hi")])
    assert time.perf_counter() - started < 5
    fine = ChatTemplate("{% for i in range(900000) %}{% endfor %}{{ messages[0].content }}", name="m")
    for _ in range(3):  # the budget is each render's own
        assert fine.render([Message("user", "hi")]) == "hi"


@pytest.mark.parametrize("source, says", [
    ("{% for i in range(100000) %}{{ messages[0].content * 1000 }}{% endfor %}", "wrote past 10,000,000"),
    ("{{ messages[0].content * 100000000 }}", "a text or list past 10,000,000"),
    ("{% set ns = namespace(x=messages[0].content) %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}"
     "{% endfor %}{{ ns.x }}", "a text or list past 10,000,000"),
    ("{{ 10 ** 100000000 }}", "a power past 1000")])
def test_templates_that_would_fill_the_memory_are_stopped(source, says):
    """Within the range budget a template still filled the memory (19 GB, then killed): the text a render writes,
    and every string or list it builds, stop at 10 million; powers at 1000."""
    from engine.chat import ChatTemplate, Message, TemplateRefused

    with pytest.raises(TemplateRefused, match=says):
        ChatTemplate(source, name="m").render([Message("user", "hello")])
    assert ChatTemplate("{{ messages[0].content * 3 + '!' }}{{ 2 ** 10 }}", name="m").render(
        [Message("user", "ab")]) == "ababab!1024"
