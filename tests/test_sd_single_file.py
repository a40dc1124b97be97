"""Single-file Stable Diffusion checkpoints (issue #14 item 3): tiny random diffusers pipelines written out with
the original LDM key names (checked by diffusers' own LDM -> diffusers converter, so the fixture is what A1111 and
civitai files hold), converted by the studio back to the layout: every weight identical to the diffusers
pipeline's, the networks built from the derived configs computing what diffusers' do; SD 1.x, SD 2.x (OpenCLIP)
and inpainting; v-prediction detected as A1111 does; refusals in one line; the AutoV2 hash through the store."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

from engine.errors import ModelError  # noqa: E402
from plugins.stable_diffusion.clip_vocab import write_vocab  # noqa: E402
from plugins.stable_diffusion.single_file import convert, detect  # noqa: E402

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def tiny_pipeline(variant):
    """Components of a tiny pipeline whose non-weight settings follow the real models' (heads, groups), so the
    configs derived from shapes must build the same networks. variant: sd1, sd2, inpaint."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed({"sd1": 0, "sd2": 1, "inpaint": 2}[variant])
    sd2 = variant == "sd2"
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, max_position_embeddings=77,
                                        hidden_act="gelu" if sd2 else "quick_gelu")).eval()
    unet = diffusers.UNet2DConditionModel(  # three levels and two layers, as SD's four and two
        sample_size=8, in_channels=9 if variant == "inpaint" else 4, out_channels=4, block_out_channels=(32, 32, 64),
        layers_per_block=2, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 1, 1) if sd2 else 8, use_linear_projection=sd2, upcast_attention=sd2).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4,
                                  layers_per_block=1).eval()
    with torch.no_grad():
        for module in (unet, vae, text):
            for name, p in module.named_parameters():
                p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.05))
    return unet, vae, text


