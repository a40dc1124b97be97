"""The main window's recipe actions: load a recipe into the form, open a history entry, and drag and drop (an
image's recipe, or the image as an input). A mixin of MainWindow, like dialog_actions.py."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QMessageBox

from engine.errors import UsageError
from studio.gui.output_view import kind_of
from studio.gui.util import dropped_files, guard


class RecipeActions:
    @guard
    def on_load_requested(self, recipe: dict) -> None:
        """History's "Load recipe": a recipe that cannot load says why in the window (it escaped to stderr)."""
        self.load_recipe(recipe)

    def load_recipe(self, recipe: dict) -> None:
        """Put a recipe's generator, prompt, seed, options and model back into the form."""
        from engine.recipe import recipe_problem

        problem = recipe_problem(recipe)
        if problem:  # checked before anything in the form changes
            raise UsageError(problem)
        gid = recipe.get("generator")
        if gid == "finetune":  # a fine-tune's recipe fills the fine-tune page
            self.open_finetune()
            self.finetune_page.load_recipe(recipe)
            return
        if recipe.get("source") == "a1111" or not gid:
            gid = self.session.find_generator("image", "text") if recipe.get("source") == "a1111" else gid
        if not gid or gid not in self.session.host.generators:
            raise UsageError(f"This recipe needs generator {recipe.get('generator') or 'image'!r}, "
                             "which is not installed.")
        self.select_generator(gid)
        info = self.panel.info
        skipped = self.panel.apply_recipe(recipe)
        if "messages" in info.takes and recipe.get("messages"):
            self.chat.show_recipe(recipe)
            self.tabs.setCurrentWidget(self.chat)
        note = f"Loaded the recipe into {info.title}"
        if skipped:
            note += f"; skipped: {', '.join(map(str, skipped))}"
        self.statusBar().showMessage(note + ".", 8000)

    @guard
    def open_entry(self, entry) -> None:
        recipe = dict(entry.recipe)
        if entry.generator == "finetune":  # a fine-tune's row: its adapter, selected in its generator
            adapter = next((o["path"] for o in entry.outputs if Path(o["path"]).exists()), None)
            if adapter is None or recipe.get("kind") not in self.session.host.generators:
                gone = entry.outputs[0]["path"] if entry.outputs else "?"
                raise UsageError(f"The adapter of this fine-tune ({gone}) is gone, or its generator is not "
                                 "installed; the recipe is still in the history.")
            self.use_finetuned_adapter(recipe["kind"], (recipe.get("model") or {}).get("name", ""), adapter)
            return
        if recipe.get("messages") and entry.generator in self.session.host.generators:
            self.load_recipe(recipe)  # a conversation reopens in the chat view, ready to continue
            return
        info = self.session.host.generators.get(entry.generator, (None,))[0]
        kind = kind_of(info.info) if info else ("image" if recipe.get("width") else "text")
        if not info and any(str(o.get("path", "")).endswith((".wav", ".flac")) for o in entry.outputs):
            kind = "audio"
        self.output.begin(kind, (recipe.get("image") or {}).get("path", ""))
        self.output.show_result(recipe, [o["path"] for o in entry.outputs if Path(o["path"]).exists()])
        missing = [o["path"] for o in entry.outputs if not Path(o["path"]).exists()]
        if missing:
            self.show_info(f"Output file {Path(missing[0]).name} is gone; the recipe is still in the history.")
        self.tabs.setCurrentWidget(self.output)

    # ----- drag and drop ---------------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        self.handle_drop(event.mimeData())
        event.acceptProposedAction()

    @guard
    def handle_drop(self, mime) -> None:
        """A dropped image: offer to load its recipe (studio or A1111 PNG), else use it as the input image."""
        path = Path(dropped_files(mime, "Drop an image file (PNG, JPEG, ...) onto the window.")[0])
        if not path.is_file():
            raise UsageError(f"{path.name} is not a file.")
        recipe = {}
        if path.suffix.lower() == ".png":
            from engine.outputs import read_png_recipe

            recipe = read_png_recipe(path)  # UsageError when unreadable
        from studio.gui.image_input import read_image

        read_image(path)  # raises a clear UsageError for unreadable or non-image files
        if recipe and self.ask_load_recipe(path, recipe):
            self.load_recipe(recipe)
            return
        info = self.panel.info
        if info is not None and "image" in info.takes:
            self.panel.image_input.set_path(str(path))
            return
        gid = self.session.find_generator("text", "image")
        if gid is not None and not recipe:
            self.select_generator(gid)
            self.panel.image_input.set_path(str(path))
            self.statusBar().showMessage(f"{path.name} is the input of {self.panel.info.title}.", 6000)
        elif not recipe:
            self.show_info(f"{path.name} carries no studio or A1111 recipe, and no generator takes an image.")

    def ask_load_recipe(self, path: Path, recipe: dict) -> bool:
        prompt = (recipe.get("prompt") or "")[:120]
        text = (f"{path.name} carries a recipe"
                + (f" from {recipe['generator']}" if recipe.get("generator") else " (A1111 parameters)")
                + f":\n\nprompt: {prompt}\nseed: {recipe.get('seed')}\n\nLoad its prompt, seed and options?")
        answer = QMessageBox.question(self, "Load recipe?", text,
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes
