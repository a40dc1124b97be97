"""Greedy and beam search loops on fake runners and a tiny random caption model."""
import numpy as np
import pytest
import torch

from plugins.caption.decode import beam_search, greedy, greedy_tokens
from plugins.caption.model import CaptionConfig, CaptionModel, TorchCaptionRunner
from plugins.caption.vit import ViTConfig
from engine.errors import CancelledError
from engine.nn.gpt2 import GPT2Config

torch.set_num_threads(1)


class TableRunner:
    """A fake network: the next-token distribution depends only on the last token (a Markov chain)."""

    def __init__(self, table):
        self.table = np.log(np.asarray(table, dtype=np.float64))  # (V, V): row = previous token
        self.encodes = 0

    def encode(self, pixels):
        self.encodes += 1
        return None

    def start(self, state, batch):
        return {"batch": batch}

    def step(self, ids, past):
        assert ids.shape == (past["batch"], 1)
        return self.table[ids[:, 0]].astype(np.float32), past

    def reorder(self, past, index):
        assert len(index) == past["batch"]
        return past


# tokens: 0 start, 1 end, 2 "a", 3 "b". From start, "a" (0.6) looks better than "b" (0.4), but "a" is then
# followed by a long uncertain tail while "b" ends at once: beam search finds "b <end>", greedy does not.
TABLE = [
    [1e-9, 1e-9, 0.6, 0.4],
    [1e-9, 1.0, 1e-9, 1e-9],
    [1e-9, 0.3, 0.35, 0.35],
    [1e-9, 0.99, 0.005, 0.005],
]


def test_beam_finds_better_sequence_than_greedy():
    runner = TableRunner(TABLE)
    g = greedy(runner, None, 0, 1, 10)
    assert g.tokens[0] == 2
    beams = beam_search(runner, None, 0, 1, 10, num_beams=3)
    assert beams[0].tokens == [3, 1] and beams[0].finished
    assert beams[0].score > g.score
    assert runner.encodes == 2  # the encoder runs once per image and decoding call


def test_beam_results_are_ordered_by_score():
    runner = TableRunner(TABLE)
    for k in (2, 3, 4):
        beams = beam_search(runner, None, 0, 1, 8, num_beams=k)
        assert 1 <= len(beams) <= k
        scores = [b.score for b in beams]
        assert scores == sorted(scores, reverse=True)
        for b in beams:
            assert b.score == pytest.approx(b.logprob / len(b.tokens))


def tiny_model(seed):
    torch.manual_seed(seed)
    cfg = CaptionConfig(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  image_size=16, patch_size=4),
                        GPT2Config(vocab_size=20, n_positions=24, n_embd=32, n_layer=2, n_head=4,
                                   add_cross_attention=True), 1, 2, 0)
    model = CaptionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_equals_greedy_on_a_network(seed):
    runner = TorchCaptionRunner(tiny_model(seed))
    pixels = np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)
    g = greedy(runner, pixels, 1, 2, 15)
    b = beam_search(runner, pixels, 1, 2, 15, num_beams=1)
    assert b[0].tokens == g.tokens
    assert b[0].logprob == pytest.approx(g.logprob, abs=1e-6)
    wide = beam_search(runner, pixels, 1, 2, 15, num_beams=4)
    assert [h.score for h in wide] == sorted((h.score for h in wide), reverse=True)


def test_max_new_tokens_and_cancel():
    runner = TableRunner([[0.1, 1e-9, 0.45, 0.45]] * 4)  # never ends
    g = greedy(runner, None, 0, 1, 5)
    assert len(g.tokens) == 5 and not g.finished
    beams = beam_search(runner, None, 0, 1, 5, num_beams=2)
    assert all(len(b.tokens) == 5 and not b.finished for b in beams)
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 3:
            raise CancelledError("stop")

    with pytest.raises(CancelledError):
        list(greedy_tokens(runner, None, 0, 1, 10, check_cancel=cancel))
    calls.clear()
    with pytest.raises(CancelledError):
        beam_search(runner, None, 0, 1, 10, num_beams=2, check_cancel=cancel)
