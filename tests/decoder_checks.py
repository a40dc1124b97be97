"""Checks every decoder shares: logits against the reference model, the KV cache against a full forward pass,
greedy decoding through ``step``."""
import torch


def assert_logits_match(pair, variants, vocab: int, shape):
    """``pair(**kw) -> (reference, ours)`` for each config variant: logits within 1e-4 on random ids."""
    for kw in variants:
        ref, ours = pair(**kw)
        ids = torch.randint(0, vocab, shape)
        with torch.no_grad():
            a = ref(ids).logits
            b, _ = ours(ids, use_cache=False)
        assert (a - b).abs().max() < 1e-4, kw


def assert_cache_matches(ours, vocab: int, cuts=(6, 10), n=20):
    """A prefix, then several tokens with a past (explicit causal mask), then one at a time: the same logits as
    one full forward pass."""
    ids = torch.randint(0, vocab, (1, n))
    with torch.no_grad():
        full, _ = ours(ids, use_cache=False)
        parts, past = [], None
        for a, b in zip((0,) + tuple(cuts), tuple(cuts) + (n,)):
            if b == n:
                for t in range(a, n):
                    lt, past = ours(ids[:, t:t + 1], past=past)
                    parts.append(lt)
            else:
                lt, past = ours(ids[:, a:b], past=past)
                parts.append(lt)
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


def greedy(step, ids, n=32, stop=None):
    """``n`` greedy token ids from ``step(x, past) -> (logits (B, [T,] V), past)``, on torch tensors or numpy
    arrays (an onnxruntime decoder); ends early after the token ``stop``."""
    past, x, got = None, ids, []
    with torch.no_grad():
        for _ in range(n):
            logits, past = step(x, past)
            x = (logits[:, -1] if logits.ndim == 3 else logits).argmax(-1).reshape(-1, 1)
            got.append(int(x[0, 0]))
            if got[-1] == stop:
                break
    return got
