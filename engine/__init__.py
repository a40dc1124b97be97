"""GenAI Studio's engine: plugin host, generator contract, model store, history. Never imports Qt."""
import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("studio")
