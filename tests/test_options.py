import pytest

from engine.errors import OptionError
from engine.generators import GeneratorInfo, Option

INFO = GeneratorInfo(
    id="t", title="T", description="d", takes=("text",), makes="text",
    options=(Option("steps", "int", 20, "steps", min=1, max=100),
             Option("guidance", "float", 3.0, "cfg", min=0, max=20),
             Option("sampler", "str", "ddim", "s", choices=("ddim", "euler")),
             Option("flag", "bool", False, "f")),
)


def test_defaults_and_parsing_from_strings():
    opts = INFO.resolve_options({"steps": "30", "guidance": "2.5", "sampler": "euler", "flag": "yes"})
    assert opts == {"steps": 30, "guidance": 2.5, "sampler": "euler", "flag": True}
    assert INFO.resolve_options({}) == {"steps": 20, "guidance": 3.0, "sampler": "ddim", "flag": False}


@pytest.mark.parametrize("name,value,message", [
    ("steps", "abc", "must be a whole number"),
    ("steps", "0", "at least 1"),
    ("steps", 101, "at most 100"),
    ("steps", 2.5, "must be a whole number"),
    ("guidance", "nan", "must be a number"),
    ("guidance", float("nan"), "finite number, not nan"),
    ("sampler", "plms", "must be one of ddim, euler"),
    ("flag", "maybe", "true or false"),
    ("steps", "9" * 5000, r"not '9{56}\.{4}$"),  # a pasted huge value is cut in the message
    ("guidance", "0_5", "must be a number"),  # Python's float() reads it as 5.0
    ("steps", "1_0", "must be a whole number"),
    ("steps", "\u0663", "must be a whole number"),  # an Arabic-Indic 3, which int() takes
    ("guidance", "\u0661.5", "must be a number"),
    ("guidance", "inf", "must be a number"),
    ("nope", 1, "has no option 'nope'"),
])
def test_bad_values_get_clear_messages(name, value, message):
    with pytest.raises(OptionError, match=message):
        INFO.resolve_options({name: value})


def test_int_is_accepted_for_float():
    assert INFO.resolve_options({"guidance": 4})["guidance"] == 4.0


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError):
        Option("x", "complex", 1)
    with pytest.raises(OptionError):
        Option("x", "int", 0, min=1)
    with pytest.raises(ValueError):
        GeneratorInfo(id="bad id", title="", description="", takes=("text",), makes="text")
    with pytest.raises(ValueError):
        GeneratorInfo(id="x", title="", description="", takes=("smell",), makes="text")


def test_cpu_threads_follow_model_size(monkeypatch):
    import torch

    from engine import runner

    from engine.errors import UsageError

    before = torch.get_num_threads()
    monkeypatch.setattr(runner, "_torch_default_threads", [4])  # as on a 4-core machine
    try:
        monkeypatch.delenv("STUDIO_TORCH_THREADS", raising=False)
        assert runner.set_cpu_threads(5 << 20) == 1 == torch.get_num_threads()  # a small model: one thread
        assert runner.set_cpu_threads(runner.SMALL_MODEL_BYTES) == 4 == torch.get_num_threads()
        monkeypatch.setattr("os.cpu_count", lambda: 8)
        monkeypatch.setenv("STUDIO_TORCH_THREADS", "3")
        assert runner.set_cpu_threads(5 << 20) == 3 == torch.get_num_threads()
        monkeypatch.setenv("STUDIO_TORCH_THREADS", "100000")  # capped at the cores (it crashed torch before)
        assert runner.set_cpu_threads(5 << 20) == 8
        monkeypatch.setenv("STUDIO_TORCH_THREADS", "auto")
        with pytest.raises(UsageError, match="whole number"):
            runner.set_cpu_threads(5 << 20)
    finally:
        torch.set_num_threads(before)


def test_an_infinite_float_is_refused_even_without_a_maximum():
    info = GeneratorInfo(id="u", title="U", description="d", takes=("text",), makes="text",
                         options=(Option("scale", "float", 1.0, "unbounded"),))
    for text in ("1e999", "-1e999"):
        with pytest.raises(OptionError, match="finite number"):
            info.resolve_options({"scale": text})


def test_numbers_as_people_type_them_are_read():
    opts = INFO.resolve_options({"steps": " +7 ", "guidance": "1e1"})
    assert opts["steps"] == 7 and opts["guidance"] == 10.0
    assert INFO.resolve_options({"guidance": ".5"})["guidance"] == 0.5
    assert INFO.resolve_options({"guidance": "2."})["guidance"] == 2.0