def _renamed(rest, table):
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def to_ldm(unet, vae, text, sd2):
    """The LDM state dict of the components (the inverse of the conversion, written here from the LDM names)."""
    out = {}
    heads = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    n, per = len(unet.config.block_out_channels), unet.config.layers_per_block + 1  # LDM counts the downsampler
    for b in range(n):
        for j in range(per):
            heads[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{1 + b * per + j}.0"
            heads[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{1 + b * per + j}.1"
            heads[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{b * per + j}.0"
            heads[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{b * per + j}.1"
        heads[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * per}.0.op"
        attn = unet.config.up_block_types[b].startswith("CrossAttn")
        heads[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{(b + 1) * per - 1}.{2 if attn else 1}.conv"
    for key, value in unet.state_dict().items():
        head = max((h for h in heads if key.startswith(h + ".")), key=len)
        rest = key[len(head) + 1:]
        out["model.diffusion_model." + heads[head] + "." + (_renamed(rest, RESNET) if ".resnets." in key else rest)] = value
    n = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("downsamplers.0.conv", "downsample.conv").replace("upsamplers.0.conv", "upsample.conv")
        if "mid_block.attentions.0." in k:
            head, rest = k.split("mid_block.attentions.0.")
            k = head + "mid.attn_1." + _renamed(rest, VAE_ATTN)
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM keeps 1x1 convolutions
        k = k.replace(".resnets.", ".block.").replace("encoder.down_blocks.", "encoder.down.")
        if k.startswith("decoder.up_blocks."):
            i, rest = k[len("decoder.up_blocks."):].split(".", 1)
            k = f"decoder.up.{n - 1 - int(i)}.{rest}"
        out["first_stage_model." + k] = value
    sd = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    if not sd2:
        out.update({"cond_stage_model.transformer.text_model." + k: v for k, v in sd.items()})
        return out
    p = "cond_stage_model.model."
    out[p + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"], out[p + "ln_final.bias"] = sd["final_layer_norm.weight"], sd["final_layer_norm.bias"]
    layers = text.config.num_hidden_layers
    for i in range(layers + 1):  # OpenCLIP has one more layer, which SD 2 does not use
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = sd[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = sd[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = sd[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
        if i == layers:
            for k in [k for k in out if k.startswith(dst)]:
                out[k] = torch.randn_like(out[k])
    out[p + "text_projection"] = torch.randn(64, 64)
    out[p + "logit_scale"] = torch.tensor(4.6)
    return out


def test_fixture_is_what_diffusers_reads():
    """diffusers' own LDM converter turns the fixture back into the pipeline's weights (so the fixture has the
    original key names, independent of the studio's mapping)."""
    for variant in ("sd1", "sd2"):
        unet, vae, text = tiny_pipeline(variant)
        ldm = to_ldm(unet, vae, text, variant == "sd2")
        for module, back in ((unet, sfu.convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
                             (vae, sfu.convert_ldm_vae_checkpoint(ldm, dict(vae.config)))):
            own = module.state_dict()
            assert set(back) == set(own)
            assert all(torch.equal(back[k], own[k]) for k in own)
        if variant == "sd1":
            back = sfu.convert_ldm_clip_checkpoint(ldm)
        else:
            back = sfu.convert_open_clip_checkpoint(text, ldm)
        own = text.state_dict()
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
        assert all(torch.equal(back[k.removeprefix("text_model.")], v) for k, v in own.items())


def _write(ldm, path):
    from safetensors.torch import save_file

    ldm = dict(ldm, **{"model_ema.decay": torch.tensor(0.999), "alphas_cumprod": torch.rand(1000),
                       "first_stage_model.loss.logvar": torch.zeros(())})  # what real files also carry
    save_file({k: v.clone().contiguous() for k, v in ldm.items()}, str(path))
    return path


def _converted(tmp_path, variant, **kw):
    unet, vae, text = tiny_pipeline(variant)
    path = _write(to_ldm(unet, vae, text, variant == "sd2"), tmp_path / f"{variant}.safetensors")
    dest = tmp_path / f"{variant}-out"
    dest.mkdir()
    assert detect(path)
    convert(path, dest, **kw)
    return (unet, vae, text), dest


@pytest.mark.parametrize("variant", ["sd1", "sd2", "inpaint"])
def test_weights_identical_and_networks_agree(tmp_path, variant):
    from safetensors.torch import load_file

    from engine.nn.clip_text import strip_prefix
    from plugins.stable_diffusion.layout import split
    from plugins.stable_diffusion.model import build, check_folder

    (unet, vae, text), dest = _converted(tmp_path, variant)
    parts = split(load_file(str(dest / "model.safetensors")))
    parts["text_encoder"] = strip_prefix(parts["text_encoder"])
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        own = strip_prefix(module.state_dict()) if name == "text_encoder" else module.state_dict()
        assert set(parts[name]) == set(own), name
        assert all(torch.equal(parts[name][k], v) for k, v in own.items()), name
    check_folder(dest)  # config, names, shapes and the shipped tokenizer
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["variant"] == {"sd1": "sd1", "sd2": "sd2", "inpaint": "sd1-inpainting"}[variant]
    assert cfg["prediction_type"] == "epsilon" or variant == "sd2"
    assert cfg["tokenizer"]["pad_token"] == ("!" if variant == "sd2" else "<|endoftext|>")
    ours = build(cfg)
    for name, module in ours.items():
        module.load_state_dict(parts[name])
        module.eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 49408, (1, 77))
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    ctx = torch.randn(1, 77, 64)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert (ours["text_encoder"](ids)[0] - text(ids).last_hidden_state).abs().max() < 1e-4
        assert (ours["unet"](x, 500, ctx) - unet(x, 500, ctx).sample).abs().max() < 1e-4
        assert (ours["vae"].decode(z) - vae.decode(z).sample).abs().max() < 1e-4


def test_v_prediction_as_a1111_decides(tmp_path):
    """SD 2.x: v-prediction when the U-Net's output at t=999 lies far below a constant input (A1111's test); a
    <name>.yaml with parameterization "v" beside the file decides instead; SD 1.x is epsilon."""
    unet, vae, text = tiny_pipeline("sd2")
    ldm = to_ldm(unet, vae, text, True)
    for bias, want in ((-3.0, "v_prediction"), (3.0, "epsilon")):
        ldm["model.diffusion_model.out.2.bias"] = torch.full((4,), bias)
        path = _write(ldm, tmp_path / f"b{bias}.safetensors")
        dest = tmp_path / f"b{bias}"
        dest.mkdir()
        convert(path, dest)
        cfg = json.loads((dest / "config.json").read_text())
        assert cfg["prediction_type"] == cfg["scheduler"]["prediction_type"] == want
        assert cfg["variant"] == ("sd2-v" if want == "v_prediction" else "sd2")
    (tmp_path / "b3.0.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    dest = tmp_path / "yaml"
    dest.mkdir()
    convert(tmp_path / "b3.0.safetensors", dest)
    assert json.loads((dest / "config.json").read_text())["prediction_type"] == "v_prediction"


def _refusal(tmp_path, ldm, name="x.safetensors", trust=False):
    path = _write(ldm, tmp_path / name) if isinstance(name, str) else name
    dest = tmp_path / "out"
    dest.mkdir(exist_ok=True)
    with pytest.raises(ModelError) as err:
        convert(path, dest, trust)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_refusals(tmp_path):
    w = torch.zeros(2)
    assert "SDXL" in _refusal(tmp_path, {"conditioner.embedders.0.transformer.x": w, "model.diffusion_model.y": w})
    assert "Stable Diffusion 3" in _refusal(tmp_path, {"model.diffusion_model.joint_blocks.0.x": w})
    unet, vae, text = tiny_pipeline("sd1")
    ldm = to_ldm(unet, vae, text, False)
    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    msg = _refusal(tmp_path, no_vae)
    assert "the VAE" in msg and "first_stage_model.encoder.conv_in.weight" in msg
    no_text = {k: v for k, v in ldm.items() if not k.startswith("cond_stage_model.")}
    assert "text encoder" in _refusal(tmp_path, no_text)
    path = _write(ldm, tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert detect(path)
    assert "truncated" in _refusal(tmp_path, None, path)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm, "global_step": 1}, ckpt)
    assert detect(ckpt) and "pickle" in _refusal(tmp_path, None, ckpt)
    dest = tmp_path / "trusted"
    dest.mkdir()
    convert(ckpt, dest, True)
    assert json.loads((dest / "config.json").read_text())["variant"] == "sd1"
    from safetensors.torch import save_file

    save_file({"lora_unet_down.lora_up.weight": w}, str(tmp_path / "lora.safetensors"))
    assert not detect(tmp_path / "lora.safetensors")


def test_store_import_records_autov2(tmp_path, studio_home, capsys):
    """`studio models import FILE.safetensors` goes through the importer; studio.json holds the AutoV2 hash, which
    `models list` shows and a generated PNG carries as A1111's "Model hash"."""
    import hashlib
    from argparse import Namespace

    from PIL import Image

    from engine.plugins import PluginHost
    from engine.runner import Job, execute, prepare
    from engine.store import ModelStore
    from studio.commands import cmd_models

    unet, vae, text = tiny_pipeline("sd1")
    path = _write(to_ldm(unet, vae, text, False), tmp_path / "tiny-ldm.safetensors")
    store = ModelStore(PluginHost(safe_mode=True, disabled=[]).load())
    entry = store.import_(path)
    assert entry.name == "tiny-ldm" and entry.family == "stable-diffusion"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry.studio["autov2"] == sha[:10] and entry.studio["sha256"] == sha
    assert entry.studio["imported_from"] == str(path.resolve())
    cmd_models(Namespace(action="list", json=False))
    assert sha[:10] in capsys.readouterr().out
    record = execute(prepare(store.host, store, Job("sd", model="tiny-ldm", prompt="a cat", seed=1,
                                                    options={"width": 32, "height": 32, "steps": 2})))
    png = [f for f in record.files if str(f).endswith(".png")][0]
    with Image.open(png) as im:
        assert f"Model hash: {sha[:10]}," in im.text["parameters"]


def test_shipped_vocabulary_matches_transformers(tmp_path):
    """The vocabulary built from the shipped BPE file gives the ids transformers' CLIPTokenizer gives with the same
    files, and CLIP's known ids."""
    from transformers import CLIPTokenizer

    from plugins.stable_diffusion.tokenizer import ClipTokenizer

    write_vocab(tmp_path)
    ref = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = ClipTokenizer(tmp_path)
    assert len(ref) == 49408
    assert ref("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for text in ("a photo of a cat", "A Painting of Mount Fuji, 4k, (masterpiece:1.2) trending on artstation!",
                 "naïve café — 東京 at night\n\nwith  spaces", "don't stop"):
        assert [ours.bos, *ours.tokens(text), ours.eos] == ref(text).input_ids, text
