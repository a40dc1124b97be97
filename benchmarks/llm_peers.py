"""Benchmark: the studio's CPU text generation against the peer runtimes, side by side in one run (issue #15).

    .venv/bin/python benchmarks/llm_peers.py [--models llama,gpt2] [--tokens 128] [--threads 2] [--rounds 3]
                                             [--work DIR] [--llama-cpp-src DIR]

Two models with random weights, made by transformers in ``--work`` (kept, so a second run skips the builds) and
saved as safetensors: a ~0.5B Llama-shaped one (hidden 1024, 28 layers, GQA 16/4, vocab 32000) and the 124M
GPT-2 shape. Greedy, a 16-token prompt, ``--tokens`` new tokens, ``--threads`` threads everywhere, EOS ignored.
- studio: torch fp32 and onnxruntime fp32 / int8 / int4 (`studio export-onnx`'s python API,
  engine.onnx_export.export_model; with force, since on random weights int4 fails the gate's top-1 agreement),
  both through the studio's generation loop;
- onnxruntime-genai: graphs from its model builder (``python -m onnxruntime_genai.models.builder``), fp32, int4;
- llama.cpp through llama-cpp-python: GGUF from llama.cpp's own converter (``convert_hf_to_gguf.py`` of the
  llama-cpp-python source distribution's vendor/llama.cpp; ``pip download llama-cpp-python --no-deps
  --no-binary :all:``) at F32 and Q8_0, and Q4_0 from llama.cpp's quantizer (``llama_model_quantize``).
A runtime that is not installed prints "not installed" in its row. The runs take turns for ``--rounds`` rounds
(each loads its model, writes, and lets go of it); tokens/s are medians. For the 0.5B model at fp32 the
memory-bandwidth ceiling is measured around each studio fp32 pass (SustainedRead of benchmarks/onnx_vs_torch.py:
a buffer as large as the bytes one step reads, read on the same threads). The load average is printed with the
table: the machine may be shared. Prints Markdown.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TOKENIZER = ROOT / "resources" / "models" / "shakespeare-llama" / "tokenizer.json"
SHAPES = {
    "llama": ("Llama-shaped, random", dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                                           num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4,
                                           max_position_embeddings=2048, tie_word_embeddings=False,
                                           bos_token_id=1, eos_token_id=2)),
    "gpt2": ("GPT-2-shaped (124M), random", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                                                 n_head=12, bos_token_id=50256, eos_token_id=50256)),
}
PRECISION = {"fp32": "fp32", "int8": "int8 / Q8_0", "int4": "int4 / Q4_0"}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----- building ----------------------------------------------------------------------------------------------
def build_model(family: str, work: Path) -> Path:
    """The random model folder as transformers writes it (safetensors), with a byte-level BPE tokenizer (the
    built-in model's; the vocabulary is padded to the model's by the converters)."""
    folder = work / f"hf-{family}"
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = (transformers.LlamaConfig if family == "llama" else transformers.GPT2Config)(**SHAPES[family][1])
    model = (transformers.LlamaForCausalLM if family == "llama" else transformers.GPT2LMHeadModel)(cfg).eval()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
    if family == "gpt2":  # the Hub's gpt2 config.json has n_ctx, which llama.cpp's converter reads
        cfg_file = tmp / "config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "n_ctx": cfg.n_positions}, indent=2))
    shutil.copy(TOKENIZER, tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "model_max_length": 2048}))
    del model
    tmp.rename(folder)
    return folder


def studio_exports(family: str, folder: Path, work: Path) -> dict:
    """{precision: export folder} made by the studio's exporter (parity-gated)."""
    from engine.onnx_export import export_model
    from engine.plugins import DEFAULT_PLUGINS, PluginHost
    from engine.store import ModelEntry, content_hash

    host = PluginHost(safe_mode=True, disabled=[], builtins=DEFAULT_PLUGINS).load()
    entry = ModelEntry(folder.name, folder, family, "text", False, content_hash(folder), 0, folder.name,
                       json.loads((folder / "config.json").read_text()), {})
    out = {}
    for q in (None, "int8", "int4"):
        dest = work / f"studio-{family}-{q or 'fp32'}"
        if not (dest / "onnx.json").is_file():
            say(f"studio export {family} {q or 'fp32'}")
            # force: random weights have no confident top-1 for int4 to keep (the gate measures top-1 agreement);
            # this measures speed only, and the gate's numbers stay in the export's manifest
            export_model(host, entry, out_dir=dest, quantize=q, force=True)
        out[q or "fp32"] = dest
    return out


