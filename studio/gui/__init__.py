"""The desktop studio (PySide6). ``studio.gui.app.run_gui`` opens it; nothing here imports torch at import time."""
