"""Play/stop for audio files through QtMultimedia, when it can be imported (PySide6-Addons)."""
from __future__ import annotations

from PySide6.QtCore import QUrl


class AudioPlayer:
    """Raises ImportError at construction when QtMultimedia is not installed."""

    def __init__(self, parent=None):
        from PySide6.QtMultimedia import QAudioOutput, QMediaPlayer  # noqa: lazy, optional module

        self.player = QMediaPlayer(parent)
        self.output = QAudioOutput(parent)
        self.player.setAudioOutput(self.output)

    def play(self, path: str) -> None:
        self.player.setSource(QUrl.fromLocalFile(path))
        self.player.play()

    def stop(self) -> None:
        self.player.stop()


def make_player(parent=None):
    """An AudioPlayer, or None with the reason when QtMultimedia is missing."""
    try:
        return AudioPlayer(parent), ""
    except ImportError:
        return None, "Playback needs QtMultimedia (pip install PySide6-Addons); the waveform is shown instead."
    except Exception as exc:  # noqa: BLE001 - no audio device and the like
        return None, f"Playback is unavailable here ({exc})."
