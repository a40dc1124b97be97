"""Llama parity with transformers: logits and 32 greedy tokens with the KV cache (GQA, tied and untied)."""
import torch
import transformers

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
    for kw in ({}, {"tie_word_embeddings": True}, {"num_key_value_heads": 4, "attention_bias": True}):
        ref, ours = _pair(**kw)
        ids = torch.randint(0, 101, (2, 13))
        with torch.no_grad():
            a = ref(ids).logits
            b, _ = ours(ids, use_cache=False)
        assert (a - b).abs().max() < 1e-4, kw


def test_cache_matches_full_forward():
    _, ours = _pair()
    ids = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        full, _ = ours(ids, use_cache=False)
        l1, past = ours(ids[:, :6])
        l2, past = ours(ids[:, 6:10], past=past)
        rest = [ours(ids[:, t:t + 1], past=past)[0] for t in range(10, 20)]
    assert (torch.cat([l1, l2] + rest, 1) - full).abs().max() < 1e-4


def test_greedy_32_tokens_match_transformers_generate():
    ref, ours = _pair()
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)[0, 6:]
        past, x, got = None, ids, []
        for _ in range(32):
            logits, past = ours.step(x, past)
            x = logits.argmax(-1, keepdim=True)
            got.append(int(x))
    assert got == want.tolist()
