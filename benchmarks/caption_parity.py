"""Parity of the studio's captioners with transformers, on tiny random models saved by transformers (the builders
of tests/caption_refs.py): captions identical (greedy and beam 3, with and without a prefix) over 20 images of odd
sizes and modes (RGB, L, RGBA, P), the largest encoder-state and preprocessing differences. Prints a Markdown table.

    python benchmarks/caption_parity.py [--n 20]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def measure(folder, ref, blip: bool, prefixes, n: int) -> list:
    import torch
    from transformers import AutoTokenizer

    import caption_refs as R
    from plugins.caption.pipeline import CaptionPipeline

    tok = AutoTokenizer.from_pretrained(str(folder))
    proc = R.processor(folder)
    pipe = CaptionPipeline.from_folder(folder)
    same = {(p, b): 0 for p in prefixes for b in (1, 3)}
    pre_diff = enc_diff = 0.0
    texts = set()
    for im in R.random_images(n, seed=3):
        want = proc(images=im, return_tensors="np")["pixel_values"]
        pre_diff = max(pre_diff, float(np.abs(want - pipe.pixel_values(im)).max()))
        px = torch.from_numpy(want)
        with torch.no_grad():
            states = ref.vision_model(pixel_values=px).last_hidden_state if blip else ref.encoder(px).last_hidden_state
            ours = pipe.runner.model.vision_model(px) if blip else pipe.runner.model.encoder(px)
            enc_diff = max(enc_diff, float((states - ours).abs().max()))
            for prefix in prefixes:
                for beams in (1, 3):
                    kw = dict(max_new_tokens=8, num_beams=beams, do_sample=False)
                    if blip:
                        ids = tok(prefix, return_tensors="pt").input_ids if prefix else None
                        out = ref.generate(pixel_values=px, input_ids=ids, **kw)
                    else:
                        out = ref.generate(pixel_values=px, **kw)
                    expect = tok.decode(out[0], skip_special_tokens=True).strip()
                    texts.add(expect)
                    same[(prefix, beams)] += pipe(want, 8, beams, prefix=prefix).text == expect
    return [(prefix or "(none)", beams, f"{k}/{n}", pre_diff, enc_diff, len(texts)) for (prefix, beams), k in same.items()]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    import torch

    import caption_refs as R

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="caption-parity-"))
    rows = []
    ref = R.save_blip(tmp / "blip")
    rows += [("BLIP (ViT + BERT-style decoder)",) + r for r in measure(tmp / "blip", ref, True, ["", "a picture of"], args.n)]
    for enc, dec in (("deit", "bert"), ("vit", "bert"), ("deit", "gpt2"), ("vit", "gpt2")):
        ref = R.save_ved(tmp / f"{enc}-{dec}", enc, dec)
        rows += [(f"VisionEncoderDecoder {enc} + {dec}",) + r for r in measure(tmp / f"{enc}-{dec}", ref, False, [""], args.n)]
    print(f"{args.n} images of odd sizes (17-70 px) in RGB, L, RGBA and P modes; tiny random models saved by "
          "transformers; 8 new tokens\n")
    print("| model | prefix | beams | captions identical | max preprocessing diff | max encoder diff | distinct captions |")
    print("|---|---|---|---|---|---|---|")
    for model, prefix, beams, same, pre, enc, distinct in rows:
        print(f"| {model} | {prefix} | {beams} | {same} | {pre:.2g} | {enc:.2g} | {distinct} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
