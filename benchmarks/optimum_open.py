"""Does Optimum open a studio caption export as it is? Loads the export folder with optimum's
``ORTModelForVision2Seq.from_pretrained`` (no conversion, no arguments beyond the folder) and compares its greedy and
beam-3 captions of 20 images with transformers' ``VisionEncoderDecoderModel`` of the original model folder.

optimum-onnx needs transformers < 4.58, so run it from a separate environment:
    python3 -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 'optimum-onnx[onnxruntime]' pillow
    studio export-onnx MODEL            # in the studio's environment
    /tmp/optvenv/bin/python benchmarks/optimum_open.py EXPORT_DIR MODEL_DIR
"""
from __future__ import annotations

import sys

import numpy as np


def images(n: int):
    from PIL import Image

    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(17, 71)), int(rng.integers(17, 71))
        arr = np.empty((h, w, 3), dtype=np.uint8)
        arr[:] = rng.integers(0, 256, 3)
        arr[: h // 2, : w // 2] = rng.integers(0, 256, 3)
        out.append(Image.fromarray(arr))
    return out


def main(export_dir: str, model_dir: str) -> int:
    import torch
    from optimum.onnxruntime import ORTModelForVision2Seq
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    ort_model = ORTModelForVision2Seq.from_pretrained(export_dir)
    ref = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
    proc = AutoImageProcessor.from_pretrained(export_dir)
    tok = AutoTokenizer.from_pretrained(export_dir)
    same = {1: 0, 3: 0}
    ims = images(20)
    for im in ims:
        px = proc(images=im.convert("RGB"), return_tensors="pt").pixel_values
        for beams in (1, 3):
            with torch.no_grad():
                a = ref.generate(pixel_values=px, max_new_tokens=8, num_beams=beams, do_sample=False)
            b = ort_model.generate(pixel_values=px, max_new_tokens=8, num_beams=beams, do_sample=False)
            same[beams] += tok.decode(a[0], skip_special_tokens=True) == tok.decode(b[0], skip_special_tokens=True)
    print(f"ORTModelForVision2Seq.from_pretrained({export_dir}) opened it: {type(ort_model).__name__}")
    print(f"captions identical to transformers: greedy {same[1]}/{len(ims)}, beam 3 {same[3]}/{len(ims)}")
    return 0 if same[1] == same[3] == len(ims) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
