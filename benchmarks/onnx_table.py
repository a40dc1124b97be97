"""The tables of benchmarks/onnx_vs_torch.py: the page's head and tail, the markdown tables of its measured rows
and the issue's targets checked against them."""
from __future__ import annotations


DOC_HEAD = """# ONNX vs PyTorch on the CPU

Written by `.venv/bin/python {command}` (the whole file below the command is its output).

What is measured, in one process:
- **decode tokens/s**: greedy decoding, batch 1, a 16-token prompt then N single-token steps with the KV cache
  (prefill not counted; tokens/s from the median step), for the built-in text model and for a GPT-2-small-shaped
  model (124M parameters, random weights, tied embeddings), under torch (`model.step`, `torch.inference_mode`),
  onnxruntime fp32 and onnxruntime int8 (weight-only `MatMulNBits`: 8-bit weights in blocks of 128 with one
  scale each, int8 compute, every MatMul with a constant weight; see `engine/backends/common.py QUANTIZATION`);
- **ceiling**: read bandwidth divided by the bytes of weights one decode step must read (every initializer of
  the graph except embedding tables read only by Gather); a decoder at batch 1 cannot beat it when its weights
  come from main memory (the 124M model). The built-in model's 11.6 MB stay in this machine's caches, so its
  "ceiling" is not a limit (it can pass 100 %). This VM's bandwidth drifts by ±20 % from one minute to the
  next, so the bandwidth is measured the way a decode step reads, at the same moment: a buffer as large as
  the step's fp32 weights, read with `np.max` on the same threads, 16 reads before and after every decode
  pass. The ceiling is the mean of the two median reads; being a median, a lucky pass can beat it. The
  stricter "% of the best read" divides by the better of the two best reads instead;
- **turns**: the three backends take turns for 5 rounds; every figure in the table (tokens/s, ceiling, % of
  ceiling, ratio to torch) is the median over the rounds of that round's value, so the ratios compare passes
  run seconds apart;
- **image**: seconds per image at 20 dpmpp_2m steps with guidance 3 (one batch of 2: conditional and
  unconditional), the torch loop (`plugins.image.pipeline.sample`) vs the numpy loop on onnxruntime, from the same
  noise; median over 5 prompts x 3 rounds, the backends taking turns;
- **caption**: milliseconds per greedy caption (preprocessing, encoder and decoder), median over 20 renders x 3
  rounds, the backends taking turns.

Exports are made by `engine.onnx_export.export_model` into a temporary folder, each through the parity gate.
The exporters trace each network's own export form, a copy of the model configured at export time (no second
forward pass is written by hand): `LlamaForCausalLM.fuse_for_export` (fused q/k/v and gate/up MatMuls, the
attention scale folded into q, rotate_half as one small MatMul for q and k together, grouped-query attention
without repeated K/V; about 270 nodes after onnxruntime's optimizations for the built-in model, against about 450
traced as written) and `GPT2LMHeadModel.fuse_for_export` (one causal mask per call, `Gelu` and
`LayerNormalization` as single operators, the attention scale folded into the weights).
onnxruntime sessions: intra-op threads = `--threads` (default: all cores), inter-op 1, graph optimizations all,
sequential execution; torch uses `torch.set_num_threads(--threads)`.

"""

DOC_TAIL = """
## Using the ONNX backend

    studio export-onnx MODEL [--out DIR] [--quantize int8] [--force]
    studio generate text --model MODEL --backend onnx --prompt "..."

Exports of user models go to `<model folder>/onnx` (or `onnx-int8`); exports of built-in models (read-only) go to
`$STUDIO_HOME/exports/<model>/onnx[-int8]`. Both are listed by `studio models list` and used by `--backend onnx`
(fp32 first when both exist; `STUDIO_ONNX_VARIANT=int8` picks the int8 one). An `--out` folder elsewhere is
written but not registered. The backend needs `onnxruntime`, `onnx` (the graph checker), `numpy`, `tokenizers`
and `Pillow`, not torch. The image generator's ONNX backend draws torch's noise for a seed with numpy
(`engine/diffusion/torch_noise.py`), so a seed gives the same picture on both backends (see the notes above).
"""


def targets(text: list) -> list:
    """The issue's targets, checked against the measured rows (met / NOT met)."""
    out = []
    by = {}
    for model, backend, rate, ceiling, nbytes, share, strict, vs_torch in text:
        by.setdefault(model, {})[backend] = (share, strict, vs_torch)
    for model, rows in by.items():
        share, strict, f = rows.get("onnxruntime fp32", (0.0, 0.0, 0.0))
        q = rows.get("onnxruntime int8", (0.0, 0.0, 0.0))[2]
        if model.startswith("gpt2-124m"):
            out.append(f"- {model}: onnxruntime fp32 at {100 * share:.0f} % of the ceiling from the median read, "
                       f"{100 * strict:.0f} % from the best read (target >= 80 %): "
                       f"{'met' if share >= 0.8 else 'NOT met'} by the median read, "
                       f"{'met' if strict >= 0.8 else 'NOT met'} by the best read")
        else:
            out.append(f"- {model}: onnxruntime fp32 {f:.2f}x torch (target >= 2x): {'met' if f >= 2 else 'NOT met'}")
        out.append(f"- {model}: onnxruntime int8 {q:.2f}x torch fp32 (target >= 2.5x): "
                   f"{'met' if q >= 2.5 else 'NOT met'}")
    return out


def render(text: list, other: list, notes: list, header: list) -> str:
    """The markdown the benchmark prints (and writes below DOC_HEAD): the decode table, the image and caption
    table, the targets and the notes, under ``header`` (when, where, which versions)."""
    lines = ["| model | backend | decode tokens/s (median step) | ceiling tokens/s (median read / bytes per token) "
             "| % of ceiling | % of the best read | vs torch fp32 |", "|---|---|---|---|---|---|---|"]
    for model, backend, rate, ceiling, nbytes, share, strict, vs_torch in text:
        lines.append(f"| {model} | {backend} | {rate:.1f} | {ceiling:.1f} ({nbytes / 1e6:.1f} MB/token) "
                     f"| {100 * share:.0f} % | {100 * strict:.0f} % | {vs_torch:.2f}x |")
    lines += ["", "The % columns and the ratio to torch are medians of per-round ratios, so they can differ by a "
              "few points from the ratio of the medians beside them."]
    lines += ["", "| task | backend | time |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in other]
    lines += ["", "Targets:", ""] + targets(text)
    return "\n".join(header + lines + ["", "Notes:", ""] + [f"- {n}" for n in notes]) + "\n"