def genai_builds(folder: Path, work: Path, family: str, threads: int) -> dict:
    """{precision: folder or error text} from onnxruntime-genai's model builder."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {p: "not installed" for p in ("fp32", "int4")}
    out = {}
    for p in ("fp32", "int4"):
        dest = work / f"genai-{family}-{p}"
        if not (dest / "genai_config.json").is_file():
            say(f"onnxruntime-genai builder {family} {p}")
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(dest),
                   "-p", p, "-e", "cpu", "-c", str(work / "genai-cache")]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0 or not (dest / "genai_config.json").is_file():
                lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
                out[p] = "its builder failed: " + (lines[-1][:160] if lines else "no output")
                continue
        cfg_path = dest / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=2))
        out[p] = dest
    return out


CONVERT = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
import convert_hf_to_gguf as c
from conversion import base
# The random models carry the built-in model's byte-level BPE tokenizer, which the converter does not know by
# its hash; its pre-tokenizer is GPT-2's regex, so say so (the tokenizer plays no part in the speed measured).
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
c.main()
"""


def gguf_builds(folder: Path, work: Path, family: str, src: Path | None) -> dict:
    """{precision: .gguf path or error text}: F32 and Q8_0 by convert_hf_to_gguf.py, Q4_0 by llama_model_quantize."""
    try:
        import llama_cpp
    except ImportError:
        return {p: "not installed" for p in PRECISION}
    conv = src / "convert_hf_to_gguf.py" if src else None
    out = {}
    for p, outtype in (("fp32", "f32"), ("int8", "q8_0")):
        dest = work / f"gguf-{family}-{outtype}.gguf"
        if not dest.is_file():
            if conv is None or not conv.is_file():
                out[p] = "no llama.cpp converter (--llama-cpp-src)"
                continue
            say(f"convert_hf_to_gguf {family} {outtype}")
            proc = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(folder), "--outfile", str(dest),
                                   "--outtype", outtype], capture_output=True, text=True)
            if proc.returncode != 0 or not dest.is_file():
                lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
                out[p] = "its converter failed: " + (lines[-1][:160] if lines else "no output")
                continue
        out[p] = dest
    f32, q4 = out.get("fp32"), work / f"gguf-{family}-q4_0.gguf"
    if isinstance(f32, Path) and not q4.is_file():
        if not hasattr(llama_cpp, "llama_model_quantize"):
            out["int4"] = "this llama-cpp-python build has no quantizer"
        else:
            say(f"llama_model_quantize {family} Q4_0")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(), params)
            if rc != 0 or not q4.is_file():
                out["int4"] = f"llama_model_quantize failed ({rc})"
    if q4.is_file():
        out["int4"] = q4
    out.setdefault("int4", "no F32 GGUF to quantize")
    return out


# ----- running -----------------------------------------------------------------------------------------------
def run_studio(kind: str, family: str, folder: Path, export: Path | None, prompt: list, n: int, threads: int):
    """(seconds, token ids) for one generation through the studio's loop (plugins/text/pipeline.py)."""
    import torch

    from engine.generators import Result
    from plugins.text.models import load_tokenizer
    from plugins.text.pipeline import TextPipeline, TextRequest, TorchDecoder
    from plugins.text.sampling import SamplingOptions

    if kind == "torch":
        from plugins.text.models import load_model

        torch.set_num_threads(threads)
        decoder = TorchDecoder(load_model(folder, family))
    else:
        from engine.backends.decoder import OnnxDecoder
        from engine.backends.runtime import Export

        exp = Export(export, threads=threads)
        decoder = OnnxDecoder(exp.session("decoder"), exp.manifest["config"])
    pipe = TextPipeline(decoder, load_tokenizer(folder), bos_token_id=None, eos_token_ids=())
    req = TextRequest(max_new_tokens=n, sampling=SamplingOptions(temperature=0.0))
    list(pipe.run_ids(prompt[:4], TextRequest(max_new_tokens=4, sampling=req.sampling)))  # warm-up
    t = time.perf_counter()
    result = [e for e in pipe.run_ids(prompt, req) if isinstance(e, Result)][0]
    return time.perf_counter() - t, result.token_ids


