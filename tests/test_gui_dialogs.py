"""Plugin manager, model manager, ONNX export, settings and About dialogs (pytest-qt, offscreen)."""
import json
import sys
import types

from PySide6.QtCore import Qt

from gui_helpers import gui_home, install_plugins, make_window  # noqa: F401
from plugin_samples import BROKEN_IMPORT, GOOD

TOY_ARCH = '''
from engine import hookimpl
from engine.architectures import Architecture

@hookimpl
def register_architectures(register):
    register(Architecture(family="toy", generator="echo", matches=lambda c: c.get("model_type") == "toy",
                          needs_tokenizer=False, title="Toy"))
'''


def make_model_folder(folder, name="tiny"):
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 4}))
    save_file({"w": np.zeros((4, 4), dtype="float16")}, str(folder / "model.safetensors"))
    (folder / "studio.json").write_text(json.dumps({"title": name, "family": "toy", "generator": "echo"}))
    return folder


def wait_task(qtbot, dlg, timeout=10000):
    qtbot.waitUntil(lambda: dlg.task is None, timeout=timeout)


def test_plugin_manager_shows_failed_plugin_and_toggles(qtbot, gui_home):
    install_plugins(gui_home, broken=BROKEN_IMPORT)
    from studio.gui.plugin_dialog import PluginDialog

    w = make_window(qtbot)
    dlg = PluginDialog(w.session, w)
    qtbot.addWidget(dlg)
    dlg.plugins_changed.connect(w.reload_plugins)
    rows = {p.name: i for i, p in enumerate(dlg.model.rows)}
    m = dlg.model
    col = {name: i for i, name in enumerate(("Enabled", "Plugin", "Version", "Source", "Status", "Generators", "Error"))}
    broken = rows["broken"]
    assert m.data(m.index(broken, col["Status"])) == "failed"
    assert "this_module_does_not_exist" in m.data(m.index(broken, col["Error"]))
    assert m.data(m.index(rows["studio_hello"], col["Version"])) == "0.1.0"
    assert m.data(m.index(rows["studio_hello"], col["Source"])) == "drop-in"
    dlg.table.selectRow(broken)
    assert "Traceback" in dlg.details.toPlainText()

    hello = rows["studio_hello"]
    assert m.setData(m.index(hello, 0), Qt.CheckState.Unchecked.value, Qt.ItemDataRole.CheckStateRole)
    assert "restart or reload" in m.data(m.index(hello, col["Status"]))
    assert json.loads((gui_home / "settings.json").read_text())["disabled_plugins"] == ["studio_hello"]
    dlg.reload_button.click()  # checks new plugins in a worker, then reloads
    wait_task(qtbot, dlg)
    assert "echo" not in w.generator_ids() and "preview" in w.generator_ids()
    rows = {p.name: i for i, p in enumerate(dlg.model.rows)}
    assert dlg.model.rows[rows["studio_hello"]].status == "disabled"
    dlg.model.set_enabled(rows["studio_hello"], True)
    dlg.reject()  # closing applies the pending change
    assert "echo" in w.generator_ids()


def test_plugin_install_asks_first_and_reports_failure(qtbot, gui_home, tmp_path, monkeypatch):
    from studio.gui.plugin_dialog import PluginDialog

    w = make_window(qtbot)
    dlg = PluginDialog(w.session, w)
    qtbot.addWidget(dlg)
    calls = []
    monkeypatch.setattr("engine.install.install", lambda source: calls.append(source))
    monkeypatch.setattr(dlg, "confirm_install", lambda source: False)
    dlg.install(str(tmp_path))
    assert calls == [] and dlg.task is None
    monkeypatch.setattr(dlg, "confirm_install", lambda source: True)
    dlg.install(str(tmp_path))
    wait_task(qtbot, dlg)
    assert calls == [str(tmp_path)] and "Installed" in dlg.banner.label.text()

    def failing(source):
        from engine.errors import PluginError
        raise PluginError("pip failed: no matching distribution")
    monkeypatch.setattr("engine.install.install", failing)
    dlg.install(str(tmp_path))
    wait_task(qtbot, dlg)
    assert "pip failed" in dlg.banner.label.text() and dlg.banner.kind == "error"


def test_an_installed_plugin_that_crashes_is_checked_off_the_window_thread(qtbot, gui_home, tmp_path, monkeypatch):
    import threading

    from engine import plugin_check
    from studio.gui.plugin_dialog import PluginDialog

    w = make_window(qtbot)
    dlg = PluginDialog(w.session, w)
    qtbot.addWidget(dlg)
    dlg.plugins_changed.connect(w.reload_plugins)  # as Tools > Plugins does
    drop = lambda source: (gui_home / "plugins" / "aborts.py").write_text("import os\nos.abort()\n")  # noqa: E731
    monkeypatch.setattr("engine.install.install", drop)
    monkeypatch.setattr(dlg, "confirm_install", lambda source: True)
    run, threads = plugin_check._run, []
    monkeypatch.setattr(plugin_check, "_run", lambda cands: threads.append(threading.current_thread()) or run(cands))
    dlg.install(str(tmp_path))
    wait_task(qtbot, dlg)
    assert threads and threading.main_thread() not in threads  # the reload found the verdict remembered
    assert w.session.host.plugins["aborts"].status == "failed" and "SIGABRT" in w.session.host.plugins["aborts"].error


