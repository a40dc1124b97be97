"""`studio serve` with a state folder of its own per test: Stable Diffusion through both APIs, the token, the
listening address, EXIF orientation, and the A1111 checkpoint kept across restarts."""
import base64
import io
import socket

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from server_helpers import Server  # noqa: E402


def test_stable_diffusion_through_the_apis(tmp_path, monkeypatch):
    """webuiapi's img2img with a mask_image inpaints (the mask was ignored: the whole picture was redrawn); the
    mask is kept as the generator took it (inverted on request, blurred by mask_blur), so the recipe replays."""
    pytest.importorskip("diffusers")
    import numpy as np
    import webuiapi
    from PIL import Image

    from engine.history import History
    from engine.plugins import PluginHost
    from engine.store import ModelStore
    from sd_fixtures import save_pipeline

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    save_pipeline(tmp_path / "tiny-sd", "sd1")
    ModelStore(PluginHost(safe_mode=True, disabled=[]).load()).import_(tmp_path / "tiny-sd")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    with Server() as s:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, sampler="Euler a", steps=2)
        kept = {}
        for invert in (0, 1):
            r = api.img2img(images=[image], mask_image=Image.fromarray(mask), inpainting_mask_invert=invert,
                            mask_blur=2, prompt="a cat", seed=3, width=32, height=32, denoising_strength=0.9,
                            override_settings={"sd_model_checkpoint": "tiny-sd"})
            recipe = History().get(r.info["history_ids"][0]).recipe
            assert recipe["info"]["mode"] == "inpaint" and recipe["options"]["keep_unmasked"]  # A1111 overlays
            with Image.open(recipe["mask"]["path"]) as m:
                kept[invert] = np.asarray(m.convert("L"), dtype=int)
            assert 0 < (kept[invert] % 255).sum()  # blurred: grey levels at the edge
        assert kept[0][16, 12] == 255 and kept[0][2, 30] == 0 and kept[1][16, 12] == 0 and kept[1][2, 30] == 255
        r = httpx.post(s.url + "/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["AAAA"],
                                                          "mask": "AAAA", "inpainting_mask_invert": 2})
        assert r.status_code == 400 and "inpainting_mask_invert" in r.json()["detail"]
        import openai  # OpenAI's size sets a Stable Diffusion model's width and height

        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        out = client.images.generate(model="tiny-sd", prompt="a cat", size="48x32", response_format="b64_json",
                                     extra_body={"seed": 1})
        with Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))) as im:
            assert im.size == (48, 32)
        with pytest.raises(openai.BadRequestError, match="WIDTHxHEIGHT"):
            client.images.generate(model="tiny-sd", prompt="a cat", size="large")


def test_token_required_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    with Server(token="s3cret") as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
        import openai

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong").models.list()
        assert openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret").models.list().data


def test_refuses_other_interface_without_token(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    monkeypatch.delenv("STUDIO_API_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "7999"]) == 2
    assert "needs a bearer token" in capsys.readouterr().err


def test_a_port_in_use_or_a_strange_host_is_one_sentence(tmp_path, monkeypatch, capsys):
    """`studio serve` said it was listening, then uvicorn printed an error and the exit status was 3."""
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr()
    assert f"Port {port} on 127.0.0.1 is already in use" in err.err and "listening" not in err.out
    assert main(["serve", "--host", "no-such-host.invalid", "--token", "t"]) == 2
    assert "is not a name or address this machine knows" in capsys.readouterr().err


def test_api_images_are_kept_turned_by_their_exif_orientation(tmp_path, monkeypatch):
    """A base64 photo is kept as PNG (which holds no EXIF): it is turned first, as the studio reads photos, or the
    generator would get it sideways."""
    from PIL import Image

    from studio.api_a1111 import save_input

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 6)).save(buf, format="JPEG", exif=exif)
    with Image.open(save_input("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())) as kept:
        assert kept.size == (6, 8)


def test_a1111_checkpoint_choice_survives_a_restart(tmp_path, monkeypatch, caplog):
    """POST /sdapi/v1/options chose the checkpoint for this server's life only; A1111 keeps it in its config."""
    import webuiapi

    from engine.plugins import PluginHost
    from engine.state import BUILTIN_MODELS
    from engine.store import ModelStore

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path))
    store = ModelStore(PluginHost().load())
    store.import_(BUILTIN_MODELS / "shapes-diffusion", name="shapes-two")
    with Server() as s:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port)
        assert api.get_options()["sd_model_checkpoint"] == "shapes-diffusion"  # the default
        api.util_set_model(next(m for m in api.util_get_model_names() if m.startswith("shapes-two")))
    with Server() as s:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, steps=2)
        assert api.get_options()["sd_model_checkpoint"] == "shapes-two"
        made = api.txt2img(prompt="a red circle", seed=1)
        from engine.history import History

        assert History().get(made.info["history_ids"][0]).recipe["model"]["name"] == "shapes-two"
        store.remove("shapes-two")  # removed while the server runs: the default, as after a restart (every
        assert api.get_options()["sd_model_checkpoint"] == "shapes-diffusion"  # txt2img was a 404)
        assert api.txt2img(prompt="a red circle", seed=1).image is not None
        for bad in (None, 5, ""):
            r = httpx.post(s.url + "/sdapi/v1/options", json={"sd_model_checkpoint": bad})
            assert r.status_code == 400 and "must be a model's name" in r.text, r.text
    with caplog.at_level("WARNING"), Server() as s:  # a checkpoint that is gone: the default, and a warning
        assert httpx.get(s.url + "/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-diffusion"
    assert "The A1111 API's checkpoint 'shapes-two' (sd_model_checkpoint in the settings) is no longer an image " \
        "model here; txt2img uses the default image model" in caplog.text
