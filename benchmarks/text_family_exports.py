"""Each new text family (tiny random model saved by transformers, tests/test_text_families.save_tiny) imported,
exported with `studio export-onnx` (through the parity gate) and run on torch and onnx with the same 16 greedy
tokens. Usage: python benchmarks/text_family_exports.py qwen3 mistral phi3 gemma2 gemma3_text"""
import json, os, subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_text_families import save_tiny
home = Path(tempfile.mkdtemp())
env = dict(os.environ, STUDIO_HOME=str(home), STUDIO_PLUGIN_CHECK="0")
def studio(*a):
    return subprocess.run([sys.executable, "-m", "studio.cli", *a], env=env, capture_output=True, text=True)
for case in sys.argv[1:]:
    f = home / "src" / case; f.parent.mkdir(exist_ok=True)
    save_tiny(case, f)
    r = studio("models", "import", str(f), "--name", case); print(case, "import", r.returncode, r.stdout.strip()[:100], r.stderr[-300:])
    args = ("generate", "text", "--model", case, "--prompt", "w3 w4 w5", "--set", "temperature=0", "--set", "max_new_tokens=16", "--json")
    t = json.loads(studio(*args).stdout)["token_ids"]
    r = studio("export-onnx", case); print(case, "export", r.returncode, r.stdout.strip()[-200:], r.stderr[-500:])
    o = studio(*args, "--backend", "onnx"); 
    print(case, "same tokens:", json.loads(o.stdout)["token_ids"] == t if o.returncode == 0 else o.stderr[-300:])
