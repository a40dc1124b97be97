"""A recipe made on a GPU replays on a machine without one only when asked, and says the output may differ."""
import pytest

from engine.errors import UsageError


def test_a_cuda_recipe_on_a_machine_without_cuda(monkeypatch):
    import torch

    from engine.history import History
    from engine.plugins import PluginHost
    from engine.replay import replay
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    host = PluginHost(builtins=("plugins.text",)).load()
    store = ModelStore(host)
    job = Job("text", prompt="ROMEO:", device="cpu", seed=4, options={"max_new_tokens": 8})
    recipe = dict(execute(prepare(host, store, job), history=History()).recipe, device="cuda")  # as if made on a GPU
    with pytest.raises(UsageError, match="made on cuda, but PyTorch sees no CUDA GPU here; replay it with --device cpu"):
        replay(host, store, recipe, history=History())
    record, same, notes = replay(host, store, recipe, device="cpu", history=History())
    assert same  # it really was made on the CPU
    assert notes == ["the recipe was made on cuda and is replayed on cpu; arithmetic differs between devices "
                     "(float16 on a GPU), so the output may differ"]