def test_model_manager_lists_imports_and_removes(qtbot, gui_home, tmp_path, monkeypatch):
    install_plugins(gui_home, toy=TOY_ARCH)
    make_model_folder(gui_home / "models" / "tiny")
    from studio.gui.model_dialog import ModelDialog

    w = make_window(qtbot)
    dlg = ModelDialog(w.session, w)
    qtbot.addWidget(dlg)
    m = dlg.model
    names = [e.name for e in m.rows]
    assert "tiny" in names
    row = names.index("tiny")
    assert m.data(m.index(row, 1)) == "toy" and m.data(m.index(row, 3)).endswith("B")
    assert len(m.data(m.index(row, 4))) == 12 and m.data(m.index(row, 5)) == "—"

    src = make_model_folder(tmp_path / "other", "other")
    dlg.import_folder(str(src))
    wait_task(qtbot, dlg)
    assert "Imported other" in dlg.banner.label.text()
    assert "other" in [e.name for e in m.rows]

    asked = []  # a folder whose name is taken (a copy of "other"): the dialog asks for a name, suggesting one
    monkeypatch.setattr(dlg, "ask_name", lambda problem, suggestion: asked.append((problem, suggestion)) or
                        (None if len(asked) > 1 else suggestion))
    dlg.import_folder(str(src))
    wait_task(qtbot, dlg)
    assert asked == [("A model called 'other' already exists.", "other-2")]
    assert "Imported other-2" in dlg.banner.label.text()
    dlg.import_folder(str(src))  # asked again ("other-3"), cancelled: nothing happens
    assert len(asked) == 2 and asked[1][1] == "other-3" and "Imported other-2" in dlg.banner.label.text()

    dlg.import_folder(str(tmp_path / "missing"))
    wait_task(qtbot, dlg)
    assert dlg.banner.kind == "error" and "Import failed" in dlg.banner.label.text()

    dlg.remove("other")
    assert "other" not in [e.name for e in m.rows]


def _fake_export(monkeypatch, fn):
    mod = types.ModuleType("engine.onnx_export")
    mod.export_model = fn
    monkeypatch.setitem(sys.modules, "engine.onnx_export", mod)


def test_export_dialog_reports_parity(qtbot, gui_home, monkeypatch):
    install_plugins(gui_home, toy=TOY_ARCH)
    make_model_folder(gui_home / "models" / "tiny")
    seen = {}

    def export_model(host, entry, out_dir=None, quantize=None, force=False, log=print):
        seen.update(name=entry.name, quantize=quantize, force=force)
        log("exporting decoder")
        return {"folder": str(entry.path / "onnx"),
                "parity": {"decoder": {"max_abs_diff": 1.2e-5, "tolerance": 1e-3, "passed": True}}}

    _fake_export(monkeypatch, export_model)
    from studio.gui.export_dialog import ExportDialog

    w = make_window(qtbot, isolate=False)  # the fakes live in this process
    dlg = ExportDialog(w.session, w, model="tiny")
    qtbot.addWidget(dlg)
    dlg.quantize.setCurrentIndex(dlg.quantize.findData("int8"))
    dlg.export_button.click()
    wait_task(qtbot, dlg)
    assert seen == {"name": "tiny", "quantize": "int8", "force": False}
    assert "parity gate passed" in dlg.result.text() and "onnx" in dlg.result.text()
    assert "exporting decoder" in dlg.log.toPlainText() and "max_abs_diff: 1.2e-05" in dlg.parity.text()

    def failing_gate(host, entry, **kw):
        return {"folder": "/x", "parity": {"decoder": {"max_abs_diff": 0.5, "tolerance": 1e-3, "passed": False}}}
    _fake_export(monkeypatch, failing_gate)
    dlg.force.setChecked(True)
    dlg.export_button.click()
    wait_task(qtbot, dlg)
    assert "parity gate failed" in dlg.result.text() and dlg.progress.format() == "parity gate FAILED"

    def refused(host, entry, **kw):
        from engine.errors import ParityError

        raise ParityError("The ONNX export of tiny does not match PyTorch: logits differ by up to 0.4", ["logits"])
    _fake_export(monkeypatch, refused)
    dlg.export_button.click()
    wait_task(qtbot, dlg)
    assert dlg.banner.kind == "error" and "Parity gate failed" in dlg.result.text()
    assert dlg.progress.format() == "parity gate FAILED"

    def raising(host, entry, **kw):  # an exporter's own error that mentions parity is not the gate's verdict
        raise RuntimeError("graph does not match PyTorch: parity 0.4 > 1e-3")
    _fake_export(monkeypatch, raising)
    dlg.export_button.click()
    wait_task(qtbot, dlg)
    assert dlg.banner.kind == "error" and "Export failed" in dlg.result.text()
    assert dlg.progress.format() == "failed"

    monkeypatch.setitem(sys.modules, "engine.onnx_export", None)  # import fails
    dlg.export_button.click()
    wait_task(qtbot, dlg)
    assert "not available" in dlg.result.text()


