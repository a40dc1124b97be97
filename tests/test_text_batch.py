"""Batched text generation (`--prompt-file --batch-size N`): left-padded batches with an attention mask and each
row's own positions, on torch and on the ONNX export, give every prompt the tokens it gets alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.generators import Partial, Result
from engine.onnx_export import export_model
from plugins.text.pipeline import TextPipeline, TextRequest, TorchDecoder
from plugins.text.sampling import SamplingOptions
from tests.onnx_fixtures import entry_for, exporter_host, text_folder, word_tokenizer

# different lengths (1 to 13 tokens after BOS), so every batch is padded
PROMPTS = ["w3 w5 w7 w11", "w1", "w9 w8 w7 w6 w5 w4 w3 w2 w1 w0 w12 w13", "w40 w41 w42", "w17 w2"]
GREEDY = SamplingOptions(temperature=0.0)
SAMPLED = SamplingOptions(temperature=0.9, top_k=20, top_p=0.9)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("STUDIO_ONNX_THREADS", "1")
    torch.set_num_threads(1)


def _pipeline(folder: Path, family: str, backend: str) -> TextPipeline:
    from engine.store import content_hash
    from plugins.text.models import load_model, load_tokenizer

    if backend == "onnx":
        from plugins.text.onnx import load_decoder

        export_model(exporter_host(), entry_for(folder, family, "text"))
        decoder, _ = load_decoder(folder, content_hash(folder))
    else:
        decoder = TorchDecoder(load_model(folder, family))
    return TextPipeline(decoder, load_tokenizer(folder), bos_token_id=0, eos_token_ids=[1])


def _batched(pipe, reqs, batch_size):
    out, streamed = {}, {}
    for i, event in pipe.run_batch(PROMPTS, reqs, batch_size=batch_size):
        if isinstance(event, Partial):
            streamed[i] = streamed.get(i, "") + event.text
        elif isinstance(event, Result):
            out[i] = event
    assert sorted(out) == list(range(len(PROMPTS)))
    assert all(streamed.get(i, "") == out[i].text for i in out)  # each row streams its own text
    return [out[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batch_gives_each_prompt_its_own_tokens(tmp_path, family, backend):
    """Batch size 1 vs 3 vs all: the same tokens, greedy and seeded sampling; 120 new tokens run past the
    96-position context, so the batch also restarts on a window as one prompt alone slides."""
    pipe = _pipeline(text_folder(tmp_path / f"tiny-{family}", family), family, backend)
    for sampling in (GREEDY, SAMPLED):
        reqs = [TextRequest(max_new_tokens=120, sampling=sampling, seed=7 + i) for i in range(len(PROMPTS))]
        alone = [[e for e in pipe.run(p, r) if isinstance(e, Result)][0] for p, r in zip(PROMPTS, reqs)]
        assert len({len(r.token_ids) for r in alone}) > 1 or sampling is GREEDY  # rows end at different steps
        for size in (1, 3, len(PROMPTS)):
            got = _batched(pipe, reqs, size)
            assert [r.token_ids for r in got] == [r.token_ids for r in alone], (sampling, size)
            assert [r.info["stopped_by"] for r in got] == [r.info["stopped_by"] for r in alone]
        assert got[0].info["batch_size"] == len(PROMPTS)


@pytest.mark.parametrize("options", [
    dict(sliding_window=5),  # Mistral: the window counts slots, padding included
    dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=30.0,
         final_logit_softcapping=20.0, sandwich_norms=True, norm_offset=True, embed_scale=True),  # Gemma 2
])
def test_batch_with_sliding_windows_and_soft_capping(options):
    from plugins.text.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         **options))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    pipe = TextPipeline(TorchDecoder(model.eval()), word_tokenizer(64), bos_token_id=0, eos_token_ids=[1])
    reqs = [TextRequest(max_new_tokens=40, sampling=GREEDY, seed=i) for i in range(len(PROMPTS))]
    alone = [[e for e in pipe.run(p, r) if isinstance(e, Result)][0].token_ids for p, r in zip(PROMPTS, reqs)]
    assert [r.token_ids for r in _batched(pipe, reqs, len(PROMPTS))] == alone


def test_padded_logits_match_transformers():
    """The padded batch's last-position logits equal transformers' own for each prompt alone."""
    import transformers

    from plugins.text.llama import LlamaConfig, LlamaForCausalLM, load_hf_state_dict

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    ours = LlamaForCausalLM(LlamaConfig.from_dict(hf_cfg.to_dict()))
    load_hf_state_dict(ours, ref.state_dict())
    seqs = [[5, 9, 3, 2, 8, 7], [4], [11, 12, 13]]
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask, pos = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):], mask[i, T - len(s):], pos[i, T - len(s):] = torch.tensor(s), 1, torch.arange(len(s))
    logits, past = ours.eval().step(ids, None, attention_mask=mask, position_ids=pos)
    for i, s in enumerate(seqs):
        want = ref(torch.tensor([s])).logits[0, -1]
        torch.testing.assert_close(logits[i], want, atol=1e-4, rtol=1e-4)
    # one decode step on top of the padded cache
    nxt = torch.tensor([[1], [2], [3]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    logits2, _ = ours.step(nxt, past, attention_mask=mask2, position_ids=torch.tensor([[len(s)] for s in seqs]))
    for i, s in enumerate(seqs):
        want = ref(torch.tensor([s + [int(nxt[i, 0])]])).logits[0, -1]
        torch.testing.assert_close(logits2[i], want, atol=1e-4, rtol=1e-4)


def test_padded_mask_leaves_no_row_empty():
    from engine.nn.cache import padded_mask

    m = padded_mask(3, 1, "cpu", torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert m.shape == (2, 1, 3, 4)
    assert m.any(-1).all()  # a padding query sees itself
    assert m[0, 0, 1].tolist() == [False, False, True, False]  # a real query: real slots up to its own
    assert m[1, 0, 2].tolist() == [True, True, True, True]


def _cli(capsys, *args) -> tuple:
    from studio.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prompt_file_batch_size(studio_home, tmp_path, capsys):
    """`--prompt-file --batch-size 3`: one history row and output per prompt, each as it is alone; a batched row
    replays identically on its own."""
    text_folder(studio_home / "models" / "tiny-llama", "llama")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["generate", "text", "--model", "tiny-llama", "--prompt-file", str(prompts), "--seed", "4",
              "--backend", "torch", "--set", "max_new_tokens=12", "--json"]
    rows = {}
    for size in ("1", "3"):
        code, out, err = _cli(capsys, *common, "--batch-size", size, "--out", str(tmp_path / f"out{size}"))
        assert code == 0, err
        rows[size] = [json.loads(line) for line in out.splitlines()]
    one, three = rows["1"], rows["3"]
    assert [r["prompt"] for r in three] == PROMPTS
    assert [r["seed"] for r in three] == [4, 5, 6, 7, 8]
    assert [r["token_ids"] for r in three] == [r["token_ids"] for r in one]
    assert len({r["history_id"] for r in one + three}) == 2 * len(PROMPTS)
    assert all(Path(r["path"]).read_text() == r["text"] for r in three)
    code, out, err = _cli(capsys, "history", "replay", str(three[2]["history_id"]))
    assert code == 0 and "identical" in out, out + err


def test_cli_batch_size_errors(studio_home, tmp_path, capsys):
    text_folder(studio_home / "models" / "tiny-llama", "llama")
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1\nw2\n")
    code, _, err = _cli(capsys, "generate", "text", "--model", "tiny-llama", "--prompt-file", str(prompts),
                        "--batch-size", "0")
    assert code == 2 and "--batch-size must be 1 or more" in err
    code, _, err = _cli(capsys, "generate", "image", "--prompt-file", str(prompts), "--batch-size", "2")
    assert code == 2 and "one input at a time" in err
