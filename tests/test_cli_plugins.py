"""What a plugin's generator can do to the command line: results of the wrong type, NaN in its info, prints,
threads it leaves running, os._exit: each is its job's failure in one sentence, and the CLI's output stays valid."""
import json
import os

import pytest

from plugin_samples import drop, generator_plugin
from test_cli import studio


BAD_RESULTS = generator_plugin('''

INFO = GeneratorInfo(id="bad", title="Bad", description="Returns what its prompt names.", takes=("text",),
                     makes="text")

def generate(request, context):
    import sys
    import numpy as np
    from PIL import Image
    from engine.generators import Result
    kind = request.prompt
    if kind == "exit":
        sys.exit(0)
    if kind == "base":
        class Odd(BaseException):
            pass
        raise Odd("odd")
    loop = {}
    loop["self"] = loop
    yield {"int": Result(text=123), "surrogate": Result(text="ok \\udcff"), "image": Result(text="t", image="x"),
           "info": Result(text="t", info=[1]), "object": Result(text="t", info={"o": object()}),
           "nan": Result(text="t", info={"x": float("nan")}), "circular": Result(text="t", info=loop),
           "empty": Result(text="t", image=Image.new("RGB", (0, 0))),
           "float-image": Result(text="t", image=Image.new("F", (2, 2))),
           "rate": Result(text="t", audio=(np.zeros(4, np.float32), 0)),
           "int64": Result(text="t", audio=(np.zeros(4, np.int64), 16000))}[kind]

''')


@pytest.mark.parametrize("kind,words", [("int", "text that is a int, not a string"),
                                        ("surrogate", "not valid Unicode"),
                                        ("image", "an image that is a str"),
                                        ("info", "info or warnings of the wrong type"),
                                        ("exit", "SystemExit"), ("base", "Odd: odd"),
                                        ("object", "not JSON"), ("circular", "not JSON"),
                                        ("empty", "an empty image"), ("float-image", "mode F"),
                                        ("rate", "sample rate of 0"), ("int64", "type int64")])
def test_a_plugin_result_of_the_wrong_type_is_its_failure(studio_home, tmp_path, kind, words):
    """Result(text=123) was 'unexpected AttributeError', and sys.exit(0) in generate a silent success (exit 0, no
    output, no history row)."""
    from engine.errors import GenerationError
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    drop(studio_home, "badres", BAD_RESULTS)
    host = PluginHost(builtins=()).load()
    prep = prepare(host, ModelStore(host, builtin_dir=tmp_path / "none"), Job("bad", prompt=kind))
    with pytest.raises(GenerationError, match=f"Generator bad \\(plugin badres\\) failed: .*{words}"):
        execute(prep, out_dir=tmp_path, history=False)
    assert not list(tmp_path.glob("*.txt"))


def test_a_nan_in_a_results_info_is_written_as_null(studio_home, tmp_path):
    """The recipe beside the output held NaN, which is not JSON."""
    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    drop(studio_home, "badres", BAD_RESULTS)
    host = PluginHost(builtins=()).load()
    record = execute(prepare(host, ModelStore(host, builtin_dir=tmp_path / "none"), Job("bad", prompt="nan")),
                     out_dir=tmp_path, history=False)
    sidecar = next(tmp_path.glob("*.json"))
    assert json.loads(sidecar.read_text(), parse_constant=lambda c: pytest.fail(c))["info"]["x"] is None
    assert record.recipe["info"]["x"] is None


NOISY = generator_plugin('''
import os
os.write(1, b"GARBAGE-FD1-AT-IMPORT\\n")

INFO = GeneratorInfo(id="noisy", title="Noisy", description="Prints.", takes=("text",), makes="text")

def generate(request, context):
    from engine.generators import Result
    print("PRINTED-IN-GENERATE")
    os.write(1, b"FD1-IN-GENERATE\\n")
    yield Result(text="answer")
''')


def test_what_a_plugin_prints_never_reaches_json_output(studio_home):
    drop(studio_home, "noisy", NOISY)
    proc = studio("generate", "noisy", "--prompt", "x", "--json", check=0)
    assert json.loads(proc.stdout)["text"] == "answer"
    assert "PRINTED-IN-GENERATE" in proc.stderr and "FD1-IN-GENERATE" in proc.stderr
    listing = studio("generators", "--json", check=0)
    assert "noisy" in {g["id"] for g in json.loads(listing.stdout)}


LINGERING = generator_plugin('''
INFO = GeneratorInfo(id="linger", title="Linger", description="Leaves a thread.", takes=("text",), makes="text")

def generate(request, context):
    import threading, time
    from engine.generators import Result
    threading.Thread(target=time.sleep, args=(3600,), name="plugin-sleeper").start()
    yield Result(text="done")
''')


def test_a_thread_a_plugin_leaves_running_does_not_keep_the_cli_alive(studio_home, tmp_path):
    drop(studio_home, "linger", LINGERING)
    proc = studio("generate", "linger", "--prompt", "x", "--out", str(tmp_path / "o.txt"), check=0)
    assert (tmp_path / "o.txt").read_text() == "done" and "plugin-sleeper" in proc.stderr


QUITTER = generator_plugin('''
import os

INFO = GeneratorInfo(id="quitter", title="Quitter", description="Ends its process.", takes=("text",), makes="text",
                     options=(Option("code", "int", 0, "exit status", min=-1, max=255),))

def generate(request, context):
    yield Progress(1, 2)
    if request.options["code"] >= 0:
        os._exit(request.options["code"])
    pid = os.fork()  # a process of its own that ends as it asks: untouched
    if pid == 0:
        os._exit(7)
    yield Result(text=f"child {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}")
''')


def test_a_generator_that_ends_the_process_is_an_error(studio_home):
    """os._exit(0) in a plugin's generate left `studio generate` silent with exit status 0."""
    drop(studio_home, "quitter", QUITTER)
    for code in (0, 3):
        proc = studio("generate", "quitter", "--prompt", "x", "--set", f"code={code}", check=1)
        assert proc.stderr.strip().splitlines()[-1] == (
            f"studio: error: Generator quitter (plugin quitter) failed: it ended its process (os._exit({code})) "
            "without a result; nothing was saved.") and proc.stdout == ""
    assert not (studio_home / "history.sqlite3").exists() or json.loads(
        studio("history", "list", "--json", check=0).stdout) == []
    if hasattr(os, "fork"):
        assert studio("generate", "quitter", "--prompt", "x", "--set", "code=-1", check=0).stdout == "child 7\n"
    # the queue's worker (queue run, serve) fails that job and goes on: it died silently, at every restart
    studio("queue", "add", "quitter", "--prompt", "x", "--set", "code=3")
    studio("queue", "add", "quitter", "--prompt", "after", "--set", "code=-1" if hasattr(os, "fork") else "code=3")
    studio("queue", "run", "--until-empty", check=0)
    rows = json.loads(studio("queue", "list", "--all", "--json").stdout)
    states = [r["state"] for r in sorted(rows, key=lambda r: r["id"])]
    assert states == ["failed", "done" if hasattr(os, "fork") else "failed"], rows
