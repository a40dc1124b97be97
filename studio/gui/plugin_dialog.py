"""The plugin manager: every plugin with version, source, status and error; enable/disable; install."""
from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFileDialog, QLabel, QMessageBox, QPlainTextEdit

from engine.errors import UsageError
from studio.gui.error_banner import ErrorBanner
from studio.gui.plugin_model import PluginTableModel
from studio.gui.util import button, column, guard, row, row_table, with_folder
from studio.gui.task_dialog import TaskDialog


class PluginDialog(TaskDialog):
    WAIT_MS = 2000

    plugins_changed = Signal()  # ask the main window to build a fresh PluginHost

    def __init__(self, session, parent=None):
        super().__init__(parent)
        self.session = session
        self.setWindowTitle("Plugins")
        self.banner = ErrorBanner()
        self.model = PluginTableModel(session.host, self)
        self.table = row_table(self.model)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setPlaceholderText("Select a plugin to see its location and, for a failed one, the full error.")
        self.details.setMaximumHeight(150)
        self.note = QLabel("Enabling or disabling takes effect when the plugins are reloaded.")
        self.install_folder = button("Install from folder…", self.on_install_folder)
        self.install_wheel = button("Install wheel…", self.on_install_wheel)
        self.reload_button = button("Reload plugins", self.on_reload)
        self.close_button = button("Close", self.accept)
        column(self, self.banner, (self.table, 1), self.details, self.note,
               row(self.install_folder, self.install_wheel, None, self.reload_button, self.close_button))
        self.table.selectionModel().currentRowChanged.connect(self.on_row)
        self.resize(860, 440)

    def show_error(self, message: str, details: str = "") -> None:
        self.banner.show_message(message, details, "error")

    @guard
    def on_row(self, current, *args) -> None:
        p = self.model.rows[current.row()] if current.isValid() else None
        if p is None:
            self.details.clear()
            return
        text = f"{p.name} {p.version} ({p.source})\n{p.location}\n"
        if p.error:
            text += f"\n{p.error}\n\n{p.details}"
        self.details.setPlainText(text)

    @guard
    def on_reload(self) -> None:
        """Check new or changed plugins in a worker thread (each in a throwaway process: it can take a while),
        then reload them on this thread, where their verdicts are then remembered."""
        if self.task is not None:
            raise UsageError("Wait for the running installation to finish.")
        self._start(lambda report: self.session.check_new_plugins(), "Checking new or changed plugins",
                    lambda _r: self.reload(), "check-plugins")

    @guard
    def reload(self) -> None:
        self.plugins_changed.emit()
        self.model.pending.clear()
        self.model.set_rows(self.session.host.plugins.values())
        self.banner.show_message("Plugins reloaded.", kind="info")

    @guard
    def on_install_folder(self) -> None:
        with_folder(self, "Plugin package folder (with a pyproject.toml)", self.install)

    @guard
    def on_install_wheel(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Plugin wheel", "", "Wheels (*.whl)")
        if path:
            self.install(path)

    def confirm_install(self, source: str) -> bool:
        from engine.install import WARNING

        answer = QMessageBox.warning(
            self, "Install plugin?", f"Install the plugin from\n{source}?\n\n{WARNING}",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Cancel)
        return answer == QMessageBox.StandardButton.Yes

    @guard
    def install(self, source: str) -> None:
        if self.task is not None:
            raise UsageError("An installation is already running.")
        if not self.confirm_install(source):
            return
        from engine.install import install

        def work(report):
            install(source)
            self.session.check_new_plugins()  # here, not in the reload on the window's thread

        self._start(work, f"Installing {source}", lambda _r: self._installed(source), "install-plugin")

    def _start(self, work, doing: str, done, name: str) -> None:
        """Run ``work`` in a worker thread with the buttons disabled; ``done(result)`` on success."""
        self.banner.show_message(f"{doing}…", kind="info")
        self.start_task(work, name, done, lambda f: self.show_error(f"{doing} failed: {f.message}", f.details))

    @guard
    def _installed(self, source: str) -> None:
        self.reload()
        self.banner.show_message(f"Installed {source}; the plugins were reloaded.", kind="info")

    def set_busy(self, busy: bool) -> None:
        for b in (self.install_folder, self.install_wheel, self.reload_button):
            b.setEnabled(not busy)

    def before_close(self) -> None:
        if self.model.pending:
            self.plugins_changed.emit()  # apply enable/disable now rather than at the next start
