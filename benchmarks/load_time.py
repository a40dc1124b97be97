"""Benchmark: how long opening a text model takes, from process start to the first generated token.

    .venv/bin/python benchmarks/load_time.py [--models builtin,gpt2-124m,llama-336m] [--rounds 3] [--threads 2]
                                            [--work runs/load_time] [--peers] [--write docs/benchmarks_onnx.md]

For each model (the built-in text model; a GPT-2-small-shaped 124M model and a Llama-shaped 336M model with random
fp32 weights, made here into ``--work``, never committed) and each backend (torch; onnx fp32; onnx int8), a fresh
process runs ``studio``'s own path (``engine.runner.prepare`` + ``execute``, greedy, one new token) and reports:
- **first token**: seconds from just before the process was spawned to the end of a one-token generation
  (Python start, imports, store lookup, model load, prefill, writing the one-token output);
- **load**: the generator's own ``load_s`` (opening the model: checks, weights, onnxruntime session);
- **load CPU s**: the CPU time of the load (user + system, all threads): on a shared machine, where the wall
  times above depend on what else runs, this is the steadier figure;
- **peak RSS**: the process's peak resident memory at the first token (``VmHWM``; it counts the pages
  of memory-mapped weight files that were touched, and by then every weight was read once), next to the size
  of the weights on disk (torch: the safetensors; onnx: the export's files).
**cold**: before the run the model's files (weights, export, optimized-graph cache) are dropped from the page
cache with ``posix_fadvise(DONTNEED)`` (no root needed for clean pages; Python's own files stay cached);
**warm**: the same run again right after. Each figure is the median of ``--rounds`` runs, backends taking turns.
``--peers`` adds onnxruntime-genai (its model builder on the same Llama folder) where it installs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_336M = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
              "hidden_size": 1024, "intermediate_size": 2304, "num_hidden_layers": 24, "num_attention_heads": 16,
              "num_key_value_heads": 16, "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
              "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "torch_dtype": "float32"}
GPT2_124M = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 1024,
             "n_embd": 768, "n_layer": 12, "n_head": 12, "n_ctx": 1024, "activation_function": "gelu_new",
             "bos_token_id": 0, "eos_token_id": 0, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "torch_dtype": "float32"}

CHILD = r"""
import json, os, resource, sys, time
t_spawn = float(sys.argv[1])
t_main = time.time()
sys.path.insert(0, sys.argv[5])
from engine.plugins import PluginHost
from engine.store import ModelStore
from engine.runner import Job, prepare, execute
from engine.generators import Progress
host = PluginHost(); host.load()
store = ModelStore(host)
marks = {}
def on_event(ev):
    if isinstance(ev, Progress) and ev.message.startswith("loading") and "cpu0" not in marks:
        marks["cpu0"] = time.process_time()
    if isinstance(ev, Progress) and ev.message == "writing" and "loaded" not in marks:
        marks["loaded"] = time.time(); marks["load_cpu_s"] = time.process_time() - marks.get("cpu0", 0)
job = Job("text", prompt="To be, or not to be", model=sys.argv[2], backend=sys.argv[3], device="cpu", seed=1,
          options={"max_new_tokens": 1, "temperature": 0.0})
rec = execute(prepare(host, store, job), on_event=on_event, history=False, out_dir=__import__("pathlib").Path(sys.argv[4]))
marks["first"] = time.time()
marks["rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print("RESULT " + json.dumps({"first_token_s": marks["first"] - t_spawn, "python_start_s": t_main - t_spawn,
      "load_s": rec.recipe["timings"].get("load_s"), "load_cpu_s": marks.get("load_cpu_s"),
      "rss_mb": marks["rss_mb"], "cpu_s": time.process_time(),
      "backend": rec.recipe["backend"], "notes": rec.recipe.get("warnings"), "info": rec.recipe.get("info")}))
"""


def make_folder(folder: Path, cfg: dict) -> Path:
    """A model folder with random fp32 weights (the built-in model's tokenizer, whose vocabulary fits)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from engine import state
    from plugins.text.models import build_model

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_model(cfg, cfg["model_type"])
        sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
              if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight") and not k.endswith("inv_freq")}
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(state.BUILTIN_MODELS / "shakespeare-llama" / "tokenizer.json", folder / "tokenizer.json")
    return folder


def drop_cache(paths: list) -> None:
    from engine import filecheck

    for base in paths:
        base = Path(base)
        files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
        for p in files:
            filecheck.advise(p, "POSIX_FADV_DONTNEED")


def run_child(env: dict, model: str, backend: str, out: Path) -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, repr(t), model, backend, str(out), str(ROOT)],
                          env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child failed: {proc.stderr.strip().splitlines()[-1:] if proc.stderr else proc.returncode}")


