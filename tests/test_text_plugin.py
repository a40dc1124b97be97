"""The text plugin: registration without torch, recognition of folders, generation through the contract."""
import subprocess
import sys

import torch

from engine.errors import ModelError
from engine.generators import Context, ModelRef, Partial, Request, Result
from engine.plugins import PluginHost
from engine.store import ModelStore
from tests.test_text_folders import save_folder

torch.set_num_threads(1)


def test_plugin_import_does_not_import_torch():
    code = "import sys, plugins.text; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(__import__('pathlib').Path(__file__).parent.parent))
    assert out.returncode == 0, out.stderr


def test_store_recognises_and_generator_runs(tmp_path):
    host = PluginHost(safe_mode=True).load()
    store = ModelStore(host, builtin_dir=tmp_path / "none")
    gen = host.generator("text")
    for family in ("llama", "gpt2"):
        folder = save_folder(tmp_path / family, family)
        assert store.validate(folder).family == family
        opts = gen.info.resolve_options({"max_new_tokens": 12, "temperature": 0.7, "stop": "zzz"})
        ref = ModelRef(name=family, path=folder, family=family, hash="h-" + family)
        ctx = Context()
        runs = []
        for _ in range(2):
            events = list(gen.generate(Request(prompt="To be", options=opts, seed=3, model=ref), ctx))
            runs.append(events[-1])
            assert isinstance(events[-1], Result)
            assert "".join(e.text for e in events if isinstance(e, Partial)) == events[-1].text
        assert runs[0].token_ids == runs[1].token_ids and len(ctx.cache) == 1
        assert runs[0].info["prompt_tokens"] > 0 and runs[0].info["tokens_per_second"] > 0


def test_store_refuses_wrong_shapes(tmp_path):
    import json

    host = PluginHost(safe_mode=True).load()
    store = ModelStore(host, builtin_dir=tmp_path / "none")
    folder = save_folder(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    try:
        store.validate(folder)
    except ModelError as exc:
        assert "shape" in str(exc)
    else:
        raise AssertionError("a folder whose weights do not fit config.json was accepted")


def test_nan_in_a_model_is_an_error_not_an_empty_text(tmp_path):
    """A config with rms_norm_eps NaN imported, and it or NaN weights 'generated' an empty text with exit 0."""
    import json

    import pytest
    from safetensors.torch import load_file, save_file

    host = PluginHost(safe_mode=True).load()
    store = ModelStore(host, builtin_dir=tmp_path / "none")
    folder = save_folder(tmp_path / "m", "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": float("nan")}))
    with pytest.raises(ModelError, match="rms_norm_eps is nan .* must be a finite number"):
        store.validate(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    weights = load_file(str(folder / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if "norm" in k else v for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"))
    gen = host.generator("text")
    opts = gen.info.resolve_options({"max_new_tokens": 3})
    ref = ModelRef(name="m", path=folder, family="llama", hash="h-nan")
    with pytest.raises(ModelError, match="computed NaN scores"):
        list(gen.generate(Request(prompt="To be", options=opts, seed=3, model=ref), Context()))
