"""The export form of the Llama decoder (LlamaForCausalLM.fuse_for_export, traced through
engine.backends.decoders.decoder_wrapper) computes what the model computes."""
import copy

import pytest
import torch

from engine.backends.decoders import decoder_wrapper
from plugins.text.llama import LlamaConfig, LlamaForCausalLM, rotate_half, rotate_half_matrix


def test_rotate_half_matrix():
    x = torch.randn(3, 2, 8)
    assert torch.equal(x @ rotate_half_matrix(8), rotate_half(x))


@pytest.mark.parametrize("heads,kv_heads,tied,bias", [(4, 2, False, False), (4, 4, True, False), (6, 1, False, True)])
def test_matches_the_model_prefill_and_cached(heads, kv_heads, tied, bias):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=8 * heads, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32,
                      tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    fused = copy.deepcopy(model).fuse_for_export()
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n, _ in fused.named_parameters())
    graph = decoder_wrapper(fused, cfg.num_hidden_layers)
    past = [torch.zeros(2, kv_heads, 0, cfg.head_dim)] * (2 * cfg.num_hidden_layers)
    cache = None
    with torch.no_grad():
        for T in (5, 3, 1, 1):  # prefill, a multi-token cached step, then single tokens
            ids = torch.randint(0, cfg.vocab_size, (2, T))
            want, cache = model(ids, past=cache)
            got, *past = graph(ids, *past)
            assert (got - want).abs().max() < 1e-5
            assert torch.allclose(past[0], cache.k[0][:, :, :cache.length], atol=1e-6)
