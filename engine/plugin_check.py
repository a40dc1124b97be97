"""Loading a new plugin in a throwaway process first, so one that kills the interpreter cannot take the studio down.

The plugin host catches every Python exception a plugin raises, but a plugin that crashes in native code, calls
``os._exit`` or hangs while it is imported would end (or freeze) the process that imports it: the window
included. So the first time the host meets a third-party plugin (new, updated or edited, as told by
``fingerprint``), it imports it and runs its hooks in ``python -m engine.plugin_check NAME`` first, and loads it
itself only when that process comes back. New plugins are checked together, in one process that says which
plugin it is loading; when it dies, the one it was loading is the culprit, and the ones after it are checked
again in a fresh process. The fingerprints that passed are kept in ``$STUDIO_HOME/plugin_checks.json``, so each
version is checked once. ``STUDIO_PLUGIN_CHECK=0`` turns this off.
"""
from __future__ import annotations

import json
import os
import signal
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from engine import state

TIMEOUT_S = 60  # a plugin that takes longer than this to import and register is treated as hung
ENV = "STUDIO_PLUGIN_CHECK"


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def fingerprint(cand) -> str:
    """Changes when the plugin's code changes: its version, and the newest modification time among its files (a
    drop-in's own files; an installed package's metadata folder, which every install rewrites)."""
    path = Path(cand.stamp_path) if cand.stamp_path else None
    stamp = 0
    try:
        if path is not None and path.is_dir():
            stamp = max((f.stat().st_mtime_ns for f in [path, *path.rglob("*.py")]), default=0)
        elif path is not None and path.exists():
            stamp = path.stat().st_mtime_ns
    except OSError:
        pass
    return f"{cand.source}|{cand.location}|{cand.version}|{stamp}"


def _checks_path() -> Path:
    return state.home() / "plugin_checks.json"


def passed() -> dict:
    try:
        data = json.loads(_checks_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(names_prints: dict) -> None:
    from engine.outputs import atomic_write_bytes

    data = passed()
    data.update(names_prints)
    try:
        atomic_write_bytes(_checks_path(), json.dumps(data, indent=1, sort_keys=True).encode())
    except Exception:  # noqa: BLE001 - not being able to remember only means checking again next time
        pass


def failures(candidates: list) -> dict:
    """``{name: (why, details)}`` for the third-party plugins among ``candidates`` that end or hang a throwaway
    process while they load; the others (and those that passed before, unchanged) are remembered as passed."""
    if not enabled():
        return {}
    known = passed()
    todo = {}
    for cand in candidates:
        if cand.source != "built-in" and known.get(cand.name) != fingerprint(cand):
            todo.setdefault(cand.name, fingerprint(cand))
    names, failed, ok = list(todo), {}, {}
    while names:
        loaded, culprit, why, details = _run(names)
        ok.update({n: todo[n] for n in loaded})
        if culprit is None:
            break
        failed[culprit] = (why, details)
        names = names[names.index(culprit) + 1:]
    if ok:
        _remember(ok)
    return failed


def _run(names: list) -> tuple:
    """Load ``names`` in order in one throwaway process: (the names that loaded, the one it died on or None, why,
    the end of its stderr)."""
    env = dict(os.environ, **{ENV: "0"})
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "engine.plugin_check", *names]
    with tempfile.TemporaryFile() as err_file:
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err_file,
                                    text=True, errors="replace")
        except OSError as exc:
            return [], names[0], (f"Plugin {names[0]} could not be checked in a test process ({exc.strerror}), so "
                                  f"it was not loaded."), ""
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
        out, line = [], ""
        while True:  # each plugin gets TIMEOUT_S from the previous line
            try:
                line = lines.get(timeout=TIMEOUT_S)
            except queue.Empty:
                proc.kill()
                break
            if line is None:
                break
            out.append(line.rstrip("\n"))
        code = proc.wait()
        hung = line is not None
        err_file.seek(0)
        err = err_file.read()[-4000:].decode(errors="replace")
    loaded = [line[3:] for line in out if line.startswith("ok ")]
    if code == 0 and not hung:
        return loaded, None, "", ""
    started = [line[8:] for line in out if line.startswith("loading ")]
    culprit = started[-1] if started else names[0]
    if hung:
        why = f"Plugin {culprit} did not finish loading within {TIMEOUT_S} s in a test process, so it was not loaded."
    else:
        how = f"exit code {code}"
        if code < 0:
            try:
                how = f"signal {-code}, {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        why = (f"Plugin {culprit} ended the test process that loaded it ({how}), so it was not loaded; "
               f"update or remove it.")
    return [n for n in loaded if n != culprit], culprit, why, err


def main(argv: list) -> None:
    """In the throwaway process: load each named plugin, saying so before and after on stdout."""
    from engine.plugins import PluginHost, PluginStatus

    host = PluginHost(safe_mode=False, disabled=[])
    cands = host.candidates()
    for name in argv:
        print(f"loading {name}", flush=True)
        for cand in cands:
            if cand.name == name and cand.source != "built-in":
                host._load_one(cand, PluginStatus(cand.name, cand.source, cand.version))  # Python errors are caught
        print(f"ok {name}", flush=True)
    os._exit(0)  # skip interpreter teardown: a plugin's atexit or finalizer crash is not a loading crash


if __name__ == "__main__":
    main(sys.argv[1:])
