"""Generations run in a child process (engine.child): a plugin that kills its process or holds the interpreter
lock cannot take the window down or freeze it."""
import time

from PySide6.QtCore import QTimer

from gui_helpers import gui_home, install_plugins, make_window, wait_idle  # noqa: F401

CRASHER = '''
import os
from engine import hookimpl
from engine.generators import Generator, GeneratorInfo, Option, Progress, Result

INFO = GeneratorInfo(id="crasher", title="Crasher", description="Kills its own process.", takes=("text",),
                     makes="text", options=(Option("how", "str", "abort", "How", choices=("abort", "exit")),))

def generate(request, context):
    yield Progress(1, 2)
    if request.options["how"] == "abort":
        os.abort()  # SIGABRT, like a crash in native code
    os._exit(3)

@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))
'''

HOG = '''
from engine import hookimpl
from engine.generators import Generator, GeneratorInfo, Progress, Result

INFO = GeneratorInfo(id="hog", title="Hog", description="Holds the GIL in C code.", takes=("text",), makes="text")

def generate(request, context):
    yield Progress(1, 2)
    total = sum(range(60_000_000))  # one C call, about a second, that never releases the interpreter lock
    yield Progress(2, 2)
    yield Result(text=str(total))

@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))
'''


def test_generation_runs_in_a_child_process(qtbot, gui_home):
    import os

    w = make_window(qtbot, generator="echo")
    w.panel.prompt.setPlainText("hello there")
    w.generate()
    wait_idle(qtbot, w, 20000)
    assert w.output.text.toPlainText() == "hello there hello there" and not w.banner.isVisible()
    proc = w.session.process
    assert proc.alive() and proc.proc.pid != os.getpid()
    assert w.session.history.list()[0].generator == "echo"  # the child wrote the history row
    w.close()
    assert not proc.alive()  # closing the window ends the child


def test_a_crashing_plugin_does_not_take_the_window_down(qtbot, gui_home):
    install_plugins(gui_home, crasher=CRASHER)
    w = make_window(qtbot, generator="crasher")
    for how, said in (("abort", "stopped unexpectedly (signal 6"),  # os._exit fails the job in a sentence
                      ("exit", "failed: it ended its process (os._exit(3)) without a result")):
        w.select_generator("crasher")
        w.panel.prompt.setPlainText("boom")
        w.panel.form.set_values({"how": how})
        w.generate()
        wait_idle(qtbot, w, 20000)
        assert w.banner.isVisible()
        text = w.banner.label.text()
        assert said in text, text
        w.select_generator("echo")  # the next generation starts a fresh process and works
        w.panel.prompt.setPlainText("still here")
        w.generate()
        wait_idle(qtbot, w, 20000)
        assert w.output.text.toPlainText() == "still here still here"


def test_a_plugin_that_crashes_while_loading_does_not_take_the_window_down(qtbot, gui_home):
    install_plugins(gui_home, aborts="import os\nos.abort()\n")  # checked in a throwaway process first
    w = make_window(qtbot, generator="echo")
    assert w.session.host.plugins["aborts"].status == "failed"
    assert "failed: aborts" in w._plugin_summary()
    w.panel.prompt.setPlainText("alive")
    w.generate()
    wait_idle(qtbot, w, 20000)
    assert w.output.text.toPlainText() == "alive alive"


def test_a_plugin_holding_the_gil_does_not_freeze_the_window(qtbot, gui_home):
    install_plugins(gui_home, hog=HOG)
    w = make_window(qtbot, generator="hog")
    w.panel.prompt.setPlainText("x")
    w.generate()  # the first run starts the child; measure the second
    wait_idle(qtbot, w, 30000)
    late, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        late.append(now - last[0] - 0.01)
        last[0] = now
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    started = time.perf_counter()
    w.generate()
    wait_idle(qtbot, w, 30000)
    timer.stop()
    assert w.output.text.toPlainText() == str(sum(range(60_000_000)))
    assert time.perf_counter() - started > 0.3  # the hog really ran
    assert max(late) < 0.4, f"the window stalled {max(late) * 1000:.0f} ms"  # in-process: about 1300 ms


