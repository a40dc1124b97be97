"""U-Net and text encoder parity with diffusers / transformers on tiny random configs (key-copy loading)."""
import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet
from transformers import CLIPTextConfig as RefCLIPConfig
from transformers import CLIPTextModel as RefCLIP

from engine.errors import ModelError
from engine.nn.clip_text import CLIPTextConfig, CLIPTextModel, strip_prefix
from engine.nn.unet import UNet2DConditionModel, UNetConfig

torch.set_num_threads(1)

BASE = dict(sample_size=16, in_channels=5, out_channels=3, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1, norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2)
VARIANTS = {
    "plain": {},
    "class_projection": dict(class_embed_type="projection", projection_class_embeddings_input_dim=12),
    "scale_shift": dict(class_embed_type="projection", projection_class_embeddings_input_dim=12,
                        resnet_time_scale_shift="scale_shift"),
    "deeper": dict(block_out_channels=(8, 16, 16), layers_per_block=2, transformer_layers_per_block=2,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
                   attention_head_dim=(2, 4, 2), use_linear_projection=True, flip_sin_to_cos=False, freq_shift=1),
}


def unet_pair(overrides):
    torch.manual_seed(0)
    ref = RefUNet(**{**BASE, **overrides}).eval()
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())  # strict: the names are the same
    return ref, ours


@pytest.mark.parametrize("name", list(VARIANTS))
def test_unet_matches_diffusers(name):
    ref, ours = unet_pair(VARIANTS[name])
    torch.manual_seed(1)
    for hw in ((16, 16), (12, 20)):
        x = torch.randn(2, 5, *hw)
        ctx = torch.randn(2, 7, 12)
        t = torch.tensor([3, 871])
        kw = {"class_labels": torch.randn(2, 12)} if "class_embed_type" in VARIANTS[name] else {}
        with torch.no_grad():
            want = ref(x, t, ctx, **kw).sample
            got = ours(x, t, ctx, kw.get("class_labels"))
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-4
    with torch.no_grad():  # a scalar timestep broadcasts
        assert torch.allclose(ours(x, 5, ctx, kw.get("class_labels")), ref(x, 5, ctx, **kw).sample, atol=1e-4)


@pytest.mark.parametrize("bad", [dict(act_fn="gelu"), dict(resnet_time_scale_shift="ada_group"),
                                 dict(addition_embed_type="text"), dict(down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D")),
                                 dict(class_embed_type="timestep"), dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn")])
def test_unet_rejects_unsupported_config(bad):
    with pytest.raises(ModelError):
        UNetConfig.from_dict({**BASE, **bad})


def test_clip_text_matches_transformers():
    torch.manual_seed(0)
    for eos in (3, 2):
        rc = RefCLIPConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=10, eos_token_id=eos, bos_token_id=1,
                           pad_token_id=0)
        ref = RefCLIP(rc).eval()
        ours = CLIPTextModel(CLIPTextConfig.from_dict(rc.to_dict())).eval()
        ours.load_state_dict(strip_prefix(ref.state_dict()))
        ids = torch.tensor([[1, 5, 6, 7, 3, 0, 0], [1, 8, 3, 0, 0, 0, 0]])
        with torch.no_grad():
            want = ref(ids)
            hidden, pooled = ours(ids)
        assert (hidden - want.last_hidden_state).abs().max().item() < 1e-4
        assert (pooled - want.pooler_output).abs().max().item() < 1e-4


def test_clip_text_accepts_old_prefix_and_rejects_bad_act():
    cfg = CLIPTextConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=6)
    m = CLIPTextModel(cfg)
    old = {"text_model." + k: v for k, v in m.state_dict().items()}
    CLIPTextModel(cfg).load_state_dict(strip_prefix(old))
    with pytest.raises(ModelError):
        CLIPTextConfig.from_dict({"hidden_act": "no-such-activation"})
