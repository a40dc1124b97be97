"""engine/messages.py: the one message schema of the generation process, the GUI worker and the plugin check."""
import pytest
from PIL import Image

from engine import messages
from engine.errors import CancelledError, GenerationError, ParityError, UsageError
from engine.generators import Partial, Progress


def test_round_trip_and_stray_lines():
    line = messages.encode("progress", step=2, total=5, message="denoising")
    assert line.endswith("\n") and messages.decode(line) == {"type": "progress", "step": 2, "total": 5,
                                                             "message": "denoising"}
    for stray in ("hello from a plugin\n", "[1, 2]\n", '{"no": "type"}\n', ""):
        assert messages.decode(stray) is None


def test_events_become_messages():
    assert messages.event_messages(Progress(1, 3, "x")) == [{"type": "progress", "step": 1, "total": 3,
                                                            "message": "x"}]
    both = messages.event_messages(Partial(text="ab", image=Image.new("RGB", (4, 4), "red")))
    assert [m["type"] for m in both] == ["text", "preview"] and both[1]["png"]


@pytest.mark.parametrize("exc, cls", [(ParityError("off by 0.4", ["logits"]), ParityError),
                                      (UsageError("bad option"), UsageError),
                                      (RuntimeError("boom"), GenerationError),
                                      (CancelledError("stopped"), CancelledError)])
def test_failures_keep_their_engine_type_across_a_process(exc, cls):
    try:
        raise exc
    except Exception as caught:
        msg = messages.decode(messages.encode(**messages.failure(caught)))
    with pytest.raises(cls) as raised:
        messages.raise_failure(msg)
    assert str(exc) in str(raised.value)
    if cls is GenerationError:
        assert "RuntimeError: boom" in str(raised.value) and "Traceback" in raised.value.details
