"""The main window: generator list, generator panel, output view, history and queue, menus, running jobs.
Recipes and drag and drop are studio/gui/recipe_actions.py; running the queued jobs is studio/gui/task_actions.py."""
from __future__ import annotations

import copy
import logging
import sqlite3
from pathlib import Path

from PySide6.QtCore import QByteArray, QSize, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (QListWidget, QListWidgetItem, QMainWindow, QSplitter,
                               QTabWidget, QVBoxLayout, QWidget)

from engine.errors import StateError, UsageError
from engine.runfolder import unfinished
from studio.gui.chat_view import ChatView
from studio.gui.dialog_actions import DialogActions
from studio.gui.error_banner import ErrorBanner
from studio.gui.generator_panel import GeneratorPanel
from studio.gui.history_panel import HistoryPanel
from studio.gui.output_view import OutputView, kind_of
from studio.gui.queue_panel import QueuePanel
from studio.gui.recipe_actions import RecipeActions
from studio.gui.session import Session
from studio.gui.task_actions import TaskActions
from studio.gui.util import generator_icon, guard

log = logging.getLogger(__name__)

CLOSE_WAIT_MS = 1800
DRAIN_MS = 16  # how often worker messages reach the widgets (about 60 Hz)


class MainWindow(TaskActions, RecipeActions, DialogActions, QMainWindow):
    def __init__(self, session: Session | None = None, generator: str | None = None):
        super().__init__()
        self.session = session or Session()
        self.setWindowTitle("GenAI Studio")
        self.setAcceptDrops(True)
        self.task = None
        self.finetune_page = None  # Tools > Fine-tune (LoRA)… (studio/gui/finetune_page.py), made when first opened
        self.token = None
        self.replay_of = None  # the recipe a running generation replays
        self.replays: dict = {}  # queue job id -> the recipe it replays
        self.preparing: set = set()  # the Tasks making replay jobs (they hash the recipe's input files)
        self.submitted: set = set()  # queue job ids this window submitted
        self.chat_job = None  # the id of this window's chat job until it starts (its message shows as sent)
        self.current_job = None  # the engine.jobqueue.QueueJob this window is running
        self._reported_at = 0.0  # when its progress last went into the queue
        self.busy_kind = ""
        self._progress_t0 = None
        self._closing = False
        self.persist = True  # save geometry and last-used options on close (off for --screenshot)
        self.drain_timer = QTimer(self)
        self.drain_timer.setInterval(DRAIN_MS)
        self.drain_timer.timeout.connect(self.drain)
        gui = self.session.settings.gui
        self.gui_state = dict(gui) if isinstance(gui, dict) else {}
        saved = self.gui_state.get("generators")
        self.saved = {k: v for k, v in saved.items() if isinstance(v, dict)} if isinstance(saved, dict) else {}
        self.shown_forms: dict = {}  # generator id -> its form as first shown in this window

        self.banner = ErrorBanner()
        self.generator_list = QListWidget()
        self.generator_list.setObjectName("generators")
        self.generator_list.setIconSize(QSize(32, 32))
        self.generator_list.setMinimumWidth(150)
        self.generator_list.setMaximumWidth(230)
        self.panel = GeneratorPanel()
        self.panel.setMinimumWidth(340)
        self.output = OutputView()
        self.chat = ChatView()
        self.chatting = False  # the running generation is a chat answer
        self.history = HistoryPanel(self.session.history)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.chat, "Conversation")
        self.tabs.addTab(self.output, "Output")
        self.tabs.addTab(self.history, "History")
        from engine import state
        from engine.jobqueue import JobQueue
        from engine.jobworker import recover

        queue_problem = ""
        self.temporary_queue = None
        try:
            self.queue = JobQueue()
            recover(self.queue)  # jobs a dead studio was running are queued again
            self.queue.list(limit=1)  # (a file damaged past its first pages fails only when read)
        except (StateError, sqlite3.DatabaseError) as exc:  # a damaged or unreadable queue.sqlite3: the window
            import tempfile  # still opens, on a queue of its own that is not kept, and says so

            self.temporary_queue = Path(tempfile.mkdtemp(prefix="studio-queue-"))  # removed when the window closes
            self.queue = JobQueue(self.temporary_queue / "queue.sqlite3")
            why = str(exc) if isinstance(exc, StateError) else \
                f"The queue database {state.home() / 'queue.sqlite3'} cannot be read ({exc}); move it aside to " \
                "start with an empty queue."
            queue_problem = f"{why} Until then this window uses a temporary queue, which is not kept."
        self.queue_panel = QueuePanel(self.queue)
        self.tabs.addTab(self.queue_panel, "Queue")
        self.queue_panel.changed.connect(self.on_queue_changed)
        self.queue_panel.timer.timeout.connect(self.check_chat_job)  # (a cancel from a terminal too)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.generator_list)
        split.addWidget(self.panel)
        split.addWidget(self.tabs)
        split.setStretchFactor(2, 1)
        split.setSizes([180, 380, 560])
        central = QWidget()
        lay = QVBoxLayout(central)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.banner)
        lay.addWidget(split, 1)
        self.setCentralWidget(central)
        self._menus()

        QShortcut(QKeySequence("Ctrl+Return"), self, self.generate)
        QShortcut(QKeySequence("Ctrl+Enter"), self, self.generate)
        QShortcut(QKeySequence(Qt.Key.Key_Escape), self, self.cancel)

        self.generator_list.currentItemChanged.connect(self.on_generator_changed)
        self.panel.generate_clicked.connect(self.generate)
        self.panel.prompt.refused.connect(self.show_error)
        self.chat.input.refused.connect(self.show_error)
        self.panel.cancel_clicked.connect(self.cancel)
        self.output.replay_requested.connect(self.replay)
        self.output.caption_requested.connect(self.caption_image)
        self.output.prompt_requested.connect(self.use_as_prompt)
        self.history.open_requested.connect(self.open_entry)
        self.history.load_requested.connect(self.on_load_requested)
        self.chat.send_requested.connect(self.generate)
        self.chat.regenerate_requested.connect(self.regenerate_answer)
        self.chat.continue_requested.connect(self.continue_chat)
        self.panel.model.currentIndexChanged.connect(self.on_chat_model_changed)
        self.panel.form.changed.connect(self.on_chat_options_changed)

        s = self.session.settings
        self.panel.set_pickers(self.gui_state.get("backend", s.backend), self.gui_state.get("device", s.device))
        self._restore_geometry()
        self.chat.restore(self.gui_state.get("chat"))
        self._adopt_chat_job()
        self.populate_generators(generator or self.gui_state.get("generator"))
        if isinstance(self.session.loaded.gui, dict):  # a window that never touched the chat does not write it over
            self.session.loaded.gui["chat"] = copy.deepcopy(self.chat.state())  # another window's conversation
        self.history.refresh()
        self.statusBar().showMessage(self._plugin_summary())
        if queue_problem:
            self.show_error(queue_problem)
        elif isinstance(self.gui_state.get("finetune_run"), dict) and \
                unfinished(self.gui_state["finetune_run"].get("folder")):
            self.statusBar().showMessage("A fine-tune run stopped when the studio closed; Tools > Fine-tune… "
                                         "resumes it.", 15000)
        QTimer.singleShot(0, self.pump)  # jobs left in the queue by an earlier session

    # ----- menus -----------------------------------------------------------------------------
    def _menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self._action(file_menu, "Open image…", self.panel.image_input.on_browse, "Ctrl+O")
        file_menu.addSeparator()
        self._action(file_menu, "Quit", self.close, "Ctrl+Q")
        tools = bar.addMenu("&Tools")
        self._action(tools, "Plugins…", self.open_plugins)
        self._action(tools, "Models…", self.open_models)
        self._action(tools, "Export to ONNX…", self.open_export)
        self._action(tools, "Caption a folder…", self.open_caption_folder)
        self._action(tools, "Fine-tune (LoRA)…", self.open_finetune)
        tools.addSeparator()
        self._action(tools, "Settings…", self.open_settings, "Ctrl+,")
        help_menu = bar.addMenu("&Help")
        self._action(help_menu, "About GenAI Studio", self.open_about)

    def _action(self, menu, text, slot, shortcut=None) -> QAction:
        act = QAction(text, self)
        if shortcut:
            act.setShortcut(QKeySequence(shortcut))
        act.triggered.connect(lambda *_: slot())
        menu.addAction(act)
        return act

    # ----- errors ----------------------------------------------------------------------------
    def show_error(self, message: str, details: str = "") -> None:
        self.banner.show_message(message, details, "error")
        self.statusBar().showMessage(message.splitlines()[0] if message else "", 8000)

    def show_info(self, message: str) -> None:
        self.banner.show_message(message, "", "info")

    def _plugin_summary(self) -> str:
        plugins = self.session.host.plugins.values()
        failed = [p.name for p in plugins if p.status == "failed"]
        text = f"{len(self.session.host.generators)} generators from {len(plugins)} plugins"
        return text + (f"; failed: {', '.join(failed)} (see Tools > Plugins)" if failed else "")

    # ----- generators ------------------------------------------------------------------------
    def populate_generators(self, select: str | None = None) -> None:
        current = select or self.current_generator_id()
        self._keep_form()  # what the form holds now comes back after the list is rebuilt
        self.generator_list.blockSignals(True)
        self.generator_list.clear()
        for info in self.session.generators():
            item = QListWidgetItem(generator_icon(info), info.title)
            item.setData(Qt.ItemDataRole.UserRole, info.id)
            item.setToolTip(f"{info.description}\n({'+'.join(info.takes)} → {info.makes}; plugin "
                            f"{self.session.host.plugin_of(info.id)})")
            self.generator_list.addItem(item)
        self.generator_list.blockSignals(False)
        ids = [self.generator_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.generator_list.count())]
        row = ids.index(current) if current in ids else 0
        if ids:
            self.panel.info = None
            self.generator_list.setCurrentRow(row)
            if self.panel.info is None:
                self.on_generator_changed()
        else:
            self.panel.info = None
            self.show_error("No generators are available: every plugin failed or is disabled (see Tools > Plugins).")
        self.output.set_targets(bool(self.session.find_generator("text", "image")),
                                bool(self.session.find_generator("image", "text")))

    def _adopt_chat_job(self) -> None:
        """A chat message sent before a restart and still queued is this window's chat job again."""
        try:
            queued = self.queue.list(states=("queued",))
        except Exception:  # noqa: BLE001 - (the queue was checked when the window opened)
            return
        for qjob in queued:
            if qjob.source == "gui" and qjob.job.get("messages") and self.chat.adopt(qjob.job["messages"]):
                self.chat_job = qjob.id
                self.submitted.add(qjob.id)
                return

    def _keep_form(self) -> None:
        """The shown generator's form into ``saved`` (written at close) once it differs from what it first showed: a
        form only looked at is not written over what another window on the same state folder saved for it."""
        if self.panel.info is None:
            return
        gid, state = self.panel.info.id, self.panel.state()
        if gid in self.saved or state != self.shown_forms.get(gid):
            self.saved[gid] = state

    def current_generator_id(self) -> str | None:
        item = self.generator_list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item else None

    def generator_ids(self) -> list:
        return [self.generator_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.generator_list.count())]

    def select_generator(self, gid: str) -> None:
        ids = self.generator_ids()
        if gid not in ids:
            raise UsageError(f"There is no generator {gid!r}; the installed generators are: {', '.join(ids) or 'none'}.")
        self.generator_list.setCurrentRow(ids.index(gid))

    @guard
    def on_generator_changed(self, *args) -> None:
        self._keep_form()
        gid = self.current_generator_id()
        if gid is None or gid not in self.session.host.generators:
            return
        info = self.session.host.generators[gid][0].info
        models, default = [], ""
        try:
            models = self.session.models_for(info)
            entry = self.session.store.default_for(info.id) if info.families else None
            default = entry.name if entry else ""
        except Exception as exc:  # noqa: BLE001 - a broken store must not stop the form
            from studio.gui.util import report_error
            report_error(self, exc, "Listing models failed")
        self.panel.set_generator(info, models, default)
        try:
            self.panel.restore(self.saved.get(gid, {}))
        except Exception:  # noqa: BLE001 - remembered state is a convenience; a bad one is dropped
            log.warning("Ignoring the remembered state of generator %s", gid)
        self.shown_forms.setdefault(gid, self.panel.state())
        if self.task is None:
            self.output.set_kind(kind_of(info))
        is_chat = "messages" in info.takes
        self.tabs.setTabVisible(self.tabs.indexOf(self.chat), is_chat)
        if is_chat:
            self.on_chat_model_changed()
            self.tabs.setCurrentWidget(self.chat)
        elif self.tabs.currentWidget() is self.chat:
            self.tabs.setCurrentWidget(self.output)

    def refresh_models(self) -> None:
        if self.panel.info is not None:
            info = self.panel.info
            keep = self.panel.model.currentData()
            entry = self.session.store.default_for(info.id) if info.families else None
            self.panel.set_models(self.session.models_for(info), keep or (entry.name if entry else ""))

    # ----- generation ------------------------------------------------------------------------
    def is_busy(self) -> bool:
        return self.task is not None

    @guard
    def generate(self) -> None:
        self.submit()

    def submit(self, regenerate: bool = False, draft: bool = True) -> int:
        """Queue the panel's job; it starts at once when nothing runs, else after the jobs before it. A chat job
        sends the conversation, with the message box as the last turn when ``draft``."""
        job = self.panel.job()
        sent = None
        if "messages" in self.panel.info.takes:
            if self.chat.answer is not None or any(
                    j.job.get("messages") and j.source == "gui" for j in self.queue.list(states=("queued", "running"))):
                # the next message is sent with the answer it follows; queued now, it would go without it
                raise UsageError("The model is still answering; wait for the answer (or Stop it) before sending "
                                 "the next message.")
            sent = self.chat.to_send(regenerate, draft)
            job.messages = [m.to_dict() for m in sent]
        self._remember()
        job_id = self._enqueue(job)
        if sent is not None:
            self.chat.sent(sent, regenerate)
            self.chat_job = job_id
        self.pump()
        return job_id

    def _enqueue(self, job) -> int:
        job_id = self.queue.submit(job, source="gui")
        self.submitted.add(job_id)  # this window's own (its chat jobs answer in its conversation)
        if self.task is not None or self.queue.paused():
            waiting = len(self.queue.list(states=("queued",)))
            self.statusBar().showMessage(f"Queued as job {job_id} ({waiting} waiting"
                                         + ("; the queue is paused)" if self.queue.paused() else ")"), 5000)
        return job_id

    # ----- chat ------------------------------------------------------------------------------
    @guard
    def continue_chat(self) -> None:
        self.submit(draft=False)

    @guard
    def regenerate_answer(self) -> None:
        if self.task is not None:
            return
        self.submit(regenerate=True)  # the last answer goes once its replacement is queued

    @guard
    def on_chat_model_changed(self, *args) -> None:
        info = self.panel.info
        if info is None or "messages" not in info.takes:
            return
        name = self.panel.model.currentData()
        entry = None
        if name:
            entry = next((e for e in self.session.models_for(info) if e.name == name), None)
        self.chat.set_model(entry, int(self.panel.form.values().get("max_new_tokens", 200)))

    @guard
    def on_chat_options_changed(self) -> None:
        if self.panel.info is not None and "messages" in self.panel.info.takes:
            self.chat.set_max_new_tokens(int(self.panel.form.values().get("max_new_tokens", 200)))

    # ----- hand-overs between generators -----------------------------------------------------
    @guard
    def replay(self, recipe: dict) -> None:
        """The recipe's job again, as `studio history replay` runs it (its recorded inputs or the studio's kept
        copies, model folder, LoRAs, export and thread count); the form shows the recipe meanwhile. The job is
        made in a thread: it hashes the recipe's input files and LoRAs (a multi-GB LoRA takes seconds)."""
        from studio.gui.worker import Task

        if any(t.recipe == recipe for t in self.preparing):  # (a second click while its inputs are hashed)
            return
        task = Task(lambda report: _replay_job(self.session.store, recipe), self, name="prepare-replay")
        task.recipe = recipe
        task.succeeded.connect(lambda made: self._replay_ready(recipe, *made))
        task.failed.connect(lambda failure: self.show_error(failure.message, failure.details))
        task.finished.connect(lambda: self.preparing.discard(task))
        task.finished.connect(task.deleteLater)
        self.preparing.add(task)
        self.statusBar().showMessage("Preparing the replay (checking its input files)…")
        task.start()

    @guard
    def _replay_ready(self, recipe: dict, job, notes: list) -> None:
        if self._closing:
            return
        self.load_recipe(recipe)
        job_id = self._enqueue(job)
        self.replays[job_id] = dict(recipe)  # on_task_succeeded says whether the output came out the same
        self.statusBar().showMessage("Replaying: " + "; ".join(notes) if notes else "Replaying.", 10000)
        self.pump()
        if self.current_job is not None and self.current_job.id in self.replays:
            self.replay_of = self.replays.pop(self.current_job.id)

    @guard
    def caption_image(self, path: str) -> None:
        self._switch_to("text", "image", "caption")
        self.panel.image_input.set_path(path)
        self.generate()

    @guard
    def use_as_prompt(self, text: str) -> None:
        self._switch_to("image", "text", "image")
        self.panel.prompt.setPlainText(text.strip())

    def _switch_to(self, makes: str, takes: str, what: str) -> None:
        """Select the first generator that makes ``makes`` from ``takes``; UsageError when none is installed."""
        gid = self.session.find_generator(makes, takes)
        if gid is None:
            raise UsageError(f"No {what} generator is installed.")
        self.select_generator(gid)

    # ----- persistence and closing -----------------------------------------------------------
    @guard
    def _restore_geometry(self) -> None:
        geo = self.gui_state.get("geometry")
        if geo:
            try:
                self.restoreGeometry(QByteArray.fromBase64(geo.encode()))
                return
            except Exception:  # noqa: BLE001
                pass
        self.resize(1180, 760)

    def _remember(self) -> None:
        self._keep_form()
        self.gui_state.update({
            "generator": self.current_generator_id(), "generators": self.saved,
            "backend": self.panel.backend.currentText(), "device": self.panel.device.currentText(),
            "chat": self.chat.state(),
        })
        page = getattr(self, "finetune_page", None)
        if page is not None:  # an unfinished run is offered again next time (else the earlier session's stays)
            self.gui_state["finetune_run"] = page.unfinished_run()

    def save_state(self) -> None:
        self._remember()
        self.gui_state["geometry"] = bytes(self.saveGeometry().toBase64()).decode()
        self.session.settings.gui = self.gui_state
        self.session.save_settings()

    def closeEvent(self, event) -> None:
        self._closing = True
        try:
            if self.task is not None:
                self.token.cancel()
                if not self.task.wait(CLOSE_WAIT_MS):
                    log.warning("The generator did not stop within %.1f s; leaving it behind.", CLOSE_WAIT_MS / 1000)
            for prepare in list(self.preparing):  # a replay still hashing its inputs (it queues nothing now)
                prepare.wait(CLOSE_WAIT_MS)
            self.chat.counter.shutdown(wait=False, cancel_futures=True)  # (a count running ends by itself)
            if getattr(self, "finetune_page", None) is not None:
                self.finetune_page.stop()  # paused with a checkpoint: Resume continues it
            if self.persist:
                self.save_state()
            self.session.close()
            if self.temporary_queue is not None:
                import shutil

                shutil.rmtree(self.temporary_queue, ignore_errors=True)
        except Exception:  # noqa: BLE001 - closing must always work
            log.exception("error while closing")
        event.accept()


def _replay_job(store, recipe: dict) -> tuple:
    """(job, notes) for a replay (in a thread); a recipe made on cuda replays on the CPU where there is no GPU (the
    window says afterwards that the device differed)."""
    from engine.replay import replay_job

    try:
        return replay_job(store, recipe)
    except UsageError:
        if recipe.get("device") != "cuda":
            raise
        return replay_job(store, recipe, device="cpu")