def weights_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20


def export_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name != "onnx.json") / 2**20


def peer_rounds(child: str, args: list, files: Path, rounds: int) -> dict:
    """A peer runtime's {"cold": [...], "warm": [...]} figures: ``child`` (a script printing ``RESULT {json}``,
    given its spawn time and ``args``) in fresh processes, cold (``files`` dropped from the page cache) and warm."""
    res = {"cold": [], "warm": []}
    for _ in range(rounds):
        for kind in ("cold", "warm"):
            if kind == "cold":
                drop_cache([files])
            t = time.time()
            proc = subprocess.run([sys.executable, "-c", child, repr(t), *args], capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                return {"error": f"it did not run: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
            res[kind].append(json.loads(line[0][7:]))
    return res


def peer_ort_genai(folder: Path, work: Path, threads: int, rounds: int, log) -> dict:
    """onnxruntime-genai on the same model: its model builder (fp32, cpu), then load and first-token times."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {"error": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
    out = work / f"ortgenai-{folder.name}"
    if not (out / "genai_config.json").is_file():
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(work / "ortgenai-cache")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0 or not (out / "genai_config.json").is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"its model builder failed offline: {tail[0][:200]}"}
    child = r"""
import json, resource, sys, time
t_spawn = float(sys.argv[1]); import numpy as np, onnxruntime_genai as og
t0 = time.time(); c0 = time.process_time(); model = og.Model(sys.argv[2]); load = time.time() - t0
load_cpu = time.process_time() - c0
hwm = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
params = og.GeneratorParams(model); params.set_search_options(max_length=64, do_sample=False)
gen = og.Generator(model, params); gen.append_tokens(np.array([[1, 2, 3, 4, 5, 6]], dtype=np.int32)); gen.generate_next_token()
print("RESULT " + json.dumps({"first_token_s": time.time() - t_spawn, "load_s": load, "load_cpu_s": load_cpu,
      "rss_mb": hwm()}))
"""
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    res = peer_rounds(child, [str(out)], out, rounds)
    if "error" in res:
        return res
    res["export_mb"] = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".data")) / 2**20
    return res


LLAMA_CPP_CHILD = r"""
import json, sys, time
t_spawn = float(sys.argv[1]); from llama_cpp import Llama
t0 = time.time(); c0 = time.process_time()
model = Llama(model_path=sys.argv[2], n_threads=int(sys.argv[3]), n_ctx=64, verbose=False)
load, load_cpu = time.time() - t0, time.process_time() - c0
model.eval([1, 2, 3, 4, 5, 6])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print("RESULT " + json.dumps({"first_token_s": time.time() - t_spawn, "load_s": load, "load_cpu_s": load_cpu,
      "rss_mb": hwm}))
"""


def peer_llama_cpp(folder: Path, work: Path, threads: int, rounds: int, src: str, log) -> dict:
    """llama.cpp (llama-cpp-python) on the same model: an F32 GGUF made by llama.cpp's own converter (the
    vendor/llama.cpp of the llama-cpp-python sdist, ``--llama-cpp-src``), then load and first-token times."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"error": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    gguf = work / f"gguf-{folder.name}-f32.gguf"
    if not gguf.is_file():
        if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
            return {"error": "no llama.cpp converter: pass --llama-cpp-src (vendor/llama.cpp of its sdist)"}
        from benchmarks.llm_peers import CONVERT

        log(f"llama.cpp's converter on {folder.name}")
        proc = subprocess.run([sys.executable, "-c", CONVERT, str(src), str(folder), "--outfile", str(gguf),
                               "--outtype", "f32"], capture_output=True, text=True)
        if proc.returncode != 0 or not gguf.is_file():
            tail = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()][-1:] or ["no output"]
            return {"error": f"its converter failed: {tail[0][:200]}"}
    res = peer_rounds(LLAMA_CPP_CHILD, [str(gguf), str(threads)], gguf, rounds)
    if "error" in res:
        return res
    res["export_mb"] = gguf.stat().st_size / 2**20
    return res


