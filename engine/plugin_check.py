"""Loading a new plugin in a throwaway process first, so one that kills the interpreter cannot take the studio down.

The plugin host catches every Python exception a plugin raises, but a plugin that crashes in native code, calls
``os._exit`` or hangs while it is imported would end (or freeze) the process that imports it: the window
included. So the first time the host meets a third-party plugin, and again whenever its version or files change
(``fingerprint``), it first imports the plugin and runs its hooks in a throwaway Python process, and loads
it itself only when that process came back (``main`` below runs in it).

New plugins are checked together, in one process that reports, on a pipe of its own, which plugin it is loading
and which ones loaded. When it dies or falls silent for ``TIMEOUT_S``, the plugin it was loading is the culprit,
and the ones after it are checked again in a fresh process. Verdicts, passed or failed, are kept per plugin and
fingerprint in ``$STUDIO_HOME/plugin_checks.json``, so each version is checked once. ``STUDIO_PLUGIN_CHECK=0``
turns this off.

What it cannot see: a crash that needs Qt or another plugin loaded beside it, or a background thread that
crashes later. New plugins' loading code runs twice on their first start (in the check, then for real).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from engine import messages, state

log = logging.getLogger(__name__)

TIMEOUT_S = 60  # a plugin that takes longer than this to import and register is treated as hung
SAY_AFTER_S = 2  # a check that takes longer than this says which plugin it waits for
ENV = "STUDIO_PLUGIN_CHECK"
MARK = "[studio plugin check]"  # on the check process's stderr, before each plugin's own output
MAX_FILES = 20000  # files looked at per plugin for its fingerprint


def enabled() -> bool:
    from engine.state import env_flag

    return env_flag(ENV, True)


def key(cand) -> str:
    return f"{cand.source}:{cand.location}"


def fingerprint(cand) -> str:
    """Changes when the plugin's code changes: its version and the modification times and sizes of its files (a
    drop-in's own files; an installed package's .dist-info folder, which every install rewrites, and for an
    editable install its source tree). ``__pycache__`` and hidden folders are left out."""
    stamp = ""
    if cand.stamp_path:
        path = Path(cand.stamp_path)
        stamp = _tree_stamp(path)
        source = _editable_source(path) if path.suffix == ".dist-info" else None
        if source is not None:
            stamp += "+" + _tree_stamp(source)
    return f"{cand.version}|{stamp}"


def _tree_stamp(root: Path) -> str:
    newest = total = count = 0
    try:
        if root.is_file():
            st = root.stat()
            return f"{st.st_mtime_ns}:{st.st_size}"
        for folder, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                try:
                    st = os.stat(os.path.join(folder, name))
                except OSError:
                    continue
                newest, total, count = max(newest, st.st_mtime_ns), total + st.st_size, count + 1
                if count >= MAX_FILES:
                    return f"{newest}:{total}:{count}+"
    except OSError:
        pass
    return f"{newest}:{total}:{count}"


def _editable_source(dist_info: Path) -> Optional[Path]:
    """The source folder of an editable install (PEP 610 ``direct_url.json``), else None."""
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    try:
        info = json.loads((dist_info / "direct_url.json").read_text(encoding="utf-8"))
        if info.get("dir_info", {}).get("editable") and str(info.get("url", "")).startswith("file:"):
            return Path(url2pathname(unquote(urlparse(info["url"]).path)))
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _checks_path() -> Path:
    return state.home() / "plugin_checks.json"


_MEMORY: dict = {}  # {state folder: verdicts} of this process, kept even when no file can hold them


def _memory() -> dict:
    return _MEMORY.setdefault(str(state.home()), {})


def _fallback_path() -> Optional[Path]:
    """Where verdicts go when the state folder is read-only: a private per-user folder in the temporary folder,
    one file per state folder (so a read-only state folder does not mean a check, and its wait, every command)."""
    import hashlib

    folder = Path(tempfile.gettempdir()) / f"studio-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.stat()
        if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o077):
            return None  # not ours alone: not trusted
    except OSError:
        return None
    return folder / f"plugin_checks-{hashlib.sha256(str(state.home()).encode()).hexdigest()[:16]}.json"


def _read(path: Optional[Path]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def verdicts() -> dict:
    """``{key: {"name", "print", "error"?, "details"?}}`` as remembered (an unreadable file, or entry, is ignored:
    those plugins are checked again): the state folder's file, else the fallback, and this process's own."""
    data = _read(_checks_path()) or _read(_fallback_path())
    return {**data, **_memory()}


def _remember(fresh: dict) -> None:
    from engine.outputs import atomic_write_bytes

    _memory().update(fresh)
    data = verdicts()
    for path in (_checks_path(), _fallback_path()):
        try:
            atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())
            return
        except Exception:  # noqa: BLE001 - not being able to remember only means checking again next time
            continue


def forget_failure(name: str) -> None:
    """Drop a failed verdict for plugin ``name``, so it is checked again at the next load (``studio plugins enable``,
    or ticking it in the Plugins dialog: a user who thinks the crash or hang was a one-off can retry)."""
    from engine.outputs import atomic_write_bytes

    memory = _memory()
    for k in [k for k, v in memory.items() if v.get("name") == name and v.get("error")]:
        del memory[k]
    data = verdicts()
    kept = {k: v for k, v in data.items() if not (v.get("name") == name and v.get("error"))}
    if len(kept) != len(data):
        try:
            atomic_write_bytes(_checks_path(), json.dumps(kept, indent=1, sort_keys=True).encode())
        except Exception:  # noqa: BLE001 - the verdict then stays until the plugin changes
            pass


def failures(candidates: list) -> dict:
    """``{key: (why, details)}`` for the third-party plugins among ``candidates`` that end or hang a throwaway
    process while they load (checked now, or before with the same fingerprint)."""
    if not enabled():
        return {}
    todo, prints, pending = _todo(candidates)
    known, failed, fresh = verdicts(), {}, {}
    for cand in todo:
        old = known.get(key(cand)) or {}
        if cand not in pending and old.get("error"):
            failed[key(cand)] = (str(old["error"]), str(old.get("details", "")))
    while pending:
        result = _run(pending)
        if result is None:  # the check process itself did not start: blame no plugin, remember nothing
            break
        n_ok, why, details = result
        fresh.update({key(c): {"name": c.name, "print": prints[key(c)]} for c in pending[:n_ok]})
        if why is None:
            break
        culprit = pending[n_ok]
        failed[key(culprit)] = (why, details)
        fresh[key(culprit)] = {"name": culprit.name, "print": prints[key(culprit)], "error": why, "details": details}
        pending = pending[n_ok + 1:]
    if fresh:
        _remember(fresh)
    return failed


def needed(candidates: list) -> bool:
    """Whether ``failures(candidates)`` would start a throwaway process (a new or changed plugin)."""
    return enabled() and bool(_todo(candidates)[2])


def _todo(candidates: list) -> tuple:
    """(the third-party candidates that will be loaded, their fingerprints by key, those not checked with that
    fingerprint yet). A candidate whose name an earlier one took is left out: the host refuses it unimported."""
    seen, todo = set(), []
    for cand in candidates:
        if cand.name not in seen and cand.source != "built-in":
            todo.append(cand)
        seen.add(cand.name)
    known, prints = verdicts(), {key(c): fingerprint(c) for c in todo}
    return todo, prints, [c for c in todo if (known.get(key(c)) or {}).get("print") != prints[key(c)]]


def _run(cands: list) -> Optional[tuple]:
    """Load ``cands`` in order in one throwaway process: (how many loaded, why the next one failed or None, the
    failing one's stderr), or None when the process did not get as far as loading anything."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, **{ENV: "0", "PYTHONIOENCODING": "utf-8"})
    # this engine first, ahead of the working folder (which may hold another package called engine)
    program = f"import sys; sys.path.insert(0, {root!r}); from engine.plugin_check import main; main(sys.argv[1:])"
    cmd = [sys.executable, "-c", program, *[key(c) for c in cands]]
    with tempfile.TemporaryFile() as err_file:
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err_file, start_new_session=os.name == "posix")
        except OSError as exc:
            log.warning("The plugin check could not start (%s); new plugins load without it.", exc.strerror)
            return None
        lines, hung, told = _read_lines(proc), False, set()
        try:
            out, deadline = [], time.monotonic() + TIMEOUT_S
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    if proc.poll() is not None:  # exited; whatever it wrote is read within a moment
                        out += _drain(lines)
                        break
                    if time.monotonic() > deadline:
                        hung = True
                        break
                    current = sum(1 for m in out if m["type"] == "ok")
                    if deadline - time.monotonic() < TIMEOUT_S - SAY_AFTER_S and current not in told \
                            and current < len(cands):
                        told.add(current)  # say what the wait is for, once per plugin
                        log.warning("Checking the new plugin %s in a test process before loading it (this waits "
                                    "up to %d s if it hangs)...", cands[current].name, TIMEOUT_S)
                    continue
                if line is None:
                    break
                out.append(line)
                deadline = time.monotonic() + TIMEOUT_S  # each plugin gets its own TIMEOUT_S
        finally:
            _kill(proc)  # also whatever the plugins started while they loaded: the check is throwaway
            code = proc.wait()
        err_file.seek(0)
        err = err_file.read().decode("utf-8", "replace")
    if not any(m["type"] == "ready" for m in out):
        log.warning("The plugin check process ended before loading any plugin (exit status %s): %s; new plugins "
                    "load without it.", code, err.strip().splitlines()[-1:] or "no message")
        return None
    loaded = {m.get("index") for m in out if m["type"] == "ok"}
    n_ok = sum(1 for i, c in enumerate(cands) if i in loaded)
    if n_ok == len(cands):
        return n_ok, None, ""
    name = cands[n_ok].name
    if hung:
        why = f"Plugin {name} did not finish loading within {TIMEOUT_S} s in a test process, so it was not loaded"
    else:
        why = f"Plugin {name} ended the test process that loaded it ({_how(code)}), so it was not loaded"
    details = err.split(f"{MARK} {n_ok}\n", 1)[-1][-4000:]
    return n_ok, f"{why}; update it, or disable it with `studio plugins disable {name}`.", details


