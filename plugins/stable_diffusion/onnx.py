"""ONNX export of a Stable Diffusion model in the folder layout Optimum uses, and its onnxruntime networks.

The export folder opens in other tools as it is (``optimum.onnxruntime.ORTStableDiffusionPipeline``, diffusers'
``OnnxStableDiffusionPipeline`` for text to image):

    model_index.json                       the pipeline's components and their classes
    text_encoder/model.onnx, config.json   input_ids (batch, sequence) int32 -> last_hidden_state, pooler_output
    unet/model.onnx, config.json           sample (batch, C, h, w), timestep (steps,) float32 (one value for the
                                           whole batch), encoder_hidden_states (batch, sequence, D) -> out_sample
    vae_encoder/model.onnx, config.json    sample (batch, 3, H, W) -> latent_parameters (batch, 2 x 4, h, w):
                                           the latent distribution's mean and log-variance (Optimum's output;
                                           the caller draws the sample, so the seed decides it)
    vae_decoder/model.onnx, config.json    latent_sample (batch, 4, h, w) -> sample (batch, 3, H, W)
    tokenizer/                             vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json
    onnx.json                              the studio's manifest (parity figures, file hashes)

Each graph's weights lie in ``model.onnx.data`` beside it. On onnxruntime the studio runs the same pipeline
(plugins/stable_diffusion/pipeline.py) on numpy arrays with no torch: text to image, img2img and inpainting, with
torch-compatible noise, so a seed gives the torch backend's picture within the export's pixel tolerance.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from engine.backends.common import max_abs

PARITY_LATENTS = 16  # latents per side of the parity inputs (128 x 128 pixels): cheap even for SD 1.5 sizes
PARITY_TIMESTEPS = (999, 500, 1)
TOLERANCE = 1e-3  # max |difference| relative to the output's largest magnitude (at least 1)
SAMPLE_STEPS = 3
IMAGE_TOLERANCE = 4  # max |pixel difference| (0-255) of a whole sampling run, torch against onnxruntime
COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


# ----- runtime (no torch) ------------------------------------------------------------------------
def onnx_nets(export, model_folder: Path):
    """plugins.stable_diffusion.pipeline.SDNets on the sessions of an opened export (engine.backends.runtime)."""
    from engine.diffusion import NumpyArrays
    from engine.diffusion.schedulers import SchedulerConfig
    from plugins.stable_diffusion.model import read_config
    from plugins.stable_diffusion.pipeline import SDNets
    from plugins.stable_diffusion.tokenizer import ClipTokenizer

    cfg = read_config(Path(model_folder))
    text_s, unet_s, dec_s = (export.session(c) for c in ("text_encoder", "unet", "vae_decoder"))
    f32 = np.float32  # the VAE encoder opens at its first use (img2img, inpainting): text to image never needs it

    def text(ids):
        return text_s.run(["last_hidden_state"], {"input_ids": np.asarray(ids, dtype=np.int32)})[0]

    def unet(x, t, context):
        return unet_s.run(["out_sample"], {"sample": np.ascontiguousarray(x, dtype=f32),
                                           "timestep": np.array([t], dtype=f32),
                                           "encoder_hidden_states": np.ascontiguousarray(context, dtype=f32)})[0]

    def vae_encode(x):
        params = export.session("vae_encoder").run(["latent_parameters"], {"sample": np.ascontiguousarray(x, dtype=f32)})[0]
        mean, logvar = np.split(params, 2, axis=1)
        return mean, np.exp(f32(0.5) * logvar)

    def vae_decode(z):
        return dec_s.run(["sample"], {"latent_sample": np.ascontiguousarray(z, dtype=f32)})[0]

    vae = cfg["vae"]
    factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    size = vae.get("sample_size", 512)
    size = size[0] if isinstance(size, (list, tuple)) else size
    tok = ClipTokenizer(Path(model_folder), (cfg.get("tokenizer") or {}).get("pad_token", "<|endoftext|>"))
    return SDNets(NumpyArrays(), cfg, tok, SchedulerConfig.from_dict(cfg["scheduler"]), text, unet, vae_encode,
                  vae_decode, int(cfg["unet"].get("in_channels", 4)), int(cfg["unet"].get("out_channels", 4)),
                  factor, float(vae.get("scaling_factor", 0.18215)), int(size) // factor)


def load_onnx(model_folder: Path, model_hash=None, export=None):
    from engine.backends.runtime import open_export

    opened = open_export(Path(model_folder), model_hash, None, export)
    return onnx_nets(opened, model_folder)


# ----- export (torch) ----------------------------------------------------------------------------
def _graphs(sd):
    """The four torch modules to trace, with Optimum's inputs and outputs."""
    import torch

    class TextGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = sd.text_encoder

        def forward(self, input_ids):
            return self.m(input_ids.to(torch.int64))

    class UNetGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = sd.unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.m(sample, timestep, encoder_hidden_states)

    class EncoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = sd.vae

        def forward(self, sample):
            return torch.cat(self.m.encode(sample), dim=1)

    class DecoderGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = sd.vae

        def forward(self, latent_sample):
            return self.m.decode(latent_sample)

    return {"text_encoder": TextGraph(), "unet": UNetGraph(), "vae_encoder": EncoderGraph(),
            "vae_decoder": DecoderGraph()}


