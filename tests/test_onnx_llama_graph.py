"""The export form of the Llama decoder (plugins/text/llama_graph.py) computes what the model computes."""
import pytest
import torch

from plugins.text.llama_graph import LlamaDecoderGraph, rotate_half_matrix
from plugins.text.llama import LlamaConfig, LlamaForCausalLM, rotate_half


def test_rotate_half_matrix():
    x = torch.randn(3, 2 * 8)
    got = x @ rotate_half_matrix(8, 2)
    want = torch.cat([rotate_half(x[:, :8]), rotate_half(x[:, 8:])], 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 2, False), (4, 4, True), (6, 1, False)])
def test_matches_the_model_prefill_and_cached(heads, kv_heads, tied):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=8 * heads, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    graph = LlamaDecoderGraph(model).eval()
    past = [torch.zeros(2, kv_heads, 0, cfg.head_dim)] * (2 * cfg.num_hidden_layers)
    cache = None
    with torch.no_grad():
        for T in (5, 3, 1, 1):  # prefill, a multi-token cached step, then single tokens
            ids = torch.randint(0, cfg.vocab_size, (2, T))
            want, cache = model(ids, past=cache)
            got, *past = graph(ids, *past)
            assert (got - want).abs().max() < 1e-5
            assert torch.allclose(past[0], cache.k[0][:, :, :cache.length], atol=1e-6)
