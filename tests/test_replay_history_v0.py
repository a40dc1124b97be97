"""Recipes recorded before the family-package layout (issue #12; made by commit 8e71bf6 with the built-in models:
text, image and caption, each on torch and onnx) replay identically with today's code. The history database of that
run (tests/data/history_v0/history.sqlite3) still opens, lists and replays."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data" / "history_v0"
RECIPES = json.loads((DATA / "recipes.json").read_text())


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A host, store and state folder with ONNX exports of the three built-in models."""

    from engine.onnx_export import export_model
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(home))
        host = PluginHost(safe_mode=True, disabled=[]).load()
        store = ModelStore(host)
        for name in sorted({r["model"]["name"] for r in RECIPES}):
            export_model(host, store.get(name))
        yield host, store, home


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r['generator']}-{r['backend']}-{r['seed']}")
def test_old_recipe_replays_identical(studio, recipe, tmp_path, monkeypatch):
    from engine.history import History
    from engine.replay import replay

    host, store, home = studio
    monkeypatch.setenv("STUDIO_HOME", str(home))
    recipe = json.loads(json.dumps(recipe))
    if recipe.get("image"):
        recipe["image"]["path"] = str(DATA / "scene.png")  # recorded as /tmp/fx/out/scene.png
    record, same, notes = replay(host, store, recipe, history=History(), out_dir=tmp_path)
    assert same, (recipe["generator"], recipe["backend"], notes)
    assert notes == []


def test_old_history_database_lists_and_replays(studio, monkeypatch):
    host, store, home = studio
    shutil.copy(DATA / "history.sqlite3", home / "history.sqlite3")
    env = dict(__import__("os").environ, STUDIO_HOME=str(home), STUDIO_PLUGIN_CHECK="0")
    listed = subprocess.run([sys.executable, "-m", "studio.cli", "history", "list", "--json"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) >= len(RECIPES)
    first = min(e["id"] for e in json.loads(listed.stdout))  # a text recipe on torch
    proc = subprocess.run([sys.executable, "-m", "studio.cli", "history", "replay", str(first)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stdout + proc.stderr


def test_a_recipe_replays_with_the_other_backend_when_asked(studio, tmp_path, monkeypatch):
    from engine.history import History
    from engine.replay import replay

    host, store, home = studio
    monkeypatch.setenv("STUDIO_HOME", str(home))
    for recipe in (r for r in RECIPES if r["generator"] == "text"):
        other = "torch" if recipe["backend"] == "onnx" else "onnx"
        record, same, notes = replay(host, store, json.loads(json.dumps(recipe)), backend=other,
                                     history=History(), out_dir=tmp_path)
        assert record.recipe["backend"] == other
        assert record.recipe.get("onnx_export") if other == "onnx" else not record.recipe.get("onnx_export")
        assert any(f"replayed with {other}" in n for n in notes), notes