def run_genai(folder: Path, prompt: list, n: int, threads: int):
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def generate(k):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + k, min_length=len(prompt) + k)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt], dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return [int(x) for x in gen.get_sequence(0)][len(prompt):]
    generate(4)  # warm-up
    t = time.perf_counter()
    ids = generate(n)
    return time.perf_counter() - t, ids


def run_llama_cpp(path: Path, prompt: list, n: int, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=max(512, len(prompt) + n + 8), n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def generate(k):
        out = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == k:
                break
        return out
    generate(4)  # warm-up
    t = time.perf_counter()
    ids = generate(n)
    dt = time.perf_counter() - t
    llm.close()
    return dt, ids


def child(job: dict):
    """A function that runs ``job`` in a fresh process: (seconds, token ids)."""
    def run():
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1][:200])
        got = json.loads(line[0][7:])
        return got["seconds"], got["ids"]
    return run


def run_child(job: dict) -> None:
    kind, prompt, n, threads = job["kind"], job["prompt"], job["tokens"], job["threads"]
    path = Path(job["path"]) if job.get("path") else None
    if kind in ("torch", "onnx"):
        dt, ids = run_studio(kind, job["family"], Path(job["folder"]), path, prompt, n, threads)
    elif kind == "genai":
        dt, ids = run_genai(path, prompt, n, threads)
    else:
        dt, ids = run_llama_cpp(path, prompt, n, threads)
    print("RESULT " + json.dumps({"seconds": dt, "ids": ids}), flush=True)


def bench_family(family: str, args, work: Path) -> tuple:
    import numpy as np

    from onnx_vs_torch import SustainedRead, bytes_per_token, graph_file

    folder = build_model(family, work)
    say(f"{family}: model ready at {folder}")
    exports = studio_exports(family, folder, work)
    genai = genai_builds(folder, work, family, args.threads) if family == "llama" else \
        {p: "its model builder has no GPT-2 (GPT2LMHeadModel is not among its architectures)" for p in ("fp32", "int4")}
    gguf = gguf_builds(folder, work, family, args.llama_cpp_src)
    vocab = SHAPES[family][1]["vocab_size"]
    prompt = [int(x) for x in np.random.default_rng(0).integers(3, min(vocab, 3000), 16)]
    # each run in its own process: thread pools that spin after their work (OpenMP's, onnxruntime's) would take
    # the cores from the next runtime if they shared one
    common = {"family": family, "folder": str(folder), "prompt": prompt, "tokens": args.tokens,
              "threads": args.threads}
    runs = {("studio torch", "fp32"): child({**common, "kind": "torch"})}
    for p, dest in exports.items():
        runs[("studio onnxruntime", p)] = child({**common, "kind": "onnx", "path": str(dest)})
    notes = {}
    for p, dest in genai.items():
        if isinstance(dest, Path):
            runs[("onnxruntime-genai", p)] = child({**common, "kind": "genai", "path": str(dest)})
        else:
            notes[("onnxruntime-genai", p)] = dest
    for p, dest in gguf.items():
        if isinstance(dest, Path):
            runs[("llama.cpp", p)] = child({**common, "kind": "llama.cpp", "path": str(dest)})
        else:
            notes[("llama.cpp", p)] = dest

    nbytes = bytes_per_token(graph_file(exports["fp32"]))
    probe = SustainedRead(nbytes, args.threads) if family == "llama" else None
    rates = {k: [] for k in runs}
    ceiling = []  # (studio fp32 backend, tokens/s, GB/s of the reads around it)
    ids = {}
    try:
        for r in range(args.rounds):
            for key, fn in runs.items():
                before = probe()[0] if probe and key[1] == "fp32" and key[0].startswith("studio") else None
                try:
                    dt, toks = fn()
                except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    notes[key] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                    continue
                finally:
                    gc.collect()
                rates[key].append(len(toks) / dt)
                ids[key] = toks
                if before is not None:
                    ceiling.append((key[0], len(toks) / dt, (before + probe()[0]) / 2))
                say(f"{family} round {r + 1}: {key[0]} {key[1]}: {len(toks) / dt:.2f} tok/s")
    finally:
        if probe:
            probe.close()
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    return med, notes, ceiling, nbytes, ids