def _write_configs(out: Path, cfg: dict, model_folder: Path) -> None:
    """Optimum's component configs, tokenizer and scheduler folders and model_index.json."""
    v_pred = cfg.get("prediction_type") == "v_prediction"
    scheduler = "DDIMScheduler" if v_pred else "PNDMScheduler"  # what the SD 2.x / 1.x repositories ship
    vae = {"_class_name": "AutoencoderKL", **cfg["vae"]}
    text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **cfg["text_encoder"]}
    files = {"unet/config.json": {"_class_name": "UNet2DConditionModel", **cfg["unet"]},
             "vae_encoder/config.json": vae, "vae_decoder/config.json": vae, "text_encoder/config.json": text,
             "scheduler/scheduler_config.json": {"_class_name": scheduler, **cfg["scheduler"]}}
    pad = (cfg.get("tokenizer") or {}).get("pad_token", "<|endoftext|>")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    files["tokenizer/special_tokens_map.json"] = special
    files["tokenizer/tokenizer_config.json"] = {**special, "model_max_length": 77, "do_lower_case": True,
                                                "tokenizer_class": "CLIPTokenizer"}
    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    files["model_index.json"] = {
        "_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": "0.42.1",  # the version it was checked with
        "text_encoder": onnx_model, "unet": onnx_model, "vae_encoder": onnx_model, "vae_decoder": onnx_model,
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(model_folder) / name, out / "tokenizer" / name)


def _figure(ref, got, inputs: str) -> dict:
    diff = max(max_abs(r, g) for r, g in zip(ref, got))
    scale = max([1.0] + [float(np.abs(np.asarray(r)).max()) for r in ref])
    tol = float(f"{TOLERANCE * scale:.3g}")
    return {"max_abs_diff": float(f"{diff:.3g}"), "tolerance": tol, "passed": bool(diff <= tol),
            "rule": f"max |onnx - torch| <= {TOLERANCE:g} x max(1, max |torch|)", "inputs": inputs}


def _parity(sd, torch_nets, onnx_nets, text_session) -> dict:
    """Each graph against its torch module on fixed inputs, then a whole sampling run on both backends."""
    import torch

    from plugins.stable_diffusion.prompts import chunks

    rng = np.random.default_rng(0)
    prompts = ["a red cat on a blue sofa", "", "a painting of a photo of a dog, " * 6]
    tok = torch_nets.tokenizer
    ids = np.array([chunks(p, tok.tokens, tok.bos, tok.eos, tok.pad, -1)[0][0] for p in prompts], dtype=np.int64)
    th, oh = torch_nets.text(ids), onnx_nets.text(ids)
    with torch.no_grad():
        tp = sd.text_encoder(torch.from_numpy(ids))[1].numpy()
    op = text_session.run(["pooler_output"], {"input_ids": ids.astype(np.int32)})[0]
    parity = {"text_encoder": _figure([th, tp], [oh, op], f"{len(prompts)} prompts")}
    s, f = PARITY_LATENTS, torch_nets.factor
    x = rng.standard_normal((2, torch_nets.in_channels, s, s)).astype(np.float32)
    context = rng.standard_normal((2, 77, th.shape[-1])).astype(np.float32)
    refs, gots = [], []
    for t in PARITY_TIMESTEPS:
        refs.append(torch_nets.unet(torch.from_numpy(x), float(t), torch.from_numpy(context)).numpy())
        gots.append(onnx_nets.unet(x, float(t), context))
    parity["unet"] = _figure(refs, gots, f"batch 2, {s}x{s} latents, timesteps {list(PARITY_TIMESTEPS)}")
    image = np.clip(rng.standard_normal((1, 3, s * f, s * f)), -1, 1).astype(np.float32)
    (tm, ts), (om, os_) = torch_nets.vae_encode(torch.from_numpy(image)), onnx_nets.vae_encode(image)
    parity["vae_encoder"] = _figure([tm.numpy(), ts.numpy()], [om, os_], f"an image of {s * f}x{s * f} pixels")
    z = rng.standard_normal((1, torch_nets.out_channels, s, s)).astype(np.float32)
    parity["vae_decoder"] = _figure([torch_nets.vae_decode(torch.from_numpy(z)).numpy()], [onnx_nets.vae_decode(z)],
                                    f"{s}x{s} latents")
    parity["sampled_images"] = compare_sampling(torch_nets, onnx_nets, s * f)
    return parity


def generate(nets, size: int, steps: int = SAMPLE_STEPS, seed: int = 11, prompt: str = "a red cat on a blue sofa"):
    from engine.diffusion import SampleSettings, to_uint8
    from plugins.stable_diffusion.pipeline import decode, sample

    latents = None
    for _, _, latents in sample(nets, prompt, "", SampleSettings(steps, 7.5, "dpmpp_2m"), seed, size, size):
        pass
    return to_uint8(decode(nets, latents))