def test_requests_to_the_child_take_turns(gui_home):
    """A generation and the About probe (or an export) at once: each gets its own replies."""
    import threading

    from engine.child import GenerationProcess
    from engine.generators import CancelToken
    from engine.runner import Job

    proc = GenerationProcess({"builtins": []})
    try:
        results, logs = {}, []

        def generate():
            results["gen"] = proc.run(Job("slow", prompt="x", options={"steps": 25}), CancelToken(), lambda m: None)
        t = threading.Thread(target=generate)
        t.start()
        deadline = time.monotonic() + 10
        while not proc._busy.locked() and time.monotonic() < deadline:  # the generation holds the child
            time.sleep(0.01)
        results["probe"] = proc._request({"probe": True}, logs.append)["info"]
        t.join(30)
        assert results["gen"]["recipe"]["text"] == "." * 25
        assert "onnxruntime" in results["probe"] and logs and "waiting" in logs[0]["text"]
    finally:
        proc.stop()


READER = '''
import sys
from engine import hookimpl
from engine.generators import Generator, GeneratorInfo, Result

INFO = GeneratorInfo(id="reader", title="Reader", description="Reads stdin.", takes=("text",), makes="text")

def generate(request, context):
    print("a plugin printing to stdout")
    yield Result(text="read " + repr(sys.stdin.read()))

@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))
'''


def test_child_edge_cases(gui_home):
    """A cancel that arrives while the job waits behind the warm-up; stdin/stdout in plugin code; stopping the
    child under a running request; no new child after close."""
    import threading

    import pytest

    from engine.child import GenerationProcess
    from engine.errors import CancelledError, GenerationError
    from engine.generators import CancelToken
    from engine.runner import Job

    install_plugins(gui_home, reader=READER)
    proc = GenerationProcess({"builtins": []})
    try:
        proc.warm("torch")  # the job below queues behind this import
        token = CancelToken()
        threading.Timer(0.05, token.cancel).start()
        with pytest.raises(CancelledError):
            proc.run(Job("slow", prompt="x", options={"steps": 10}), token, lambda m: None)
        from engine.history import History

        assert History().list() == []  # the cancelled job saved nothing
        done = proc.run(Job("reader", prompt="x"), CancelToken(), lambda m: None)
        assert done["recipe"]["text"] == "read ''"  # stdin is /dev/null; the print did not break the protocol
        errors = []

        def slow():
            try:
                proc.run(Job("slow", prompt="x", options={"steps": 500}), CancelToken(), lambda m: None)
            except GenerationError as exc:
                errors.append(str(exc))
        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.5)
        proc.stop()
        t.join(10)
        assert errors and "was stopped" in errors[0]
        proc.stop(close=True)
        with pytest.raises(GenerationError, match="closing"):
            proc.run(Job("echo", prompt="x"), CancelToken(), lambda m: None)
        assert proc.proc is None
    finally:
        proc.stop()


STUCK = '''
import time
from engine import hookimpl
from engine.generators import Generator, GeneratorInfo, Progress, Result

INFO = GeneratorInfo(id="stuck", title="Stuck", description="Ignores Cancel.", takes=("text",), makes="text")

def generate(request, context):
    yield Progress(1, 2)
    time.sleep(3600)  # never looks at context.cancel
    yield Result(text="never")

@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))
'''


def test_a_generator_that_ignores_cancel_is_stopped_and_the_next_one_runs(qtbot, gui_home, monkeypatch):
    """Cancel only asked the generation process to stop: a generator that never looked blocked every later
    generation until the studio was restarted."""
    import engine.child

    monkeypatch.setattr(engine.child, "CANCEL_GRACE_S", 1.0)
    install_plugins(gui_home, stuck=STUCK)
    w = make_window(qtbot, generator="stuck")
    w.panel.prompt.setPlainText("x")
    stuck = w.submit()
    qtbot.waitUntil(lambda: w.queue.get(stuck).step == 1, timeout=30000)
    w.cancel()
    qtbot.waitUntil(lambda: w.queue.get(stuck).state == "cancelled", timeout=15000)
    w.select_generator("echo")
    w.panel.prompt.setPlainText("after it")
    w.generate()
    wait_idle(qtbot, w, 30000)
    assert w.output.text.toPlainText() and "after it" in w.output.recipe["prompt"]
