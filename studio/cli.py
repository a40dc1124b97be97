"""The `studio` command line. With no arguments it opens the GUI.

Exit status: 0 success, 2 usage error, 1 any other error; one-line message on stderr, traceback only with --debug.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from engine.errors import StudioError, UsageError
from engine.generators import BACKENDS, DEVICES

log = logging.getLogger("studio")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        if "expected one argument" in message:
            message += "; a value that starts with '-' is written as --option=VALUE"
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _TrainParser(_Parser):
    def format_help(self):  # the kinds are whatever the loaded plugins registered
        from studio.commands import trainer_lines

        return super().format_help() + "\ntrainers:\n" + trainer_lines() + "\n"


class _FinetuneParser(_Parser):
    def format_help(self):
        from studio.commands import trainer_lines

        return super().format_help() + "\nfine-tuners:\n" + trainer_lines(finetune=True) + "\n"


class _GenerateParser(_Parser):
    help_for: tuple = ()  # (generator id, model name or None) seen on the line, set by main before parsing

    def format_help(self):  # the generator's options, with the defaults the chosen model's files give
        if not self.help_for:
            return super().format_help()
        from studio.commands import option_lines

        return super().format_help() + "\n" + option_lines(*self.help_for) + "\n"


def _help_for(argv: list) -> tuple:
    """(generator, --model) of a `generate GENERATOR ... --help` line; () otherwise."""
    if "generate" not in argv or not {"-h", "--help"} & set(argv):
        return ()
    rest = argv[argv.index("generate") + 1:]
    gen = next((a for a in rest if not a.startswith("-")), None)
    model = None
    for i, a in enumerate(rest):
        if a == "--model" and i + 1 < len(rest):
            model = rest[i + 1]
        elif a.startswith("--model="):
            model = a.split("=", 1)[1]
    return (gen, model) if gen else ()


# Help lines of the options several subcommands share (generate, chat, queue add, batch)
PROMPT_HELP = "the text to start from: what the text generator continues, what the image is of"
MODEL_HELP = ("a model's name (`studio models list`) or a model folder's path (default: the generator's own "
              "default model)")
SEED_HELP = ("random seed, a whole number from 0 to 2^63-1: the same seed gives the same output (default: a new one "
             "each time, recorded in the history; several inputs get N, N+1, ...)")
SET_HELP = ("set an option of the generator, e.g. max_new_tokens=50 or steps=20 (repeatable; `studio generate "
            "GENERATOR --help` lists them)")


def package_version() -> str:
    """The installed distribution's version (package metadata); the source's own when it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("genai-studio")
    except importlib.metadata.PackageNotFoundError:
        import engine

        return engine.__version__