def table(family: str, med: dict, notes: dict, ceiling: list, nbytes: int, ids: dict) -> list:
    lines = [f"**{SHAPES[family][0]}** ({nbytes / 1e9:.2f} GB of fp32 weights read per token)", "",
             "| runtime | precision | tokens/s | studio's best at this precision / this |", "|---|---|---|---|"]
    best = {}
    for (rt, p), r in med.items():
        if rt.startswith("studio"):
            best[p] = max(best.get(p, 0.0), r)
    keys = [("studio torch", "fp32")] + [(rt, p) for p in PRECISION for rt in
                                         ("studio onnxruntime", "onnxruntime-genai", "llama.cpp")]
    for key in keys:
        rt, p = key
        if key in med:
            ratio = "" if rt.startswith("studio") else f"{best[p] / med[key]:.2f}x" if p in best else ""
            lines.append(f"| {rt} | {PRECISION[p]} | {med[key]:.2f} | {ratio} |")
        elif key in notes:
            lines.append(f"| {rt} | {PRECISION[p]} | {notes[key]} | |")
    if ceiling:
        import numpy as np

        for rt in sorted({c[0] for c in ceiling}):
            got = [(r, gbs) for name, r, gbs in ceiling if name == rt]
            pct = float(np.median([100 * r * nbytes / (gbs * 1e9) for r, gbs in got]))
            gb = float(np.median([g for _, g in got]))
            lines.append("")
            lines.append(f"{rt} fp32: {pct:.0f} % of the memory-bandwidth ceiling (median over rounds; reads around "
                         f"each pass gave {gb:.1f} GB/s, so the ceiling is {gb * 1e9 / nbytes:.2f} tokens/s).")
    ref = ids.get(("studio torch", "fp32"))
    same = [f"{rt} {p}" for (rt, p), t in ids.items() if p == "fp32" and t == ref]
    lines.append("")
    lines.append(f"fp32 runs that wrote the same {len(ref or [])} greedy tokens as studio torch: {', '.join(same)}.")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        run_child(json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama,gpt2")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/llm_peers"))
    p.add_argument("--llama-cpp-src", type=Path, default=None,
                   help="vendor/llama.cpp of the llama-cpp-python sdist (has convert_hf_to_gguf.py)")
    args = p.parse_args(argv)
    args.work = args.work.absolute()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STUDIO_HOME", str(args.work / "studio-home"))
    load0 = os.getloadavg()
    out = []
    for family in args.models.split(","):
        med, notes, ceiling, nbytes, ids = bench_family(family, args, args.work)
        out += table(family, med, notes, ceiling, nbytes, ids) + [""]
    load1 = os.getloadavg()
    import platform

    print(f"Greedy, 16-token prompt + {args.tokens} new tokens, {args.threads} threads, CPU ({platform.machine()}, "
          f"{os.cpu_count()} cores), medians of {args.rounds} rounds taking turns; load average at the start "
          f"{load0[0]:.2f} / {load0[1]:.2f}, at the end {load1[0]:.2f} / {load1[1]:.2f} (1 / 5 min; the machine is "
          "shared with other agents).\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