PREPACK_CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[4])
from engine.backends.runtime import session_options
so = session_options(int(sys.argv[3]))
if sys.argv[2] == "off":
    so.add_session_config_entry("session.disable_prepacking", "1")
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
t = time.perf_counter(); c = time.process_time()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
res = {"open_s": time.perf_counter() - t, "open_cpu_s": time.process_time() - c}
ids = np.arange(1, 65, dtype=np.int64)[None]
feeds = {i.name: (ids if i.name == "input_ids" else np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32))
         for i in s.get_inputs()}
t = time.perf_counter(); out = s.run(None, feeds); res["prefill64_s"] = time.perf_counter() - t
steps = []
for _ in range(16):
    f = {i.name: (np.array([[5]], dtype=np.int64) if i.name == "input_ids" else out[k])
         for k, i in enumerate(s.get_inputs())}
    t = time.perf_counter(); out = s.run(None, f); steps.append(time.perf_counter() - t)
res["step_ms"] = 1000 * sorted(steps)[8]
print("RESULT " + json.dumps(res))
"""


def prepack_rows(model_folder: Path, threads: int, rounds: int, log) -> dict:
    """The saved optimized fp32 graph opened with and without prepacking, in fresh processes taking turns."""
    graph = Path(model_folder) / "onnx" / ".optimized" / "decoder.onnx"
    out = {"on": [], "off": []}
    for _ in range(rounds):
        for mode in ("on", "off"):
            proc = subprocess.run([sys.executable, "-c", PREPACK_CHILD, str(graph), mode, str(threads), str(ROOT)],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise RuntimeError(f"prepack child failed: {proc.stderr.strip().splitlines()[-1:]}")
            out[mode].append(json.loads(line[0][7:]))
            log(f"prepack {mode}: {out[mode][-1]}")
    return out


def median(rows: list, key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="builtin,gpt2-124m,llama-336m")
    p.add_argument("--backends", default="torch,onnx,onnx-int8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "runs" / "load_time"))
    p.add_argument("--peers", action="store_true")
    p.add_argument("--llama-cpp-src", default="", help="with --peers: vendor/llama.cpp of the llama-cpp-python "
                   "sdist, whose convert_hf_to_gguf.py makes the GGUF files")
    p.add_argument("--prepack", action="store_true", help="also time the 336M fp32 export with and without "
                   "onnxruntime's weight prepacking: open, a 64-token prefill and a decode step")
    p.add_argument("--json", default="", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["STUDIO_HOME"] = str(home)
    env = {**os.environ, "STUDIO_HOME": str(home), "STUDIO_ONNX_THREADS": str(args.threads),
           "STUDIO_TORCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    from engine.onnx_export import export_model
    from engine.plugins import PluginHost
    from engine.store import ModelStore

    host = PluginHost()
    host.load()
    store = ModelStore(host)
    names = [m for m in args.models.split(",") if m]
    backends = [b for b in args.backends.split(",") if b]
    made = {"gpt2-124m": GPT2_124M, "llama-336m": LLAMA_336M}
    folders = {}
    for name in names:
        if name == "builtin":
            folders[name] = ("shakespeare-llama", store.get("shakespeare-llama").path)
            continue
        if not any(e.name == name for e in store.list()):
            log(f"making {name}")
            src = make_folder(work / "src" / name, made[name])
            store.import_(src, name=name)
        folders[name] = (name, store.get(name).path)
    results = {}
    for name in names:
        model, folder = folders[name]
        entry = store.get(model)
        for q in (None, "int8"):
            if (q is None and "onnx" in backends) or (q == "int8" and "onnx-int8" in backends):
                have = [f for f in entry.onnx if ("int8" in Path(f).name) == (q == "int8")]
                if not have:
                    log(f"exporting {name} ({q or 'fp32'})")
                    t = time.perf_counter()
                    export_model(host, entry, quantize=q, log=log)
                    log(f"exported in {time.perf_counter() - t:.0f} s")
        entry = store.get(model)
        exports = [Path(f) if Path(f).is_absolute() else Path(folder) / f for f in entry.onnx]
        rows = {b: {"cold": [], "warm": [], "first": []} for b in backends}
        for b in backends:  # the first open after export: onnx builds and saves its optimized graph here
            benv = {**env, "STUDIO_ONNX_VARIANT": "int8" if b == "onnx-int8" else "fp32"}
            drop_cache([folder, *exports])
            res = run_child(benv, model, "torch" if b == "torch" else "onnx", work / "out")
            rows[b]["first"].append(res)
            log(f"{name} {b} first open: load {res['load_s']:.2f} s ({res['load_cpu_s']:.2f} s CPU) notes {res['notes']}")
        for r in range(args.rounds):
            for b in backends:
                benv = {**env, "STUDIO_ONNX_VARIANT": "int8" if b == "onnx-int8" else "fp32"}
                for kind in ("cold", "warm"):
                    if kind == "cold":
                        drop_cache([folder, *exports])
                    res = run_child(benv, model, "torch" if b == "torch" else "onnx", work / "out")
                    rows[b][kind].append(res)
                    log(f"{name} {b} {kind} round {r + 1}: first token {res['first_token_s']:.2f} s, "
                        f"load {res['load_s']:.2f} s ({res['load_cpu_s']:.2f} s CPU), peak RSS {res['rss_mb']:.0f} MB "
                        f"notes {res['notes']}")
        results[name] = {"weights_mb": weights_mb(folder), "rows": rows,
                         "exports": {Path(e).name: export_mb(e) for e in exports}}
        if args.peers and name == "llama-336m":
            log("onnxruntime-genai on llama-336m")
            results[name]["ort_genai"] = peer_ort_genai(work / "src" / name, work, args.threads, args.rounds, log)
        if args.peers and name != "builtin":
            log(f"llama.cpp on {name}")
            results[name]["llama_cpp"] = peer_llama_cpp(work / "src" / name, work, args.threads, args.rounds,
                                                        args.llama_cpp_src, log)
    if args.prepack and "llama-336m" in folders:
        results["_prepack"] = prepack_rows(folders["llama-336m"][1], args.threads, args.rounds, log)
    report = render(results, args)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def render(results: dict, args) -> str:
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
             f"{os.getloadavg()[0]:.1f} at the end), {args.threads} threads; median of {args.rounds} runs; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", "| model | backend | files MB | cold: first token s | cold: load s | warm: first token s | "
             "warm: load s | warm: load CPU s | peak RSS MB | RSS / files | first open after export: load s (CPU s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name, label, size, kinds):
        rss = median(kinds["cold"] + kinds["warm"], "rss_mb")
        cpu = median(kinds["warm"], "load_cpu_s")
        first = (f"{median(kinds['first'], 'load_s'):.2f} ({median(kinds['first'], 'load_cpu_s'):.2f})"
                 if kinds.get("first") else "")
        lines.append(f"| {name} | {label} | {size:.0f} | {median(kinds['cold'], 'first_token_s'):.2f} | "
                     f"{median(kinds['cold'], 'load_s'):.2f} | {median(kinds['warm'], 'first_token_s'):.2f} | "
                     f"{median(kinds['warm'], 'load_s'):.2f} | {cpu if cpu is None else round(cpu, 2)} | "
                     f"{rss:.0f} | {rss / size:.2f} | {first} |")

    for name, res in results.items():
        if name.startswith("_"):
            continue
        for b, kinds in res["rows"].items():
            size = res["weights_mb"] if b == "torch" else next(
                (v for k, v in res["exports"].items() if ("int8" in k) == (b == "onnx-int8")), res["weights_mb"])
            row(name, b, size, kinds)
        for key, label in (("ort_genai", "onnxruntime-genai fp32"), ("llama_cpp", "llama.cpp F32 GGUF")):
            peer = res.get(key)
            if peer is None:
                continue
            if "error" in peer:
                lines.append(f"| {name} | {label} | not measured: {peer['error']} | | | | | | | | |")
            else:
                row(name, label, peer["export_mb"], peer)
    pre = results.get("_prepack")
    if pre:
        lines += ["", "llama-336m fp32, the saved optimized graph opened with and without onnxruntime's weight "
                  f"prepacking (median of {args.rounds} fresh processes each):", "",
                  "| prepacking | open s | open CPU s | prefill of 64 tokens s | decode step ms |",
                  "|---|---:|---:|---:|---:|"]
        for mode in ("on", "off"):
            r = pre[mode]
            lines.append(f"| {mode} | {median(r, 'open_s'):.2f} | {median(r, 'open_cpu_s'):.2f} | "
                         f"{median(r, 'prefill64_s'):.2f} | {median(r, 'step_ms'):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
