"""Stable Diffusion's VAE (engine/nn/vae.py) against diffusers' AutoencoderKL on a tiny random model saved by
diffusers: encoder mean and log-variance, decoder, and tiled decoding, within 1e-4."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from engine.nn.vae import AutoencoderKL, VAEConfig  # noqa: E402


def _pair(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16, layers_per_block=1,
               sample_size=32, **kw)
    ref = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)  # norms away from 1/0, so a swapped scale shows
    ref.save_pretrained(tmp_path / "vae")
    import json

    from safetensors.torch import load_file

    ours = AutoencoderKL(VAEConfig.from_dict(json.loads((tmp_path / "vae" / "config.json").read_text()))).eval()
    ours.load_state_dict(load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")))
    return ref, ours


@pytest.mark.parametrize("attention", [True, False])
def test_encode_decode_match_diffusers(tmp_path, attention):
    ref, ours = _pair(tmp_path, mid_block_add_attention=attention)
    x = torch.rand(2, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        assert (mean - dist.mean).abs().max() < 1e-4 and (logvar - dist.logvar).abs().max() < 1e-4
        z = torch.randn(2, 4, 6, 10)
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < 1e-4
    assert ours.factor == 2 and ours.config.scaling_factor == ref.config.scaling_factor


def test_tiled_decode_matches_diffusers_tiling(tmp_path):
    ref, ours = _pair(tmp_path)
    ref.enable_tiling()  # tiles of sample_size 32 pixels = 16 latents, a quarter overlapping
    z = torch.randn(1, 4, 40, 36)
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours.decode_tiled(z)
        full = ours.decode(z)
    assert got.shape == want.shape == full.shape == (1, 3, 80, 72)
    assert (got - want).abs().max() < 1e-4
    assert (got - full).abs().mean() < 0.5 * full.abs().mean()  # close to the untiled decode, seams blended


def test_unsupported_vae_refused():
    from engine.errors import ModelError

    with pytest.raises(ModelError, match="block types"):
        VAEConfig.from_dict({"down_block_types": ["AttnDownEncoderBlock2D"]})
