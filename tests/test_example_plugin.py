"""The example plugin package: installed with `studio plugins install`, found through its entry point, run."""
import json
import subprocess
import sys

import pytest
import soundfile as sf

from conftest import EXAMPLE_PLUGIN
from test_cli import studio


def test_drop_in_copy_generates_text_and_audio(hello_plugin, tmp_path):
    obj = json.loads(studio("generate", "echo", "--prompt", "to be", "--set", "shout=true", "--json",
                            check=0).stdout)
    assert obj["text"] == "TO BE TO BE"
    wav = tmp_path / "tone.wav"
    studio("generate", "tone", "--prompt", "abc", "--out", str(wav), "--set", "sample_rate=16000", check=0)
    data, rate = sf.read(wav)
    assert rate == 16000 and len(data) == 3 * int(16000 * 0.15)


@pytest.fixture
def installed_example():
    proc = studio("plugins", "install", str(EXAMPLE_PLUGIN))
    assert proc.returncode == 0, proc.stderr
    assert "code that runs with your user rights" in proc.stderr
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "studio-hello"], capture_output=True)


def test_install_from_folder_runs_through_entry_point(installed_example, tmp_path):
    listing = {p["name"]: p for p in json.loads(studio("plugins", "list", "--json", check=0).stdout)}
    assert listing["hello"]["source"] == "entry point"
    assert listing["hello"]["version"] == "0.1.0"
    assert listing["hello"]["status"] == "loaded"
    ids = {g["id"] for g in json.loads(studio("generators", "--json", check=0).stdout)}
    assert {"echo", "tone"} <= ids
    obj = json.loads(studio("generate", "echo", "--prompt", "hi", "--json", check=0).stdout)
    assert obj["text"] == "hi hi"
    studio("plugins", "uninstall", "hello", check=0)
    ids = {g["id"] for g in json.loads(studio("generators", "--json", check=0).stdout)}
    assert "echo" not in ids


def test_install_refuses_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = studio("plugins", "install", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "without a pyproject.toml" in proc.stderr
    (tmp_path / "x.txt").write_text("x")
    proc = studio("plugins", "install", str(tmp_path / "x.txt"))
    assert proc.returncode == 2 and "not a wheel" in proc.stderr


def test_builtin_plugins_cannot_be_uninstalled():
    proc = studio("plugins", "uninstall", "text")
    assert proc.returncode == 2 and "disable it instead" in proc.stderr


def test_constraints_pin_core_packages():
    from engine.install import constraints_text

    text = constraints_text()
    assert "pluggy==" in text and "numpy==" in text


def test_a_linked_drop_in_is_uninstalled_by_removing_the_link(studio_home, tmp_path):
    """A plugin folder linked into the drop-in folder (a developer's checkout) was 'unexpected OSError: Cannot call
    rmtree on a symbolic link'; the link goes and the checkout stays."""
    from engine.install import uninstall
    from engine.plugins import PluginHost
    from plugin_samples import SLOW

    checkout = tmp_path / "checkout" / "slowplug"
    checkout.mkdir(parents=True)
    (checkout / "__init__.py").write_text(SLOW)
    (studio_home / "plugins").mkdir(exist_ok=True)
    (studio_home / "plugins" / "slowplug").symlink_to(checkout, target_is_directory=True)
    host = PluginHost(builtins=()).load()
    assert "slow" in host.generators
    uninstall(host, "slowplug")
    assert not (studio_home / "plugins" / "slowplug").exists() and (checkout / "__init__.py").is_file()
