"""Context.loaded: one rule for keeping a family's loaded model and for refusing LoRA adapters on the onnx
backend, used by every built-in generator."""
from pathlib import Path

import pytest
from PIL import Image

from engine.chat import Message
from engine.errors import UsageError
from engine.generators import AdapterRef, Context, ModelRef, Request
from engine.plugins import PluginHost

MODEL = ModelRef("m", Path("/nonexistent"), "any", "h1")
LORA = AdapterRef("a", Path("/nonexistent/a.safetensors"), "s1", 0.5)


def test_kept_under_all_that_decides_it():
    ctx, made = Context(), []

    def load():
        made.append(1)
        return len(made)

    base = Request(model=MODEL, adapters=(LORA,))
    assert ctx.loaded("k", base, load) == 1 == ctx.loaded("k", Request(model=MODEL, adapters=(LORA,), seed=7), load)
    changes = [Request(model=ModelRef("m", Path("/x"), "any", "h2"), adapters=(LORA,)), Request(model=MODEL),
               Request(model=MODEL, adapters=(AdapterRef("a", LORA.path, "s1", 1.0),)),
               Request(model=MODEL, adapters=(LORA,), device="cuda"),
               Request(model=MODEL, backend="onnx", export=Path("/e1")),
               Request(model=MODEL, backend="onnx", export=Path("/e2"))]
    assert [ctx.loaded("k", r, load) for r in changes] == [2, 3, 4, 5, 6, 7]
    assert ctx.loaded("other", base, load) == 8


@pytest.mark.parametrize("generator,merge", [("text", True), ("caption", True), ("image", False),
                                             ("sd", False)])
def test_every_family_refuses_lora_on_onnx_before_loading(generator, merge, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    gen = PluginHost().generator(generator)
    info = gen.info
    opts = {o.name: o.default for o in info.options}
    request = Request(prompt="a", image=tmp_path / "in.png", options=opts, model=MODEL, backend="onnx",
                      adapters=(LORA,), messages=(Message("user", "hi"),))
    with pytest.raises(UsageError, match="LoRA adapters run on the torch backend") as err:
        list(gen.generate(request, Context()))
    assert ("merge-lora" in str(err.value)) == merge
