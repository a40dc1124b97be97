"""Source text of small test plugins, written into the drop-in folder by tests."""


def generator_plugin(body: str) -> str:
    """A plugin's source: the usual imports, ``body`` (which defines INFO and generate), and the hook that
    registers them."""
    return ("from engine import hookimpl\n"
            "from engine.generators import Generator, GeneratorInfo, Option, Progress, Partial, Result\n"
            + body + "\n@hookimpl\ndef register_generators(register):\n    register(Generator(INFO, generate))\n")


GOOD = generator_plugin('''

INFO = GeneratorInfo(id="upper", title="Upper", description="Upper-cases the prompt.", takes=("text",),
                     makes="text", options=(Option("repeat", "int", 1, "Repeat count", min=1, max=5),))

def generate(request, context):
    text = " ".join([request.prompt.upper()] * request.options["repeat"])
    for i, ch in enumerate(text):
        yield Progress(i + 1, len(text))
        yield Partial(text=ch)
    yield Result(text=text, token_ids=[ord(c) for c in text])

''')

BROKEN_IMPORT = '''
import this_module_does_not_exist
'''

RAISING_HOOK = '''
from engine import hookimpl

@hookimpl
def register_generators(register):
    raise RuntimeError("boom in hook")
'''

INVALID = '''
from engine import hookimpl

@hookimpl
def register_generators(register):
    register({"id": "not-a-generator"})
'''

RAISING_GENERATE = generator_plugin('''

INFO = GeneratorInfo(id="crash", title="Crash", description="Raises while generating.", takes=("text",), makes="text")

def generate(request, context):
    yield Progress(1, 2)
    raise ValueError("model exploded")

''')

PIXELS = generator_plugin('''

INFO = GeneratorInfo(id="pixels", title="Pixels", description="A seeded noise image.", takes=("text",), makes="image",
                     options=(Option("size", "int", 8, "Side in pixels", min=2, max=64),))

def generate(request, context):
    import random
    from PIL import Image
    rng = random.Random(request.seed)
    n = request.options["size"]
    im = Image.new("RGB", (n, n))
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(n * n)])
    yield Progress(1, 1)
    yield Result(image=im)

''')


def drop(home, name, source):
    folder = home / "plugins"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(source)
    return path


SLOW = generator_plugin('''
import time

INFO = GeneratorInfo(id="slow", title="Slow", description="Sleeps between steps.", takes=("text",), makes="text",
                     options=(Option("steps", "int", 200, "Steps", min=1, max=10000),
                              Option("delay", "float", 0.02, "Seconds per step", min=0.0, max=1.0)))

def generate(request, context):
    n = request.options["steps"]
    for i in range(n):
        context.cancel.raise_if_cancelled()
        time.sleep(request.options["delay"])
        yield Progress(i + 1, n)
        yield Partial(text=".")
    yield Result(text="." * n)
''')
