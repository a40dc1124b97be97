"""Time to the first token of a chat turn, at turn 1 and turn 10 of a scripted conversation, with the KV cache of the
earlier turns reused (the chat generator's default) and without (every turn reads the whole conversation again).

    .venv/bin/python benchmarks/chat_prefix.py [--threads 1] [--repeats 3]

Runs the studio's own path (engine.chat renders the built-in model's template, plugins.text.pipeline decodes with a
PrefixState or without) on two models: the built-in Shakespeare model (256-token context, so its conversation is 4
short turns) and a random Llama with a 2048-token context (d_model 512, 8 layers) with the same tokenizer and
template, whose 10-turn conversation grows to ~570 tokens. Each turn adds a ~45-token user message and a 16-token
greedy answer. "first token" is the prefill: from the turn's start to the first logits. Medians over --repeats runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUILTIN = ROOT / "resources" / "models" / "shakespeare-llama"
LINES = ["Good morrow, sweet lord; what news from Mantua, and how fares my lady in the house of Capulet tonight?",
         "Speak, I pray thee, of the watch upon the walls, and of the torches burning in the market place."]


def conversation_prefill(pipe, template, tokenizer, turns: int, reuse: bool) -> list:
    from engine import chat
    from plugins.text.pipeline import PrefixState, TextRequest
    from plugins.text.sampling import SamplingOptions

    req = TextRequest(max_new_tokens=16, sampling=SamplingOptions(temperature=0), slide=False)
    state = PrefixState() if reuse else None
    messages, out = [chat.Message("system", "A street in Verona.")], []
    for t in range(turns):
        messages.append(chat.Message("user", f"{t + 1}. {LINES[t % 2]}"))
        ids = chat.encode(tokenizer, template.render(messages))
        assert len(ids) <= chat.budget(pipe.decoder.max_positions, req.max_new_tokens), "the script's turns overflow"
        result = list(pipe.run_ids(ids, req, prefix=state))[-1]
        out.append((len(ids), result.info["prefill_seconds"], result.info.get("reused_tokens", 0)))
        messages.append(chat.Message("assistant", result.text))
    return out


def identical_answers(conversations: int) -> tuple:
    """(turns whose sampled answer with the reused cache equals the answer read from scratch, turns) on the built-in
    model: temperature 0.8, top-k 50, top-p 0.95, a seed per turn, up to 4 turns per conversation."""
    import torch

    from engine import chat
    from engine.tokenizer import load_tokenizer
    from plugins.text.models import load_model
    from plugins.text.pipeline import PrefixState, TextPipeline, TextRequest, TorchDecoder
    from plugins.text.sampling import SamplingOptions

    template, tokenizer = chat.load_template(BUILTIN), load_tokenizer(BUILTIN)
    pipe = TextPipeline(TorchDecoder(load_model(BUILTIN, "llama")), tokenizer, 0, [0])
    lines = ["Who goes there?", "Speak, I pray thee.", "What news?", "Nay, good my lord.", "Away!"]
    same = total = 0
    with torch.inference_mode():
        for conv in range(conversations):
            state, messages = PrefixState(), []
            for turn in range(4):
                messages.append(chat.Message("user", lines[(conv + turn) % len(lines)]))
                ids = chat.encode(tokenizer, template.render(messages))
                if len(ids) > 200:
                    break
                req = TextRequest(max_new_tokens=24, sampling=SamplingOptions(0.8, 50, 0.95), stop=("\n\n",),
                                  seed=conv * 10 + turn, slide=False)
                reused = list(pipe.run_ids(ids, req, prefix=state))[-1]
                fresh = list(pipe.run_ids(ids, req))[-1]
                same += reused.token_ids == fresh.token_ids
                total += 1
                messages.append(chat.Message("assistant", reused.text))
    return same, total


def pipelines():
    import torch

    from engine import chat
    from engine.tokenizer import load_tokenizer
    from plugins.text.llama import LlamaConfig, LlamaForCausalLM
    from plugins.text.models import load_model
    from plugins.text.pipeline import TextPipeline, TorchDecoder

    template, tokenizer = chat.load_template(BUILTIN), load_tokenizer(BUILTIN)
    builtin = load_model(BUILTIN, "llama")
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=3072, hidden_size=512, intermediate_size=1408,
                                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                       max_position_embeddings=2048, bos_token_id=0, eos_token_id=0)).eval()
    for name, model, turns in (("shakespeare-llama (built-in, 2.6M, context 256)", builtin, 4),
                               ("random Llama (25M, context 2048)", big, 10)):
        yield name, TextPipeline(TorchDecoder(model), tokenizer, bos_token_id=0, eos_token_ids=[0]), template, \
            tokenizer, turns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--identical", type=int, default=20, metavar="N",
                   help="also count, over N sampled conversations, the turns whose answer is the same either way")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"Chat time to first token, CPU, fp32, {args.threads} thread(s), median of {args.repeats}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| model | turn | prompt tokens | reused tokens | first token, reuse (ms) | first token, no reuse (ms) "
          "| no reuse / reuse |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, pipe, template, tokenizer, turns in pipelines():
            conversation_prefill(pipe, template, tokenizer, 2, True)  # warm up
            runs = {True: [], False: []}
            for _ in range(args.repeats):
                for reuse in (True, False):  # alternating, so both see the same load
                    runs[reuse].append(conversation_prefill(pipe, template, tokenizer, turns, reuse))
            for t in sorted({0, 1, turns - 1}):
                with_, without = ([statistics.median(r[t][1] for r in runs[k]) for k in (True, False)])
                n, _, reused = runs[True][0][t]
                print(f"| {name} | {t + 1} | {n} | {reused} | {with_ * 1e3:.1f} | {without * 1e3:.1f} | "
                      f"{without / with_:.1f}x |")
    if args.identical:
        same, total = identical_answers(args.identical)
        print(f"\nSampled answers (built-in model, {args.identical} conversations): with the reused cache the same "
              f"tokens as read from scratch in {same} of {total} turns.")
    print(f"\nload at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
