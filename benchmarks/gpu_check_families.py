"""CUDA check of what came after the first GPU runs (docs/benchmarks_gpu.md): the imported families (Qwen3,
Mistral, Phi-3, Gemma 2/3, GPT-2, a GGUF import, Stable Diffusion txt2img/img2img/inpainting, BLIP), LoRA adapters,
chat templates, and fine-tuning (`studio finetune text|image|caption|sd --device cuda`), each run through
`studio` on CUDA and on the CPU with the same seeds; plus two speed rows against the reference libraries on the GPU.

Two steps, because the lent GPU machine has no diffusers or gguf and cannot download anything:

    python3 benchmarks/gpu_check_families.py prepare DIR      # here: tiny random models saved by transformers,
                                                              # diffusers and gguf, imported into DIR/home
    OUT=... python3 benchmarks/gpu_check_families.py check DIR   # on the GPU machine (DIR carried there)

``check`` prints one line per check and writes $OUT/families.json. Without a GPU it runs with cuda replaced by
the CPU (to try the script). ``--speed`` adds the speed rows (a Qwen2-0.5B-shaped random model: tokens/s of
`studio generate text` against transformers' generate; with diffusers importable, a SD-1.5-shaped random pipeline
at 512 x 512, 20 steps, against diffusers)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TEXT = ["qwen3", "mistral", "phi3", "gemma2", "gemma3_text"]
CAPTIONS = ["a red cat on the sofa", "a blue dog", "a red dog on the sofa", "a blue cat"]


def studio(*args) -> tuple:
    """``studio ARGS`` in this process: (exit code, stdout, stderr)."""
    from studio.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def prepare(d: Path) -> None:
    import numpy as np
    from PIL import Image

    import gguf
    from caption_refs import save_blip
    from onnx_fixtures import text_folder
    from sd_fixtures import save_pipeline
    from test_text_families import save_tiny
    from test_text_gguf import TEXT as GGUF_TEXT, _model, write_gguf
    from tokenizers import ByteLevelBPETokenizer

    os.environ["STUDIO_HOME"] = str(d / "home")
    src = d / "src"
    src.mkdir(parents=True, exist_ok=True)
    for case in TEXT:
        save_tiny(case, src / case)
    text_folder(src / "llama", "llama")
    text_folder(src / "gpt2", "gpt2")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([GGUF_TEXT] * 20, vocab_size=320, min_frequency=1, special_tokens=["<|end|>"])
    tok.save(str(src / "bpe.json"))
    write_gguf(_model("qwen2"), "qwen2", src / "bpe.json", src / "tiny-qwen2.Q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
    for variant in ("sd1", "inpaint"):
        save_pipeline(src / f"sd-{variant}", variant)
    save_blip(src / "blip")
    for name in TEXT + ["llama", "gpt2", "sd-sd1", "sd-inpaint", "blip"]:
        code, _, err = studio("models", "import", src / name, "--name", name)
        assert code == 0, err
    code, _, err = studio("models", "import", src / "tiny-qwen2.Q8_0.gguf", "--name", "gguf-qwen2")
    assert code == 0, err
    data = d / "data"
    (data / "text").mkdir(parents=True, exist_ok=True)
    (data / "text" / "words.txt").write_text(" ".join(f"w{i % 60 + 2}" for i in range(3000)))
    (data / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        a = np.zeros((48, 40, 3), np.uint8)
        a[:, :] = rng.integers(0, 255, 3)
        a[10:30, 8:28] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(data / "images" / f"im{i}.png")
        (data / "images" / f"im{i}.txt").write_text(CAPTIONS[i % 4])
    mask = np.zeros((48, 40), np.uint8)
    mask[8:32, 8:32] = 255
    Image.fromarray(mask).save(data / "mask.png")
    print("prepared", d)


def diff_images(a: str, b: str) -> dict:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a)).astype(int)
    y = np.asarray(Image.open(b)).astype(int)
    return {"max_pixel_diff": int(np.abs(x - y).max()), "mean_pixel_diff": round(float(np.abs(x - y).mean()), 3)}


def check(d: Path, out: Path, speed: bool) -> None:
    import torch

    os.environ["STUDIO_HOME"] = str(out / "home")
    if not (out / "home" / "models").exists():
        import shutil

        shutil.copytree(d / "home", out / "home", dirs_exist_ok=True)
    cuda = "cuda" if torch.cuda.is_available() else "cpu"
    print("devices:", cuda, torch.__version__, torch.cuda.get_device_name(0) if cuda == "cuda" else "", flush=True)
    rows = []

    def row(name: str, **fields) -> None:
        rows.append({"check": name, **fields})
        print(json.dumps(rows[-1]), flush=True)
        (out / "families.json").write_text(json.dumps(rows, indent=1))

    def gen(kind, device, *args) -> dict:
        t0 = time.perf_counter()
        code, stdout, err = studio("generate", kind, "--device", device, "--json", *args)
        wall = time.perf_counter() - t0
        if code != 0:
            return {"error": (err.strip().splitlines() or ["exit %s" % code])[-1][:300]}
        got = json.loads(stdout.strip().splitlines()[-1])
        got["wall_s"] = round(wall, 3)
        return got

    def both(name, kind, *args, compare=None) -> None:
        """The same generation on cuda and on the CPU."""
        try:
            a, b = gen(kind, cuda, *args), gen(kind, "cpu", *args)
            if "error" in a or "error" in b:
                row(name, ok=False, cuda_error=a.get("error"), cpu_error=b.get("error"))
                return
            row(name, ok=True, cuda_s=a["wall_s"], cpu_s=b["wall_s"], **(compare(a, b) if compare else {}))
        except Exception as exc:  # a check that breaks is a finding, not the end of the run
            row(name, ok=False, exception=f"{type(exc).__name__}: {exc}"[:300])

    def tokens(a, b):
        x, y = a.get("token_ids", []), b.get("token_ids", [])
        same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        return {"tokens_equal_prefix": same, "tokens": len(x), "text_equal": a.get("text") == b.get("text")}

    def images(a, b):
        return diff_images(a["path"], b["path"])

    greedy = ("--prompt", "w7 w3 w9", "--seed", "1", "--set", "temperature=0", "--set", "max_new_tokens=24")
    for name in TEXT + ["llama", "gpt2"]:
        both(f"generate text {name}", "text", "--model", name, *greedy, compare=tokens)
    both("generate text gguf-qwen2 (Q8_0 import)", "text", "--model", "gguf-qwen2", "--prompt", "the", "--seed", "1",
         "--set", "temperature=0", "--set", "max_new_tokens=24", compare=tokens)
    both("generate text gemma2 sampled", "text", "--model", "gemma2", "--prompt", "w5 w6", "--seed", "7",
         "--set", "max_new_tokens=24", compare=tokens)
    msgs = out / "messages.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "the"}]))
    both("generate chat gguf-qwen2 (template)", "chat", "--model", "gguf-qwen2", "--messages", msgs, "--seed", "1",
         "--set", "temperature=0", "--set", "max_new_tokens=12", compare=tokens)

    # reference parity on the GPU: our network against transformers', fp32 on cuda
    try:
        from transformers import AutoModelForCausalLM

        from plugins.text.models import load_model

        for name in TEXT:
            folder = out / "home" / "models" / name
            ours = load_model(folder, "gemma3_text" if name == "gemma3_text" else name, cuda, torch.float32)
            ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(3)).to(cuda)
            diffs = {}
            for impl in ("eager", None):  # the written-out reference, and what transformers picks by default
                ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **(
                    {"attn_implementation": impl} if impl else {})).to(cuda).eval()
                with torch.no_grad():
                    diff = float((ours(ids, use_cache=False)[0] - ref(input_ids=ids).logits).abs().max())
                diffs[ref.config._attn_implementation if impl is None else "eager"] = diff
            row(f"logits vs transformers on {cuda} fp32: {name}", ok=diffs["eager"] < 1e-3, max_abs_diff=diffs)
    except Exception as exc:
        row("logits vs transformers", ok=False, exception=f"{type(exc).__name__}: {exc}"[:300])

    img = d / "data" / "images" / "im1.png"
    sd = ("--model", "sd-sd1", "--prompt", "a red cat on the sofa", "--seed", "3", "--set", "steps=8",
          "--set", "width=32", "--set", "height=32")
    for label, extra in (("txt2img", ()), ("img2img", ("--image", img, "--set", "strength=0.6"))):
        both(f"generate sd {label}", "sd", *sd, *extra, compare=images)
    both("generate sd inpaint (9-channel)", "sd", "--model", "sd-inpaint", "--prompt", "a blue dog", "--seed", "3",
         "--set", "steps=8", "--set", "width=32", "--set", "height=32", "--image", img, "--mask",
         d / "data" / "mask.png", "--set", "keep_unmasked=true",
         compare=images)
    both("generate caption blip beam 3", "caption", "--model", "blip", "--image", img, "--set", "num_beams=3",
         compare=tokens)
    both("generate caption built-in", "caption", "--image", img, compare=tokens)
    both("generate image built-in", "image", "--prompt", "a large green triangle in the bottom right on a blue "
         "background", "--seed", "3", compare=images)

    # fine-tuning on the GPU (fp32) and on the CPU, the same seed: the losses, the time per step, then the adapter
    runs = {"text": ("llama", d / "data" / "text", ("--steps", "12", "--batch", "4", "--context", "32")),
            "image": ("shapes-diffusion", d / "data" / "images", ("--steps", "6", "--batch", "4",
                                                                  "--sample-steps", "4")),
            "caption": ("shapes-captioner", d / "data" / "images", ("--steps", "6", "--batch", "4")),
            "sd": ("sd-sd1", d / "data" / "images", ("--steps", "6", "--batch", "2", "--resolution", "32",
                                                     "--sample-steps", "4"))}
    adapters = {}
    for kind, (model, data, extra) in runs.items():
        try:
            got = {}
            for i, device in enumerate((cuda, "cpu")):
                folder = out / "ft" / f"{kind}-{i}-{device}"
                t0 = time.perf_counter()
                code, stdout, err = studio("finetune", kind, "--model", model, "--data", data, "--out", folder,
                                           "--device", device, "--eval-every", "3", "--json", *extra)
                lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
                steps = [x for x in lines if "step" in x]
                got[device] = {"code": code, "s": round(time.perf_counter() - t0, 2),
                               "s_per_step": steps[-1]["seconds_per_step"] if steps else None,
                               "losses": [x["loss"] for x in steps], "val": [x["val_loss"] for x in steps
                                                                              if "val_loss" in x],
                               "err": err.strip().splitlines()[-1][:300] if code else "",
                               "says_device": f" on {device}:" in err}
                adapters.setdefault((kind, device), folder / "adapter")
            a, b = got[cuda], got["cpu"]
            close = bool(a["losses"]) and len(a["losses"]) == len(b["losses"]) and all(
                abs(x - y) <= 2e-2 * max(1.0, abs(y)) for x, y in zip(a["losses"], b["losses"]))
            row(f"finetune {kind}", ok=a["code"] == 0 and b["code"] == 0 and close, cuda=a, cpu=b)
        except Exception as exc:
            row(f"finetune {kind}", ok=False, exception=f"{type(exc).__name__}: {exc}"[:300])
    lora = adapters.get(("text", cuda))
    if lora is not None:
        both("generate text llama --lora (trained on cuda)", "text", "--model", "llama", *greedy, "--lora", lora,
             compare=tokens)
    lora = adapters.get(("sd", cuda))
    if lora is not None:
        both("generate sd --lora (trained on cuda)", "sd", *sd, "--lora", lora / "adapter.safetensors",
             compare=images)
    if speed:
        speed_rows(d / "data", out, cuda, row, small=cuda == "cpu")
    print("done:", sum(r.get("ok", True) for r in rows), "of", len(rows), "checks ok")


def finetune_speed(out: Path, row, kind: str, model: str, data: Path, *extra) -> None:
    """``studio finetune KIND`` on the default device: its seconds per step (the mean up to the last step)."""
    code, stdout, err = studio("finetune", kind, "--model", model, "--data", data, "--out", out / "ft-speed" / kind,
                               "--eval-every", "1000", "--json", *extra)
    steps = [json.loads(x) for x in stdout.splitlines() if x.startswith("{") and '"step"' in x]
    row(f"speed: finetune {kind} on {model}", ok=code == 0 and bool(steps), flags=list(extra),
        s_per_step=steps[-1]["seconds_per_step"] if steps else None, err=err.strip()[-300:] if code else "")


def speed_rows(data: Path, out: Path, cuda: str, row, small: bool = False) -> None:
    """``small``: tiny shapes, to try the code without a GPU (the figures then mean nothing)."""
    import torch

    from onnx_fixtures import word_tokenizer

    # Qwen2-0.5B's shapes, random weights: decode tokens/s of the studio and of transformers, fp16, greedy
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        folder = out / "qwen05"
        shape = (dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4) if small else
                 dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14))
        cfg = Qwen2Config(**shape, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                          bos_token_id=0, eos_token_id=1)
        torch.manual_seed(0)
        with torch.device(cuda):
            model = Qwen2ForCausalLM(cfg).to(torch.float16).eval()
        model.save_pretrained(folder)
        word_tokenizer(64).save(str(folder / "tokenizer.json"))
        n = 16 if small else 256
        args = ("text", "--model", folder, "--prompt", "w2 w3 w4 w5", "--seed", "1", "--set", "temperature=0",
                "--set", f"max_new_tokens={n}")
        code, _, _ = studio("generate", "--device", cuda, "--json", *args)  # warm-up (load, kernels)
        code, stdout, err = studio("generate", "--device", cuda, "--json", *args)
        got = json.loads(stdout.strip().splitlines()[-1]) if code == 0 else {}
        ours = len(got.get("token_ids", [])) / got["timings"]["generate_s"] if got else None
        ids = torch.tensor([[2, 3, 4, 5, 6]], device=cuda)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            if cuda == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            if cuda == "cuda":
                torch.cuda.synchronize()
            theirs = n / (time.perf_counter() - t0)
        row("speed: Qwen2-0.5B shape, fp16 greedy decode tok/s", ok=code == 0, studio=ours and round(ours, 1),
            transformers=round(theirs, 1), tokens=len(got.get("token_ids", [])), err=err[-300:] if code else "")
        del model
        code, _, err = studio("models", "import", folder, "--name", "qwen05-shape")
        assert code == 0, err
        finetune_speed(out, row, "text", "qwen05-shape", data / "text", "--context", "256", "--batch", "4",
                       "--steps", "2" if small else "10")
    except Exception as exc:
        row("speed: Qwen2-0.5B shape", ok=False, exception=f"{type(exc).__name__}: {exc}"[:300])
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        row("speed: SD-1.5 shape", ok=True, skipped="diffusers is not installed")
        return
    try:
        sd_speed(data, out, cuda, row, small)
    except Exception as exc:
        row("speed: SD-1.5 shape", ok=False, exception=f"{type(exc).__name__}: {exc}"[:300])


def sd_speed(data: Path, out: Path, cuda: str, row, small: bool) -> None:
    """A random pipeline of SD 1.5's shapes (the U-Net, CLIP-L text encoder, VAE), 512 x 512, 20 DPM++ 2M Karras
    steps, guidance 7.5, fp16: seconds per image of the studio and of diffusers, each after a warm-up."""
    import torch
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_fixtures import clip_vocab

    folder = out / "sd15"
    clip_vocab(out / "sd15-tok")
    tokenizer = CLIPTokenizer(str(out / "sd15-tok" / "vocab.json"), str(out / "sd15-tok" / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    torch.manual_seed(0)
    with torch.device(cuda):
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu",
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    **({"block_out_channels": (32, 32, 64, 64)} if small else {}))
        vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32) if small else (128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512)
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        use_karras_sigmas=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    code, _, err = studio("models", "import", folder, "--name", "sd15-shape")
    assert code == 0, err
    size, steps = (64, 2) if small else (512, 20)
    args = ("sd", "--model", "sd15-shape", "--prompt", "a red cat on the sofa", "--seed", "1", "--set", f"steps={steps}",
            "--set", f"width={size}", "--set", f"height={size}")
    studio("generate", "--device", cuda, "--json", *args)  # warm-up
    code, stdout, err = studio("generate", "--device", cuda, "--json", *args)
    got = json.loads(stdout.strip().splitlines()[-1]) if code == 0 else {}
    if small:
        pipe = pipe.to(torch.float32)  # the CPU has no fp16 convolutions
    pipe("a red cat on the sofa", num_inference_steps=steps, height=size, width=size, output_type="np")  # warm-up
    if cuda == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe("a red cat on the sofa", num_inference_steps=steps, height=size, width=size, output_type="np")
    if cuda == "cuda":
        torch.cuda.synchronize()
    theirs = time.perf_counter() - t0
    row("speed: SD-1.5 shape, 512x512, 20 steps, fp16, s/image", ok=code == 0, studio=got.get("timings"),
        diffusers_s=round(theirs, 3), err=err[-300:] if code else "")
    finetune_speed(out, row, "sd", "sd15-shape", data / "images", "--resolution", str(size), "--batch", "1",
                   "--steps", "2" if small else "10")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("prepare", "check"):
        print(__doc__)
        return 2
    d = Path(argv[1]).resolve()
    if argv[0] == "prepare":
        prepare(d)
    else:
        out = Path(os.environ.get("OUT") or d / "out").resolve()
        out.mkdir(parents=True, exist_ok=True)
        check(d, out, "--speed" in argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