def _read_lines(proc) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read():
        for raw in proc.stdout:
            msg = messages.decode(raw.decode("utf-8", "replace"))
            if msg is not None:
                lines.put(msg)
        lines.put(None)
    threading.Thread(target=read, daemon=True, name="plugin-check-reader").start()
    return lines


def _drain(lines: queue.Queue) -> list:
    out = []
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            return out
        if line is None:
            return out
        out.append(line)


def _kill(proc) -> None:
    """End the check process, if still running, and on POSIX every process left in its group."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
    except OSError:  # nothing left to end
        pass


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    if code >= 0xC0000000:  # a Windows exception code, such as 0xC0000005 for an access violation
        return f"exception 0x{code:08X}"
    return f"exit code {code}"


def main(argv: list) -> None:
    """In the throwaway process: load each plugin (given by key), reporting on a pipe no plugin writes to."""
    report = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")  # not inherited by the plugin's children
    os.dup2(2, 1)  # what the plugins print goes to stderr
    sys.stdout = sys.stderr
    from engine.plugins import PluginHost, PluginStatus

    cands = PluginHost(safe_mode=False, disabled=[]).candidates()
    host = PluginHost(safe_mode=False, disabled=[])
    report.write(messages.encode("ready", pid=os.getpid()))
    for i, k in enumerate(argv):
        sys.stderr.write(f"{MARK} {i}\n")
        sys.stderr.flush()
        for cand in cands:
            if key(cand) == k:
                host._load_one(cand, PluginStatus(cand.name, cand.source, cand.version))  # Python errors are caught
                break
        report.write(messages.encode("ok", index=i))
    report.flush()
    os._exit(0)  # skip interpreter teardown: a plugin's atexit or finalizer crash is not a loading crash


if __name__ == "__main__":
    main(sys.argv[1:])