class _Version(argparse.Action):
    """``--version``: the version is looked up only when asked for."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print the studio's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"studio {package_version()}")
        parser.exit()


QUANTIZE = ("int8", "int4")  # engine.onnx_export.QUANTIZE (which also has None), without importing the exporter


LORA_HELP = "apply a LoRA (a .safetensors file or a PEFT folder), weight 1 unless given (repeatable)"


def add_backend_flags(p) -> None:
    """``--backend`` and ``--device`` with the choices a job takes (engine.generators), the settings' when left out."""
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="auto (the default): ONNX on the CPU when the model has an export that passed its gate, "
                        "torch on a GPU or otherwise; torch or onnx force one")
    p.add_argument("--device", choices=DEVICES, default=None, help="auto (the default): cuda when there is one")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="studio", description="GenAI Studio: an offline studio for generative AI.")
    p.add_argument("--safe-mode", action="store_true", help="load only the built-in plugins")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    g = sub.add_parser("gui", help="open the desktop studio")
    g.add_argument("--screenshot", metavar="PNG", help="render the window to PNG and exit")
    g.add_argument("--generator", metavar="ID", help="the generator to show first")

    g = sub.add_parser("generators", help="list the installed generators")
    g.add_argument("--json", action="store_true")

    g = sub.add_parser("generate", help="generate content (`studio generate GENERATOR --help [--model NAME]`: its "
                                         "options and their defaults for that model)")
    g.__class__ = _GenerateParser
    g.add_argument("generator", help="the generator's id (`studio generators` lists them): text, image, caption, ...")
    g.add_argument("--prompt", metavar="TEXT", help=PROMPT_HELP)
    g.add_argument("--prompt-file", metavar="FILE", help="one generation per non-empty line")
    g.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="run N inputs at once (generators that batch, such as text and caption; default 1)")
    g.add_argument("--image", action="append", default=[], metavar="PATH", help="input image (repeatable)")
    g.add_argument("--mask", metavar="PATH", help="inpainting mask for --image (white = repaint, black = keep)")
    g.add_argument("--model", metavar="NAME|PATH", help=MODEL_HELP)
    add_backend_flags(g)
    g.add_argument("--seed", type=int, metavar="N", help=SEED_HELP)
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (a .safetensors file or a PEFT folder), weight 1 unless given (repeatable)")
    g.add_argument("--messages", metavar="FILE.json", help="a conversation for `chat`: a JSON list of "
                   "{\"role\", \"content\"} (or an object with a \"messages\" list)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets", help=SET_HELP)
    g.add_argument("--out", metavar="PATH", help="output file, or a folder (ending in /, made when missing; always a "
                   "folder for batch input)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    g.add_argument("--json", action="store_true", help="print one JSON object per generation")

    g.add_argument("--prompt-from-caption", metavar="IMAGE",
                   help="caption IMAGE (with --caption-model or the default captioner) and use it as the prompt")
    g.add_argument("--caption-model", metavar="NAME", help="the captioner for --prompt-from-caption")

    c = sub.add_parser("caption-folder", help="write a caption file beside every image of a folder "
                                              "(kohya / AUTOMATIC1111 training convention)")
    c.add_argument("folder")
    c.add_argument("--model", metavar="NAME|PATH", help="the captioner (default: the caption generator's default)")
    c.add_argument("--prefix", default="", metavar="TEXT", help="text every caption starts with (BLIP: 'a picture of')")
    c.add_argument("--ext", default=".txt", help="caption file extension (default .txt)")
    keep = c.add_mutually_exclusive_group()
    keep.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    keep.add_argument("--skip-existing", action="store_true",
                      help="keep existing caption files (the default; a stopped run resumes this way)")
    c.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    c.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    add_backend_flags(c)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="caption options, e.g. num_beams=3 or max_new_tokens=30")
    c.add_argument("--json", action="store_true", help="print one JSON object per image")

    g = sub.add_parser("chat", help="talk with a language model, in turns (/reset, /save FILE, /quit)")
    g.add_argument("--model", metavar="NAME|PATH", help=MODEL_HELP)
    g.add_argument("--system", metavar="TEXT", help="a system prompt")
    add_backend_flags(g)
    g.add_argument("--seed", type=int, metavar="N", help=SEED_HELP)
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help=LORA_HELP)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets", help=SET_HELP)

    m = sub.add_parser("models", help="list, inspect, import and remove models")
    msub = m.add_subparsers(dest="action", required=True, parser_class=_Parser)
    x = msub.add_parser("list", help="the installed models: built-in and imported, with family, size, hash and "
                                     "ONNX exports")
    x.add_argument("--json", action="store_true", help="print them as a JSON list")
    x = msub.add_parser("info", help="one model in full: its folder, hash, scores and exports")
    x.add_argument("name", help="the model's name (`studio models list`)")
    x.add_argument("--json", action="store_true", help="print it as a JSON object")
    x = msub.add_parser("import", help="copy a model into the store: a Hugging Face-layout folder, a diffusers "
                                       "folder, a GGUF or a single-file checkpoint")
    x.add_argument("path", help="the model folder or file")
    x.add_argument("--name", help="the name to give it (default: the folder's or file's name)")
    x.add_argument("--trust", action="store_true", help="allow pickle weights (loaded with weights_only=True)")
    x = msub.add_parser("remove", help="delete an imported model from the store (built-in models cannot be removed)")
    x.add_argument("name", help="the model's name (`studio models list`)")
    x = msub.add_parser("merge-lora", help="fold LoRA adapters into a copy of a model, imported as a new model")
    x.add_argument("model", help="the base model")
    x.add_argument("lora", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files or PEFT folders")
    x.add_argument("--name", required=True, help="the new model's name")

    e = sub.add_parser("export-onnx", help="export a model to ONNX, checked against PyTorch")
    e.add_argument("model")
    e.add_argument("--out", metavar="DIR")
    e.add_argument("--quantize", choices=QUANTIZE)
    e.add_argument("--force", action="store_true", help="keep an export that fails the parity gate")
    e.add_argument("--json", action="store_true")

    pl = sub.add_parser("plugins", help="list, install, remove, enable and disable plugins")
    psub = pl.add_subparsers(dest="action", required=True, parser_class=_Parser)
    x = psub.add_parser("list")
    x.add_argument("--json", action="store_true")
    x = psub.add_parser("install")
    x.add_argument("source", help="a folder with a pyproject.toml, a wheel, or a package name")
    x = psub.add_parser("uninstall")
    x.add_argument("name")
    for verb in ("enable", "disable"):
        x = psub.add_parser(verb)
        x.add_argument("name")

    h = sub.add_parser("history", help="list, show and replay past generations")
    hsub = h.add_subparsers(dest="action", required=True, parser_class=_Parser)
    x = hsub.add_parser("list")
    x.add_argument("--json", action="store_true")
    x.add_argument("--search", default="", help="words that must all occur in the prompt or the generated text")
    x.add_argument("--generator", default="", help="only this generator's rows (as GET /api/history?generator=)")
    x.add_argument("--limit", type=int, default=20, help="the newest N rows (default 20)")
    x = hsub.add_parser("show")
    x.add_argument("id", type=int)
    x.add_argument("--json", action="store_true")
    x = hsub.add_parser("replay")
    x.add_argument("id", type=int)
    x.add_argument("--out", metavar="PATH")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    x.add_argument("--device", choices=DEVICES, help="replay on this device instead of the recipe's own")
    x.add_argument("--backend", choices=("torch", "onnx"), help="replay with this backend instead of the recipe's "
                   "own (the output may then differ)")

    t = sub.add_parser("train", help="train a model family (the kinds come from plugins; `studio train --help`)")
    t.__class__ = _TrainParser
    t.add_argument("kind", nargs="?", help="what to train (listed below)")
    t.add_argument("args", nargs=argparse.REMAINDER, help="the trainer's own options (`studio train KIND --help`)")

    t = sub.add_parser("finetune", help="fine-tune a model with LoRA (the kinds come from plugins; "
                                        "`studio finetune --help`)")
    t.__class__ = _FinetuneParser
    t.add_argument("kind", nargs="?", help="what to fine-tune (listed below)")
    t.add_argument("args", nargs=argparse.REMAINDER, help="its own options (`studio finetune KIND --help`)")

    from studio.queue_cli import add_parsers

    add_parsers(sub, _Parser)
    s = sub.add_parser("serve", help="a local API server (OpenAI and AUTOMATIC1111 compatible) over the queue")
    s.add_argument("--host", default="127.0.0.1", help="the interface to listen on (anything but loopback needs "
                                                       "--token)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--token", help="require this bearer token (default: $STUDIO_API_TOKEN)")
    s.add_argument("--ray", metavar="ADDRESS", help="run the queue's jobs on a Ray cluster")
    return p


GLOBAL_FLAGS = ("--debug", "--safe-mode")


def _value_options(parser: argparse.ArgumentParser) -> set:
    """Every option string, in any subcommand, that takes a value (``--prompt TEXT``)."""
    found = set()
    for action in parser._actions:  # argparse keeps no public list
        if action.option_strings and action.nargs != 0:
            found.update(action.option_strings)
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(action, argparse._SubParsersAction) \
                else ():
            found |= _value_options(sub)
    return found


def split_global_flags(argv: list, parser: argparse.ArgumentParser) -> tuple:
    """(the global flags given, argv without them). A flag counts anywhere on the line, but not where it is the
    value of an option (``--prompt "--debug"`` is a prompt) nor after a trainer's own arguments begin."""
    takes_value, flags, rest, value_next = _value_options(parser), set(), [], False
    for i, arg in enumerate(argv):
        if value_next:
            rest.append(arg)
            value_next = False
        elif arg in GLOBAL_FLAGS and not any(a in ("train", "finetune") for a in rest[:1]):
            flags.add(arg)
        else:
            rest.append(arg)
            value_next = arg in takes_value
    return flags, rest


def main(argv=None) -> int:
    status = _main(argv)
    if argv is None:  # the program itself (not a caller in the same process): nothing may keep it from ending
        import threading

        stray = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and not t.daemon and t.is_alive()]
        if stray:  # a plugin's thread would keep the process alive after its work was saved
            print(f"studio: warning: {len(stray)} thread(s) a plugin started are still running "
                  f"({', '.join(t.name for t in stray[:3])}); the studio exits without waiting for them.",
                  file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return status


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    flags, argv = split_global_flags(argv, parser)
    debug = "--debug" in flags
    if "--safe-mode" in flags:  # accepted anywhere on the line, like --debug
        os.environ["STUDIO_SAFE_MODE"] = "1"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        _GenerateParser.help_for = _help_for(argv)
        args = parser.parse_args(argv)
        if args.command in (None, "gui"):
            from studio.gui.app import run_gui

            return run_gui(screenshot=getattr(args, "screenshot", None), generator=getattr(args, "generator", None))
        from studio import commands

        status = getattr(commands, "cmd_" + args.command.replace("-", "_"))(args)
        sys.stdout.flush()  # a full disk under `> file` fails here, not in the interpreter's exit
        return status
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped reading (`studio history list | head`): stop quietly, as Unix
        # tools do; what is left to flush goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except StudioError as exc:
        if debug:
            raise
        print(f"studio: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except OSError as exc:  # the system refused (a full disk, no permission): what it said, and on what
        if debug:
            raise
        what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        if exc.errno == errno.ENOSPC:
            what = f"The disk is full ({what}); free some space and try again"
        print(f"studio: error: {what}.", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        if debug:
            raise
        print(f"studio: error: unexpected {type(exc).__name__}: {exc} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