def test_settings_and_about(qtbot, gui_home, monkeypatch, tmp_path):
    from studio.gui import about_dialog
    from studio.gui.settings_dialog import SettingsDialog

    w = make_window(qtbot)
    dlg = SettingsDialog(w.session.settings, w)
    qtbot.addWidget(dlg)
    dlg.device.setCurrentText("cpu")
    dlg.backend.setCurrentText("onnx")
    dlg.output_dir.setText(str(tmp_path / "outs"))
    dlg.apply(w.session.settings)
    w.session.save_settings()
    saved = json.loads((gui_home / "settings.json").read_text())
    assert (saved["device"], saved["backend"], saved["output_dir"]) == ("cpu", "onnx", str(tmp_path / "outs"))

    monkeypatch.setattr(about_dialog, "probe_heavy",
                        lambda: {"torch": "9.9", "onnxruntime": "1.0 (CPUExecutionProvider)", "device": "cpu"})
    about = about_dialog.AboutDialog(w)
    qtbot.addWidget(about)
    assert about.labels["torch"].text() in ("checking…", "9.9")
    qtbot.waitUntil(lambda: about.labels["torch"].text() == "9.9", timeout=3000)
    assert about.labels["device"].text() == "cpu"

    w.session.process.start()  # with a generation process, About asks it (torch stays out of this process)
    asked = about_dialog.AboutDialog(w, w.session.process)
    qtbot.addWidget(asked)
    qtbot.waitUntil(lambda: asked.labels["onnxruntime"].text() != "checking…", timeout=60000)
    assert asked.labels["device"].text().startswith(("cpu", "cuda")) and "." in asked.labels["torch"].text()


TOY_GENERATOR = '''
from engine import hookimpl
from engine.architectures import Architecture
from engine.generators import Generator, GeneratorInfo, Progress, Result

INFO = GeneratorInfo(id="toygen", title="Toy", description="Loads a toy model.", takes=("text",), makes="text",
                     families=("toy",))

def generate(request, context):
    yield Progress(0, 1, "loading model")
    from engine.weights import load_state_dict
    sd = load_state_dict(request.model.path)
    yield Result(text=f"{request.model.name}: {len(sd)} tensors", token_ids=[])

@hookimpl
def register_generators(register):
    register(Generator(INFO, generate))

@hookimpl
def register_architectures(register):
    register(Architecture(family="toy", generator="toygen", matches=lambda c: c.get("model_type") == "toy",
                          needs_tokenizer=False))
'''


def test_model_picker_and_a_model_that_fails_to_load(qtbot, gui_home):
    install_plugins(gui_home, toygen=TOY_GENERATOR)
    make_model_folder(gui_home / "models" / "good")
    bad = make_model_folder(gui_home / "models" / "bad")
    w = make_window(qtbot, generator="toygen")
    picker = w.panel.model
    assert picker.isEnabled() and {picker.itemData(i) for i in range(picker.count())} == {"good", "bad"}
    w.panel.prompt.setPlainText("go")
    picker.setCurrentIndex(picker.findData("good"))
    w.generate()
    qtbot.waitUntil(lambda: w.task is None, timeout=5000)
    assert w.output.text.toPlainText() == "good: 1 tensors"
    assert w.output.recipe["model"]["name"] == "good"
    (bad / "model.safetensors").write_bytes(b"\x00" * 5)  # truncated weights
    picker.setCurrentIndex(picker.findData("bad"))
    w.generate()
    qtbot.waitUntil(lambda: w.task is None, timeout=5000)
    assert w.banner.isVisible() and "bad" in w.banner.label.text()
    picker.setCurrentIndex(picker.findData("good"))
    w.generate()
    qtbot.waitUntil(lambda: w.task is None, timeout=5000)
    assert not w.banner.isVisible() and w.output.text.toPlainText() == "good: 1 tensors"


def test_reloading_with_a_new_plugin_checks_it_off_the_window_thread(qtbot, gui_home, monkeypatch):
    """Enabling a plugin and closing the dialog reloads through the window: a plugin never checked is checked
    in a worker thread, then the window reloads."""
    import threading

    from engine import plugin_check

    w = make_window(qtbot)
    run, threads = plugin_check._run, []
    monkeypatch.setattr(plugin_check, "_run", lambda cands: threads.append(threading.current_thread()) or run(cands))
    (gui_home / "plugins" / "late.py").write_text(GOOD)
    w.reload_plugins()
    assert "late" not in w.session.host.plugins  # not yet: the check runs first, off this thread
    qtbot.waitUntil(lambda: "late" in w.session.host.plugins, timeout=20000)
    assert threads and threading.main_thread() not in threads
    assert "upper" in w.generator_ids()
    w.reload_plugins()  # nothing new: reloads at once
    assert "late" in w.session.host.plugins
