"""Llama parity with transformers: logits and 32 greedy tokens with the KV cache (GQA, tied and untied)."""
import torch
import transformers

from decoder_checks import assert_cache_matches, assert_logits_match, greedy
from plugins.text.llama import LlamaConfig, LlamaForCausalLM, load_hf_state_dict

torch.set_num_threads(1)


def _pair(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0)
    cfg.update(kw)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_dict(ref.config.to_dict())).eval()
    load_hf_state_dict(ours, ref.state_dict())
    return ref, ours


def test_config_reads_rope_theta():
    _, ours = _pair()
    assert ours.config.rope_theta == 500.0 and ours.config.num_key_value_heads == 2


def test_logits_match():
    variants = ({}, {"tie_word_embeddings": True}, {"num_key_value_heads": 4, "attention_bias": True})
    assert_logits_match(_pair, variants, 101, (2, 13))


def test_cache_matches_full_forward():
    assert_cache_matches(_pair()[1], 101)


def test_greedy_32_tokens_match_transformers_generate():
    ref, ours = _pair()
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, 6:]
    assert greedy(ours.step, ids) == want.tolist()