def compare_sampling(torch_nets, onnx_nets, size: int) -> dict:
    a, b = generate(torch_nets, size), generate(onnx_nets, size)
    diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    return {"max_abs_diff": float(diff), "tolerance": float(IMAGE_TOLERANCE), "passed": diff <= IMAGE_TOLERANCE,
            "units": "pixel levels 0-255",
            "inputs": f"one prompt, {size}x{size}, {SAMPLE_STEPS} dpmpp_2m steps, guidance 7.5, the same seed: the "
                      "one pipeline on torch vs on numpy and onnxruntime with torch-compatible noise"}


def export_sd(model_ref, out_dir: Path, options: dict) -> dict:
    """Exporter registered for the stable-diffusion family (see engine/hookspecs.py register_exporters)."""
    import torch

    from engine.backends.common import describe_graphs, export_graph, quantize_graph, relative_gate
    from engine.backends.runtime import open_session
    from plugins.stable_diffusion.model import load
    from plugins.stable_diffusion.pipeline import torch_nets as make_torch_nets

    say = options.get("log") or (lambda m: None)
    folder, out = Path(model_ref.path), Path(out_dir)
    sd = load(folder, device="cpu")
    cfg = sd.cfg
    tn = make_torch_nets(sd)
    graphs = _graphs(sd)
    s, f, D = PARITY_LATENTS, tn.factor, sd.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    examples = {
        "text_encoder": ((torch.randint(0, sd.text_encoder.config.vocab_size - 1, (1, 77), generator=g,
                                        dtype=torch.int32),),
                         ["input_ids"], ["last_hidden_state", "pooler_output"],
                         {"input_ids": {0: "batch_size", 1: "sequence_length"},
                          "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                          "pooler_output": {0: "batch_size"}}),
        "unet": ((torch.randn(2, tn.in_channels, s, s, generator=g), torch.tensor([500.0]),
                  torch.randn(2, 77, D, generator=g)),
                 ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                 {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "steps"},
                  "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                  "out_sample": {0: "batch_size", 2: "height", 3: "width"}}),
        "vae_encoder": ((torch.rand(1, 3, s * f, s * f, generator=g) * 2 - 1,), ["sample"], ["latent_parameters"],
                        {"sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
                         "latent_parameters": {0: "batch_size", 2: "latent_height", 3: "latent_width"}}),
        "vae_decoder": ((torch.randn(1, tn.out_channels, s, s, generator=g),), ["latent_sample"], ["sample"],
                        {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
                         "sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"}}),
    }
    paths = {}
    for name in COMPONENTS:
        say(f"exporting the {name.replace('_', ' ')} to ONNX")
        (out / name).mkdir(parents=True, exist_ok=True)
        paths[name] = out / name / "model.onnx"
        args, inputs, outputs, axes = examples[name]
        export_graph(graphs[name], args, paths[name], inputs, outputs, axes)
    _write_configs(out, cfg, folder)

    sessions = {name: open_session(path) for name, path in paths.items()}
    opened = SimpleNamespace(session=sessions.__getitem__)  # as engine.backends.runtime.Export gives them

    say("checking parity with PyTorch (each graph, then a short sampling run on both backends)")
    on = onnx_nets(opened, folder)
    parity = _parity(sd, tn, on, sessions["text_encoder"])
    options.get("gate", lambda p: None)(parity)
    described, opset = describe_graphs(paths)
    for name, graph in described.items():
        graph["file"] = f"{name}/model.onnx"
    result = {"graphs": described, "parity": parity, "opset": opset,
              "config": {"family": model_ref.family, "layout": "optimum-stable-diffusion",
                         "variant": cfg.get("variant"), "prediction_type": cfg.get("prediction_type")}}
    scheme = options.get("quantize")
    if scheme:
        say(f"quantizing the U-Net's MatMul weights to {scheme} and gating it against fp32")
        q = paths["unet"].with_name(f"model.{scheme}.onnx")
        quantize_graph(paths["unet"], q, scheme)
        qs = open_session(q)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((2, tn.in_channels, s, s)).astype(np.float32)
        context = on.text(np.array([[tn.tokenizer.bos] + [tn.tokenizer.eos] * 76] * 2, dtype=np.int64))
        pairs = [(on.unet(x, float(t), context),
                  qs.run(["out_sample"], {"sample": x, "timestep": np.array([t], np.float32),
                                          "encoder_hidden_states": context})[0]) for t in PARITY_TIMESTEPS]
        gate = {f"unet_{scheme}": relative_gate(pairs, scheme, f"batch 2, {s}x{s} latents, timesteps "
                                                f"{list(PARITY_TIMESTEPS)}, empty-prompt text states")}
        options.get("gate", lambda p: None)(gate)
        parity.update(gate)
        del qs, on, opened, sessions
        for p in (paths["unet"], paths["unet"].with_name("model.onnx.data")):
            p.unlink(missing_ok=True)
        q.rename(paths["unet"])
        result["quantization"] = {"graphs": ["unet"], "fp32": ["text_encoder", "vae_encoder", "vae_decoder"]}
    return result

