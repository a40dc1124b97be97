"""The export form of the GPT-2 decoder (GPT2LMHeadModel.fuse_for_export, traced through
engine.backends.decoders.decoder_wrapper) computes what the model computes."""
import copy

import pytest
import torch

from engine.backends.decoders import decoder_wrapper
from engine.nn.gpt2 import GPT2Config, GPT2LMHeadModel


@pytest.mark.parametrize("cross,tied,by_layer", [(False, True, False), (True, False, True)])
def test_matches_the_model_prefill_and_cached(cross, tied, by_layer):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=4, add_cross_attention=cross,
                     tie_word_embeddings=tied, scale_attn_by_inverse_layer_idx=by_layer)
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():  # the init leaves biases and LayerNorms at 0/1: make every weight count
        p.data.add_(torch.randn_like(p) * 0.1)
    graph = decoder_wrapper(copy.deepcopy(model).fuse_for_export(), cfg.n_layer, cross)
    past = [torch.zeros(2, 4, 0, 4)] * 4
    enc = torch.randn(2, 7, 16)
    cache = model.new_cache()
    if cross:
        cache.cross = model.cross_kv(enc)
    extra = [t for kv in cache.cross for t in kv] if cross else []
    with torch.no_grad():
        for T in (5, 3, 1, 1):  # prefill, a multi-token cached step, then single tokens
            ids = torch.randint(0, cfg.vocab_size, (2, T))
            want, cache = model(ids, past=cache)
            got, *past = graph(ids, *past, *extra)
            assert (got - want).abs().max() < 1e-5
            assert torch.allclose(past[0], cache.k[0][:, :, :cache.length], atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(n_inner=40, scale_attn_weights=False),
                                 dict(add_cross_attention=True, tie_word_embeddings=False)])
def test_the_exported_graph_runs_in_onnxruntime_at_any_batch_with_beam_reorder(tmp_path, cfg):
    import numpy as np
    import onnxruntime as ort

    from engine.backends.decoder import OnnxDecoder
    from engine.backends.decoders import export_decoder
    from plugins.text.onnx import runtime_config

    torch.manual_seed(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=4, **cfg)).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    cross = cfg.get("add_cross_attention", False)
    rc = runtime_config(model, "gpt2")
    export_decoder(model, rc, tmp_path / "d.onnx", cross_shape=(4, 5, 4) if cross else None)
    dec = OnnxDecoder(ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"]), rc)
    for batch in (1, 3):
        enc = torch.randn(batch, 6, 16)  # an encoder length the export never saw
        cache = model.new_cache()
        ocache = None
        if cross:
            with torch.no_grad():
                cache.cross = model.cross_kv(enc)
            ocache = dec.new_cache(batch, [(k.numpy(), v.numpy()) for k, v in cache.cross])
        with torch.no_grad():
            for step, T in enumerate((5, 3, 1, 1)):
                ids = torch.randint(0, 50, (batch, T))
                want, cache = model(ids, past=cache)
                got, ocache = dec(ids.numpy(), ocache)
                assert np.abs(got - want.numpy()).max() < 1e-4
                if step == 1 and batch > 1:  # beam search picks rows
                    order = [2, 0, 0]
                    cache.reorder(torch.tensor(order))
                    ocache.reorder(order)
