"""The chat generator with the built-in model: turns, prefix reuse of the KV cache, replay, the context, the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.errors import UsageError
from engine.generators import Context
from engine.history import History
from engine.plugins import PluginHost
from engine.replay import replay
from engine.runner import Job, execute, prepare
from engine.store import ModelStore

GREEDY = {"temperature": 0, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def host():
    return PluginHost().load()


def _turn(host, messages, context, seed=1, options=None, **kw):
    job = Job("chat", messages=messages, seed=seed, device="cpu", options=dict(options or {"max_new_tokens": 24}))
    return execute(prepare(host, ModelStore(host), job), context, **kw)


def test_three_turns_reuse_the_cache_and_replay_identical(host):
    ctx = Context()
    messages = [{"role": "system", "content": "A street in Verona."}]
    records = []
    for line in ("Who goes there?", "Speak, I pray thee.", "What news from Mantua?"):
        messages.append({"role": "user", "content": line})
        record = _turn(host, messages, ctx, seed=len(records) + 1)
        records.append(record)
        messages.append({"role": "assistant", "content": record.recipe["text"]})
    infos = [r.recipe["info"] for r in records]
    assert infos[0]["reused_tokens"] == 0
    assert infos[1]["reused_tokens"] > infos[0]["prompt_tokens"] // 2  # the first turn's tokens were not re-read
    assert infos[2]["reused_tokens"] > infos[1]["reused_tokens"]
    assert records[2].recipe["messages"][-1] == {"role": "user", "content": "What news from Mantua?"}
    for record in records:  # a fresh process state (no cache) writes the same answers
        again, identical, _ = replay(host, ModelStore(host), record.recipe, history=False)
        assert identical, (record.recipe["text"], again.recipe["text"])


def test_prefix_reuse_gives_the_same_tokens_as_reading_everything():
    from plugins.text import _pipeline
    from plugins.text.pipeline import PrefixState, TextRequest
    from plugins.text.sampling import SamplingOptions
    from engine.generators import Request, Result

    host = PluginHost().load()
    entry = ModelStore(host).default_for("chat", ("llama",))
    pipe = _pipeline(Request(model=entry.ref()), Context())
    req = TextRequest(max_new_tokens=12, sampling=SamplingOptions(temperature=0), slide=False)
    rng = np.random.default_rng(0)
    first = [0] + list(rng.integers(1, 3000, 40))
    state = PrefixState()
    a = [e for e in pipe.run_ids(first, req, prefix=state)][-1]
    assert isinstance(a, Result) and state.ids[:len(first)] == first
    second = first + a.token_ids[:5] + list(rng.integers(1, 3000, 9))
    b = [e for e in pipe.run_ids(second, req, prefix=state)][-1]
    c = [e for e in pipe.run_ids(second, req)][-1]
    assert b.info["reused_tokens"] == len(first) + 5
    assert b.token_ids == c.token_ids
    # the same prompt again (regenerate): everything but its last token is reused
    d = [e for e in pipe.run_ids(second, req, prefix=state)][-1]
    assert d.info["reused_tokens"] == len(second) - 1 and d.token_ids == c.token_ids


def test_over_the_context_is_refused_not_cut(host):
    long = [{"role": "user", "content": "Good morrow, sweet lord, " * 60}]
    with pytest.raises(UsageError, match="nothing was cut"):
        _turn(host, long, Context())


def test_bad_conversations(host):
    store = ModelStore(host)
    with pytest.raises(UsageError, match="needs a conversation"):
        prepare(host, store, Job("chat"))
    with pytest.raises(UsageError, match="empty"):
        prepare(host, store, Job("chat", messages=[]))
    with pytest.raises(UsageError, match="role 'robot'"):
        prepare(host, store, Job("chat", messages=[{"role": "robot", "content": "beep"}]))
    with pytest.raises(UsageError, match="takes no conversation"):
        prepare(host, store, Job("text", prompt="x", messages=[{"role": "user", "content": "x"}]))


def test_template_error_is_one_line(host, tmp_path):
    import shutil

    from engine.errors import ModelError
    from engine.store import BUILTIN_DIR

    folder = tmp_path / "raising"
    shutil.copytree(BUILTIN_DIR / "shakespeare-llama", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('No system!') }}"}))
    job = Job("chat", model=str(folder), messages=[{"role": "user", "content": "hi"}], device="cpu")
    with pytest.raises(ModelError, match="^The chat template of raising failed: No system!$"):
        execute(prepare(host, ModelStore(host), job), Context(), history=False)


def _studio(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True,
                          input=stdin, env=dict(os.environ), timeout=300)


def test_cli_generate_chat_json_and_interactive_chat(tmp_path):
    saved = tmp_path / "conv.json"
    proc = _studio("chat", "--system", "A garden.", "--seed", "3", "--set", "max_new_tokens=16",
                   stdin=f"Who goes there?\n/reset\nGood even.\n/save {saved}\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert "a new conversation" in proc.stderr and "saved" in proc.stderr
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]  # /reset kept only the system prompt
    assert conv[1]["content"] == "Good even."
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps({"messages": conv[:2]}))
    proc = _studio("generate", "chat", "--messages", str(messages), "--seed", "4", "--set", "max_new_tokens=16",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["generator"] == "chat" and obj["role"] == "assistant" and obj["messages"] == conv[:2]
    assert obj["model"] == "shakespeare-llama" and obj["text"] and obj["template"]["fallback"] is False
    assert obj["stopped_by"] in ("stop", "eos", "max_new_tokens")
    messages.write_text('[{"role": "user", "content": 3}]')
    proc = _studio("generate", "chat", "--messages", str(messages))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Message 1" in proc.stderr


def test_cli_chat_takes_the_models_generation_defaults_and_refuses_a_system_prompt_early(tmp_path):
    """`studio chat` filled in the generator's defaults (200 tokens, temperature 0.8) over the model's
    generation_config.json, which `studio generate chat` honours; a template without a system role failed every
    turn instead of refusing --system at the start."""
    import shutil

    from engine.history import History
    from engine.store import BUILTIN_DIR

    folder = tmp_path / "terse"
    shutil.copytree(BUILTIN_DIR / "shakespeare-llama", folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "do_sample": False}))
    proc = _studio("chat", "--model", str(folder), "--seed", "1", stdin="Who goes there?\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    options = History().list(limit=1)[0].recipe["options"]
    assert options["max_new_tokens"] == 3 and options["temperature"] == 0.0
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    proc = _studio("chat", "--model", str(folder), "--system", "Be brief.", stdin="Hello\n/quit\n")
    assert proc.returncode == 2 and "System role not supported; leave out --system" in proc.stderr


def test_cli_chat_save_never_replaces_a_file_without_asking(tmp_path):
    """/save onto an existing file (one this chat did not write) asks first; "no" keeps the file as it was. It
    was replaced silently: /save notes.txt lost the notes."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    saved = tmp_path / "conv.json"
    stdin = "\n".join(["Who goes there?", f"/save {notes}", "n", f"/save {saved}", "Speak.", f"/save {saved}",
                       "/quit", ""])
    proc = _studio("chat", "--seed", "3", "--set", "max_new_tokens=4", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert notes.read_text() == "my notes\n" and "not saved" in proc.stderr
    assert (proc.stdout + proc.stderr).count("exists; replace it?") == 1  # not for the file this chat saved
    assert [m["role"] for m in json.loads(saved.read_text())] == ["user", "assistant", "user", "assistant"]


def test_cli_chat_warns_before_dropping_turns(tmp_path):
    saved = tmp_path / "conv.json"
    lines = [f"Turn {i}: " + "Good morrow, sweet lord, " * 12 for i in range(1, 5)]
    # turns 1 and 2 fit; turn 3 would not: refused once ("n"), then turn 4 with the oldest turns dropped ("y")
    stdin = "\n".join([lines[0], lines[1], lines[2], "n", lines[3], "y", f"/save {saved}", ""])
    proc = _studio("chat", "--seed", "1", "--set", "max_new_tokens=64", "--set", "stop=\\n", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("would be left out") == 2 and "Turn 1:" in proc.stderr
    conv = json.loads(saved.read_text())
    users = [m["content"] for m in conv if m["role"] == "user"]
    assert users[-1] == lines[3] and lines[2] not in users and lines[0] not in users
    assert conv[-1]["role"] == "assistant"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fallback_template_and_onnx_backend(tmp_path, monkeypatch, family):
    """A model folder without a template chats through the plain fallback (and says so); on the ONNX backend the
    answers and the cache reuse are the same as on torch."""
    import torch

    from engine import chat
    from engine.onnx_export import export_model
    from tests.onnx_fixtures import text_folder

    monkeypatch.setenv("STUDIO_ONNX_THREADS", "1")
    torch.set_num_threads(1)
    host = PluginHost(safe_mode=True, disabled=[], builtins=("plugins.text",)).load()
    store = ModelStore(host, builtin_dir=tmp_path / "none", user_dir=tmp_path / "models")
    folder = text_folder(tmp_path / "models" / f"tiny-{family}", family)
    export_model(host, store.get(folder.name))
    answers = {}
    for backend in ("torch", "onnx"):
        ctx, messages, out = Context(), [{"role": "user", "content": "w3 w5 w7"}], []
        for turn in range(2):
            job = Job("chat", model=folder.name, messages=messages, seed=3, backend=backend, device="cpu",
                      options={"temperature": 0, "max_new_tokens": 6})
            rec = execute(prepare(host, store, job), ctx, out_dir=tmp_path / "out", history=False)
            assert rec.recipe["info"]["template"]["fallback"] and chat.FALLBACK_NOTE in rec.recipe["warnings"]
            out.append((rec.result.token_ids, rec.recipe["info"]["reused_tokens"]))
            messages = messages + [{"role": "assistant", "content": rec.recipe["text"]},
                                   {"role": "user", "content": "w11 w13"}]
        answers[backend] = out
        assert out[1][1] > 0  # the second turn reused the first one's cache
    assert answers["onnx"] == answers["torch"]


def test_ctrl_c_stops_the_answer_not_the_conversation(tmp_path, monkeypatch, capsys):
    """A SIGINT while the model writes stops that answer (what it wrote is kept as its turn); the chat goes on."""
    import builtins
    import signal

    from studio.chat_cli import run_chat
    from studio.cli import build_parser

    saved = tmp_path / "conv.json"
    lines = iter(["Who goes there?", "Speak again.", f"/save {saved}", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))

    class Out:  # the terminal: the first streamed piece of the first answer is followed by Ctrl+C
        pieces: list = []

        def write(self, text):
            self.pieces.append(text)
            if len(self.pieces) == 1:
                signal.raise_signal(signal.SIGINT)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Out())
    args = build_parser().parse_args(["chat", "--seed", "1", "--set", "max_new_tokens=40"])
    assert run_chat(args) == 0
    assert "(stopped)" in capsys.readouterr().err
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[1]["content"] == Out.pieces[0]  # the stopped answer is what was shown before Ctrl+C
    assert conv[3]["content"]  # the next turn was answered in full


def test_imported_qwen2_chats_in_its_own_template_like_transformers(tmp_path):
    """A transformers-saved Qwen2 folder with the real Qwen 2.5 template: the chat generator feeds the ids
    apply_chat_template gives and writes the greedy answer transformers' generate writes, up to <|im_end|>."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from test_chat_template import DATA, _byte_tokenizer

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>"),
        eos_token="<|im_end|>", chat_template=(DATA / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8"))
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=im_end)
    ref = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    folder = tmp_path / "models" / "tiny-qwen-chat"
    ref.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    want_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want_ids = list(want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids)
    with torch.no_grad():
        out = ref.generate(torch.tensor([want_ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    want_answer = out[0, len(want_ids):].tolist()

    host = PluginHost(safe_mode=True, disabled=[], builtins=("plugins.text",)).load()
    store = ModelStore(host, builtin_dir=tmp_path / "none", user_dir=tmp_path / "models")
    assert store.get(folder.name).family == "qwen2"
    job = Job("chat", model=folder.name, messages=messages, seed=1, device="cpu",
              options={"temperature": 0, "max_new_tokens": 12})
    rec = execute(prepare(host, store, job), Context(), out_dir=tmp_path / "out", history=False)
    assert rec.recipe["info"]["prompt_tokens"] == len(want_ids)
    assert not rec.recipe["info"]["template"]["fallback"]
    assert rec.recipe["info"]["template"]["end_of_turn"] == "<|im_end|>"
    assert rec.result.token_ids == want_answer[:len(rec.result.token_ids)] and rec.result.token_ids
    assert rec.recipe["info"]["stopped_by"] == ("eos" if im_end in want_answer else "max_new_tokens")
