"""The main window's task handling: start the next queued job in a worker, apply what the worker reports
(text, previews, progress), and settle the queue row when the job succeeds, fails or is cancelled. A mixin of
MainWindow, like recipe_actions.py."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QTimer

from engine import chat as chat_mod
from engine.errors import StudioError
from engine.generators import CancelToken
from studio.gui.output_view import kind_of
from studio.gui.util import guard
from studio.gui.worker import (Failure, Finished, PreparedMsg, PreviewMsg, ProgressMsg, StatusMsg, TextMsg,
                               generation_task)


def loaded_note(recipe: dict) -> str:
    """``; loaded <model> (<backend>) in 1.23 s`` from a recipe's timings, or that the model was already loaded."""
    load_s = (recipe.get("timings") or {}).get("load_s")
    model = (recipe.get("model") or {}).get("name")
    if load_s is None or not model:
        return ""
    what = f"{model} ({recipe.get('backend', '')}{', ' + recipe['onnx_export'] if recipe.get('onnx_export') else ''})"
    if load_s < 0.05:  # the generation process kept it loaded from an earlier generation
        return f"; {what} was already loaded"
    return f"; loaded {what} in {load_s:.2f} s"

class TaskActions:
    @guard
    def pump(self) -> None:
        """Start the next queued job when this window runs none."""
        if self.task is not None or self._closing:
            return
        qjob = self.queue.claim(kinds=("generate",))  # exports and fine-tunes run from `studio queue run`
        if qjob is None:
            return
        from engine.runner import queued_job

        qjob.tag = self.queue.tag(qjob.id)
        self.current_job = qjob
        if qjob.id == self.chat_job:
            self.chat_job = None  # it started: its answer (or its failure) shows in the conversation
        job = queued_job(qjob.job)
        gen = self.session.host.generators.get(job.generator)
        # the conversation view follows this window's own chat jobs; one queued elsewhere (the CLI, a job file)
        # answers in the Output tab and leaves the user's conversation as it is
        self.chatting = bool(gen) and "messages" in gen[0].info.takes and qjob.source == "gui" and \
            (qjob.id in self.submitted or self.chat.shows_no_other(job.messages))  # another window's chat job
        # (a second window on the same state folder) answers in Output unless this view holds nothing else
        self.banner.hide()
        self.token = CancelToken()
        self.busy_kind = kind_of(gen[0].info) if gen else "text"
        self.output.begin(self.busy_kind, job.image or "")
        if self.chatting:
            try:
                self.chat.begin_answer(job.messages)
            except StudioError as exc:  # a conversation that cannot be shown cannot be sent: the job fails (it
                self.queue.fail(qjob.id, str(exc), type(exc).__name__)  # stayed "running" for ever)
                self.current_job, self.chatting = None, False
                QTimer.singleShot(0, self.pump)
                raise
        self.tabs.setCurrentWidget(self.chat if self.chatting else self.output)
        self.panel.set_busy(True)
        self.panel.generate_button.setEnabled(True)  # Generate queues the next job meanwhile
        self.panel.show_progress(0, 0, None, "Preparing…")
        self._progress_t0 = None
        self.replay_of = self.replays.pop(qjob.id, None)
        task = generation_task(self.session, job, self.token, self, queue_tag=qjob.tag)
        task.succeeded.connect(self.on_task_succeeded)
        task.failed.connect(self.on_task_failed)
        task.finished.connect(self.on_task_finished)
        self.task = task
        task.start()
        self.drain_timer.start()
        self.queue_panel.refresh()

    def _record_progress(self, msg) -> None:
        """Progress into the queue (what the Queue tab, the CLI and the server show), at most 4 times a second;
        a cancel asked for elsewhere (`studio queue cancel`) stops the job here."""
        job = self.current_job
        if job is None or (msg.at - self._reported_at < 0.25 and msg.step != msg.total):
            return
        self._reported_at = msg.at
        if self.queue.report(job.id, msg.step, msg.total, msg.message) and self.token is not None:
            self.token.cancel()

    @guard
    def on_queue_changed(self) -> None:
        """A button of the Queue tab: a cancel of this window's job stops it; a resume starts the next."""
        if self.current_job is not None and self.token is not None and \
                self.queue.cancel_requested(self.current_job.id):
            self.token.cancel()
        self.check_chat_job()
        self.pump()

    @guard
    def check_chat_job(self) -> None:
        """This window's chat job cancelled (or failed, or cleared) before it started: the message goes back into
        the message box, or the answer a Regenerate replaced comes back, as when a running answer is stopped."""
        if self.chat_job is None:
            return
        try:
            state = self.queue.get(self.chat_job).state
        except StudioError:  # cleared from the queue
            state = "gone"
        if state in ("queued", "running", "done"):
            return
        self.submitted.discard(self.chat_job)  # a retry later answers in Output unless the view shows its turns
        self.chat_job = None
        if self.chat.answer is None:
            self.chat.abort_answer()
            self.statusBar().showMessage("The chat message was cancelled before it was answered.", 8000)

    @guard
    def cancel(self) -> None:
        if self.token is not None and self.task is not None:
            self.token.cancel()
            self.panel.show_progress(0, 0, None, "Cancelling…")

    @guard
    def drain(self) -> None:
        """Apply what the worker reported since the last drain: text joined, only the newest preview/progress."""
        if self.task is None:
            return
        msgs = self.task.take()
        if not msgs:
            return
        text = "".join(m.text for m in msgs if isinstance(m, TextMsg))
        if text:
            self.output.append_text(text)
            if self.chatting:
                self.chat.append_text(text)
        for kind in (StatusMsg, PreparedMsg, ProgressMsg, PreviewMsg):
            last = next((m for m in reversed(msgs) if isinstance(m, kind)), None)
            if last is not None:
                self.on_task_message(last)

    def on_task_message(self, msg) -> None:
        if isinstance(msg, TextMsg):
            self.output.append_text(msg.text)
        elif isinstance(msg, ProgressMsg):
            left = None
            if self._progress_t0 is None:
                self._progress_t0 = (msg.at, msg.step)
            elif msg.step > self._progress_t0[1]:
                rate = (msg.at - self._progress_t0[0]) / (msg.step - self._progress_t0[1])
                left = max(0.0, rate * (msg.total - msg.step))
            self.panel.show_progress(msg.step, msg.total, left, msg.message)
            if msg.message.startswith("loading"):  # what the generation process is opening, in the status bar
                self.statusBar().showMessage(msg.message[:1].upper() + msg.message[1:] + "…")
            self._record_progress(msg)
        elif isinstance(msg, PreviewMsg):
            total = self.panel.progress.maximum()
            step = f"preview, step {msg.step}/{total}" if msg.step is not None else "preview"
            self.output.show_preview(msg.qimage, step)
        elif isinstance(msg, StatusMsg):
            self.panel.show_progress(0, 0, None, msg.text)
        elif isinstance(msg, PreparedMsg):
            self.panel.last_seed = msg.seed
            where = f" on {msg.device}" + (f" ({msg.backend})" if msg.model and msg.backend else "") + \
                (f" with {msg.model}" if msg.model else "")
            self.panel.show_progress(0, 0, None, f"Running{where}, seed {msg.seed}…")

    @guard
    def on_task_succeeded(self, done: Finished) -> None:
        self.drain()
        rec = done.record
        if self.current_job is not None:
            self.queue.finish(self.current_job.id, rec.history_id,
                              {"files": [str(f) for f in rec.files], "text": rec.recipe.get("text"),
                               "content_sha256": rec.recipe.get("content_sha256")})
        audio = rec.result.audio if rec.result.audio is not None else None
        self.output.show_result(rec.recipe, [str(f) for f in rec.files], done.qimage, audio)
        if self.chatting:
            self.chat.finish_answer(rec.recipe.get("text") or "")
            for warning in rec.recipe.get("warnings", []):
                if warning != chat_mod.FALLBACK_NOTE:  # that one shows above the conversation already
                    self.show_info(warning)
        self.panel.reset_progress(f"done in {rec.recipe.get('timings', {}).get('total_s', 0):.2f} s")
        self.panel.progress_label.setText(f"Saved {Path(rec.files[0]).name}" if rec.files else "")
        self.statusBar().showMessage((f"Saved {rec.files[0]}" if rec.files else "Done") + loaded_note(rec.recipe), 8000)
        self.history.refresh()
        if self.replay_of is not None:
            self.say_how_replay_went(self.replay_of, rec.recipe)

    def say_how_replay_went(self, original: dict, replayed: dict) -> None:
        from engine.replay import replay_notes

        if not original.get("content_sha256"):
            return
        if replayed.get("content_sha256") == original["content_sha256"]:
            self.show_info("Replayed: identical to the original output.")
            return
        notes = replay_notes(original, replayed)
        self.show_info("Replayed: different from the original output" + (f"; {notes[0]}." if notes else "."))

    @guard
    def on_task_failed(self, failure: Failure) -> None:
        self.drain()
        if self.current_job is not None:
            if failure.cancelled and self._closing:
                self.queue.release(self.current_job.id)  # closing the window is not giving up the job
            elif failure.cancelled:
                self.queue.cancelled(self.current_job.id)
            else:
                self.queue.fail(self.current_job.id, failure.message, failure.error)
        if self.chatting:
            self.chat.abort_answer()
        if failure.cancelled:
            self.panel.reset_progress("cancelled")
            self.panel.progress_label.setText("Cancelled.")
            self.output.info.setText("Cancelled.")
            self.statusBar().showMessage("Generation cancelled.", 5000)
        else:
            self.panel.reset_progress("failed")
            self.panel.progress_label.setText("")
            self.output.info.setText("Failed.")
            self.show_error(failure.message, failure.details)

    @guard
    def on_task_finished(self) -> None:
        self.drain()
        self.drain_timer.stop()
        task, self.task = self.task, None
        self.current_job = None
        self.panel.set_busy(False)
        if self.chatting and self.chat.answer is not None:  # neither succeeded nor failed reached it
            self.chat.abort_answer()
        self.chatting = False
        if task is not None:
            task.deleteLater()
        self.queue_panel.refresh()
        if not self._closing:
            QTimer.singleShot(0, self.pump)
