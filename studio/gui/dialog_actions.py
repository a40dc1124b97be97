"""The Tools and Help menu actions of the main window: each opens one dialog (imported when first opened)."""
from __future__ import annotations

from engine.errors import UsageError
from studio.gui.util import guard


class DialogActions:
    """Mixed into MainWindow; uses its ``session``, ``panel``, ``task``, ``populate_generators``,
    ``refresh_models`` and ``_plugin_summary``."""

    def _exec(self, module: str, name: str, *args, **signals):
        """Run the dialog ``studio.gui.<module>.<name>(*args or (session,), self)`` modally, its ``signals``
        connected to slots; return it with what ``exec`` returned."""
        import importlib

        cls = getattr(importlib.import_module(f"studio.gui.{module}"), name)
        dlg = cls(*(args or (self.session,)), self)
        for signal, slot in signals.items():
            getattr(dlg, signal).connect(slot)
        return dlg, dlg.exec()

    @guard
    def open_plugins(self) -> None:
        self._exec("plugin_dialog", "PluginDialog", plugins_changed=self.reload_plugins)

    @guard
    def reload_plugins(self) -> None:
        if self.task is not None:
            raise UsageError("Wait for the running generation to finish before reloading plugins.")
        if self.session.plugins_need_check():  # a new or changed plugin: check it off this thread first
            from studio.gui.worker import Task

            self.statusBar().showMessage("Checking new or changed plugins…")
            check = Task(lambda report: self.session.check_new_plugins(), self, name="check-plugins")
            check.finished.connect(self._reload_plugins_now)
            check.finished.connect(check.deleteLater)
            check.start()
            return
        self._reload_plugins_now()

    @guard
    def _reload_plugins_now(self) -> None:
        if not self.isVisible():  # closed while the check ran
            return
        self.session.reload_plugins()
        self.populate_generators()
        self.statusBar().showMessage("Plugins reloaded: " + self._plugin_summary(), 8000)

    @guard
    def open_models(self) -> None:
        self._exec("model_dialog", "ModelDialog", models_changed=self.refresh_models)

    @guard
    def open_export(self) -> None:
        self._exec("export_dialog", "ExportDialog")
        self.refresh_models()

    @guard
    def open_caption_folder(self) -> None:
        self._exec("caption_folder_dialog", "CaptionFolderDialog")

    @guard
    def open_finetune(self) -> None:
        """The fine-tune page, a window of its own that keeps its run while hidden."""
        from PySide6.QtCore import Qt

        from studio.gui.finetune_page import FinetunePage

        page = getattr(self, "finetune_page", None)
        if page is None:
            page = FinetunePage(self.session, self)
            page.setWindowFlag(Qt.WindowType.Window)
            page.resize(1180, 780)
            page.use_adapter.connect(self.use_finetuned_adapter)
            self.finetune_page = page
        page.show()
        page.raise_()
        page.activateWindow()

    @guard
    def use_finetuned_adapter(self, generator: str, model: str, adapter: str) -> None:
        """The fine-tune page's "Use this adapter": its generator, base model and adapter, in this window."""
        self.select_generator(generator)
        idx = self.panel.model.findData(model)
        if idx >= 0:
            self.panel.model.setCurrentIndex(idx)
        self.panel.loras.add(adapter)
        self.raise_()
        self.activateWindow()
        self.show_info(f"Using the adapter {adapter} on {model}: write a prompt and Generate.")

    @guard
    def open_settings(self) -> None:
        dlg, accepted = self._exec("settings_dialog", "SettingsDialog", self.session.settings)
        if accepted:
            dlg.apply(self.session.settings)
            self.panel.set_pickers(self.session.settings.backend, self.session.settings.device)
            self.session.save_settings(quiet=False)  # used now either way; not kept is said in the banner

    @guard
    def open_about(self) -> None:
        from studio.gui.about_dialog import AboutDialog

        AboutDialog(self, self.session.process).exec()
