"""An example GenAI Studio plugin: two generators, no model, no torch.

- ``echo`` turns a prompt into text (repeated, optionally shouted), streaming word by word.
- ``tone`` turns a prompt into a short melody (audio), one note per letter.
"""
import math

from engine import hookimpl
from engine.generators import Generator, GeneratorInfo, Option, Partial, Progress, Result

__version__ = "0.1.0"

ECHO = GeneratorInfo(
    id="echo", title="Echo", description="Repeats the prompt, word by word (example plugin).",
    takes=("text",), makes="text",
    options=(Option("times", "int", 2, "How many times to repeat the prompt", min=1, max=10),
             Option("shout", "bool", False, "Upper-case the result")),
)

TONE = GeneratorInfo(
    id="tone", title="Tone", description="Plays the letters of the prompt as a melody (example plugin).",
    takes=("text",), makes="audio",
    options=(Option("note_seconds", "float", 0.15, "Length of one note", min=0.02, max=2.0),
             Option("sample_rate", "int", 22050, "Samples per second", choices=(16000, 22050, 44100))),
)


def echo(request, context):
    words = (request.prompt or "").split()
    total = len(words) * request.options["times"]
    out = []
    for i in range(total):
        context.cancel.raise_if_cancelled()
        word = words[i % len(words)]
        word = word.upper() if request.options["shout"] else word
        piece = word if i == 0 else " " + word
        out.append(piece)
        yield Progress(i + 1, total)
        yield Partial(text=piece)
    yield Result(text="".join(out), token_ids=[])


def tone(request, context):
    import numpy as np

    rate, length = request.options["sample_rate"], request.options["note_seconds"]
    letters = [c for c in (request.prompt or "").lower() if c.isalpha()] or ["a"]
    t = np.arange(int(rate * length)) / rate
    fade = np.minimum(1.0, np.minimum(t, length - t) * 50)
    notes = []
    for i, c in enumerate(letters):
        context.cancel.raise_if_cancelled()
        freq = 220.0 * 2 ** ((ord(c) - ord("a")) / 12)
        notes.append(0.3 * np.sin(2 * math.pi * freq * t) * fade)
        yield Progress(i + 1, len(letters))
    yield Result(audio=(np.concatenate(notes).astype("float32"), rate))


@hookimpl
def register_generators(register):
    register(Generator(ECHO, echo))
    register(Generator(TONE, tone))
