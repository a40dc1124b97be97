#!/bin/sh
# GPU check of what a user runs, on a CUDA machine, from the repository root:
#     OUT=/some/folder sh benchmarks/gpu_cli_check.sh
# - `studio generate text|image|caption` with --device cuda and then --device cpu, the same seeds
#   (STUDIO_HOME under $OUT, so the user's own history is not touched);
# - the pixel difference between the two images;
# - benchmarks/gpu_check.py (fp16 CUDA vs fp32 CPU parity and tokens/s);
# - the 124M row of benchmarks/onnx_vs_torch.py at 2 and 8 threads on that machine's CPU, when onnxruntime is there.
# The lent machines have torch but not platformdirs: a wheel of it in .whl/ (not committed) is installed first.
# - `studio history replay` of the three CUDA runs (exact on the same device?) and of the text one on the CPU.
# SKIP_PIP=1, SKIP_GPU_CHECK=1 and SKIP_ONNX=1 skip those steps (to try the script on a machine without a GPU).
set -u
[ -n "${SKIP_PIP:-}" ] || pip install --no-deps --quiet .whl/platformdirs-*.whl 2>&1 | tail -1
export STUDIO_HOME="$OUT/home" PYTHONPATH="$PWD"
run() { echo "== $*"; /usr/bin/time -f "%e s" python3 -c 'import sys; from studio.cli import main; sys.exit(main(sys.argv[1:]))' "$@" 2>&1 | tail -8; }
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
run generate text --device cuda --prompt "ROMEO:" --seed 1 --set max_new_tokens=40 --json
run generate text --device cpu --prompt "ROMEO:" --seed 1 --set max_new_tokens=40 --json
run generate image --device cuda --prompt "a large green triangle in the bottom right on a blue background" --seed 3 --out "$OUT/cuda.png" --json
run generate image --device cpu --prompt "a large green triangle in the bottom right on a blue background" --seed 3 --out "$OUT/cpu.png" --json
run generate caption --device cuda --image "$OUT/cuda.png" --json
run generate caption --device cpu --image "$OUT/cuda.png" --json
# does a recipe made on the GPU replay exactly there (history ids 1, 3, 5 are the cuda runs above)?
run history replay 1
run history replay 3
run history replay 5
run history replay 1 --device cpu
python3 - <<'PY'
import os; from PIL import Image; import numpy as np
a = np.asarray(Image.open(os.environ["OUT"] + "/cuda.png")).astype(int); b = np.asarray(Image.open(os.environ["OUT"] + "/cpu.png")).astype(int)
print("cuda vs cpu image: max pixel diff", np.abs(a - b).max(), "mean", np.abs(a - b).mean())
PY
[ -n "${SKIP_GPU_CHECK:-}" ] || timeout 200 python3 benchmarks/gpu_check.py --tokens 256 2>&1 | tail -25
[ -n "${SKIP_ONNX:-}" ] || { echo "== onnxruntime on this machine's CPU (124M only)"
python3 -c "import onnxruntime, onnx; print('onnxruntime', onnxruntime.__version__, 'onnx', onnx.__version__)" 2>&1 | tail -1 &&
  for t in 2 8; do timeout 120 python3 benchmarks/onnx_vs_torch.py --threads $t --skip builtin-text,image,caption 2>&1 | grep -E "^\| gpt2|per round|^Measured|FAILED|Error" | cut -c1-400; done; }
nproc; lscpu | grep -E "Model name|L3"
