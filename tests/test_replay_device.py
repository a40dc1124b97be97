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


def _text(tmp_path):
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    host = PluginHost(builtins=("plugins.text",)).load()
    return host, ModelStore(host)


def test_a_model_used_in_place_replays_by_its_path_from_any_folder(tmp_path, monkeypatch):
    import shutil

    from engine.history import History
    from engine.replay import replay
    from engine.runner import Job, execute, prepare
    from engine.store import BUILTIN_DIR

    host, store = _text(tmp_path)
    folder = tmp_path / "work" / "mine"
    shutil.copytree(BUILTIN_DIR / "shakespeare-llama", folder)
    monkeypatch.chdir(folder.parent)
    job = Job("text", prompt="ROMEO:", model="./mine", backend="torch", seed=3, options={"max_new_tokens": 6})
    recipe = execute(prepare(host, store, job), history=History()).recipe
    assert recipe["model"]["path"] == str(folder.resolve()) and recipe["model"]["name"] == "mine"
    monkeypatch.chdir(tmp_path)  # "./mine" names nothing here
    record, same, notes = replay(host, store, recipe, history=History())
    assert same and notes == []
    store_recipe = execute(prepare(host, store, Job("text", prompt="A", backend="torch", seed=1,
                                                    options={"max_new_tokens": 2})), history=History()).recipe
    assert "path" not in store_recipe["model"]  # a store model is recorded by its name
    folder.rename(tmp_path / "moved")
    with pytest.raises(UsageError, match=f"model folder {folder.resolve()} that this generation used is no longer"):
        replay(host, store, recipe, history=History())


def test_a_replay_runs_torch_on_the_recorded_thread_count(tmp_path, monkeypatch):
    import torch

    from engine.history import History
    from engine.replay import replay
    from engine.runner import Job, execute, prepare

    host, store = _text(tmp_path)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("STUDIO_TORCH_THREADS", "2")
        job = Job("text", prompt="ROMEO:", backend="torch", seed=3, options={"max_new_tokens": 4})
        recipe = execute(prepare(host, store, job), history=History()).recipe
        assert recipe["threads"] == 2
        monkeypatch.setenv("STUDIO_TORCH_THREADS", "1")
        record, same, _ = replay(host, store, recipe, history=History())
        assert same and record.recipe["threads"] == 2 == torch.get_num_threads()
        edited = replay(host, store, dict(recipe, threads="lots"), history=History())[0]  # a hand-edited recipe
        assert edited.recipe["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_a_replay_says_when_the_files_beside_the_weights_changed(tmp_path):
    import shutil

    from engine.history import History
    from engine.replay import replay
    from engine.runner import Job, execute, prepare
    from engine.store import BUILTIN_DIR

    host, store = _text(tmp_path)
    folder = tmp_path / "mine"
    shutil.copytree(BUILTIN_DIR / "shakespeare-llama", folder)
    job = Job("text", prompt="ROMEO:", model=str(folder), backend="torch", seed=3, options={"max_new_tokens": 4})
    recipe = execute(prepare(host, store, job), history=History()).recipe
    assert recipe["model"]["side_sha256"]  # tokenizer_config.json
    assert replay(host, store, recipe, history=History())[2] == []
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"model_max_length": 5, ', 1))
    notes = replay(host, store, recipe, history=History())[2]
    assert any("files beside model mine's weights" in n for n in notes), notes


@pytest.mark.parametrize("edit, words", [({"model": {"name": 5}}, "model"), ({"loras": ["/tmp/x.safetensors"]},
                                                                             "loras"),
                                         ({"image": {"path": 5}}, "image")])
def test_a_hand_edited_recipe_is_refused_in_a_sentence(edit, words, tmp_path):
    """Fields a replay reads inside the model, image and LoRA entries: wrong types were AttributeError/TypeError."""
    from engine.replay import replay

    host, store = _text(tmp_path)
    recipe = {"generator": "text", "prompt": "x", "seed": 1, "options": {}, **edit}
    with pytest.raises(UsageError, match=f"This recipe's {words} is not what the studio writes"):
        replay(host, store, recipe)


def test_a_recipe_without_a_generator_is_refused_in_a_sentence(tmp_path):
    """An empty recipe ({}) replayed in the window showed "KeyError: 'generator'"."""
    from engine.replay import replay_job

    host, store = _text(tmp_path)
    for recipe in ({}, {"prompt": "x", "source": "a1111"}):
        with pytest.raises(UsageError, match="This recipe names no generator, so it cannot be replayed"):
            replay_job(store, recipe)


def test_a_recipe_naming_its_model_as_text_replays(tmp_path):
    from engine.history import History
    from engine.replay import replay

    host, store = _text(tmp_path)
    recipe = {"generator": "text", "prompt": "ROMEO:", "seed": 1, "options": {"max_new_tokens": 2},
              "model": "shakespeare-llama", "backend": "torch", "device": "cpu"}
    assert replay(host, store, recipe, history=History())[0].recipe["model"]["name"] == "shakespeare-llama"
