"""ONNX export of the text-to-image model (CLIP-style text encoder + conditional U-Net) and its onnxruntime runner.

Graphs: ``text_encoder.onnx``: ``input_ids`` (batch, sequence) int64 -> ``last_hidden_state``, ``pooled``;
``unet.onnx``: ``sample`` (batch, channels, height, width), ``timestep`` (batch,) float32,
``encoder_hidden_states`` (batch, sequence, dim), ``pooled`` (batch, dim) -> ``out`` (batch, 3, height, width).

On onnxruntime the one sampling loop (engine.diffusion) runs on numpy arrays and needs no torch. Its noise comes
from ``engine.diffusion.torch_noise.TorchRandn``, numpy's replica of torch's CPU ``randn``, so a seed gives the
same picture on both backends (within the export's pixel tolerance).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.backends.common import max_abs

log = logging.getLogger(__name__)

UNET_TOLERANCE = 1e-3
TEXT_TOLERANCE = 1e-3
PARITY_TIMESTEPS = (999, 700, 400, 100, 1)
PARITY_SAMPLE_STEPS = 10  # a whole sampling run compared at export (same noise, both backends)
IMAGE_TOLERANCE = 4  # max |pixel difference| (0-255) of the final images of that run
N_QUALITY = 20  # captions for the int8 analyzer score


# ----- runtime (no torch) ------------------------------------------------------------------------
class OnnxTextEncoder:
    def __init__(self, session):
        self.session = session

    def __call__(self, ids):
        hidden, pooled = self.session.run(["last_hidden_state", "pooled"],
                                          {"input_ids": np.ascontiguousarray(np.asarray(ids, dtype=np.int64))})
        return hidden, pooled


class OnnxDenoiser:
    def __init__(self, session):
        self.session = session
        self.inputs = {i.name for i in session.get_inputs()}  # a U-Net without class embedding has no "pooled"

    def __call__(self, sample, timestep, hidden, pooled):
        x = np.ascontiguousarray(np.asarray(sample, dtype=np.float32))
        t = np.full((x.shape[0],), float(timestep), dtype=np.float32)
        feeds = {"sample": x, "timestep": t, "encoder_hidden_states": np.asarray(hidden, dtype=np.float32),
                 "pooled": np.asarray(pooled, dtype=np.float32)}
        return self.session.run(["out"], {k: v for k, v in feeds.items() if k in self.inputs})[0]


def load_image_model(model_folder, model_hash=None, threads=None, export=None):
    """plugins.image.pipeline.ImageNets on the onnxruntime sessions of the model's export ``export`` (default: the
    preferred one)."""
    from engine.backends.runtime import open_export

    return export_nets(open_export(Path(model_folder), model_hash, threads, export), model_folder)


def export_nets(export, model_folder):
    """plugins.image.pipeline.ImageNets on the sessions of an opened export (engine.backends.runtime.Export)."""
    from engine.diffusion import NumpyArrays
    from engine.diffusion.schedulers import SchedulerConfig
    from plugins.image.pipeline import ImageNets
    from plugins.image.tokenizer import PromptEncoder

    cfg = export.manifest["config"]
    return ImageNets(NumpyArrays(), OnnxTextEncoder(export.session("text_encoder")),
                     OnnxDenoiser(export.session("unet")), int(cfg["sample_size"]), int(cfg["coord_channels"]),
                     cfg.get("class_labels", "pooled"), SchedulerConfig.from_dict(cfg["scheduler"]),
                     PromptEncoder.from_file(Path(model_folder) / "tokenizer.json", int(cfg["context"])),
                     {"noise": "torch-compatible (engine.diffusion.torch_noise)"})


# ----- export (torch) ----------------------------------------------------------------------------
def export_image(model_ref, out_dir: Path, options: dict) -> dict:
    """Exporter registered for the text-to-image family (see engine.onnx_export for the contract)."""
    import torch

    from plugins.image.model import load
    from plugins.image.pipeline import TorchDenoiser, TorchTextEncoder
    from engine.backends.common import describe_graphs, export_graph, quantize_graphs, relative_gate, replace_graphs
    from engine.backends.runtime import open_session

    say = options.get("log") or (lambda m: None)
    torch.manual_seed(0)
    folder = Path(model_ref.path)
    loaded = load(folder, device="cpu")
    mc = loaded.cfg
    S, C, T = mc.sample_size, mc.unet.in_channels, mc.text.max_position_embeddings
    D = mc.text.hidden_size
    cfg = {"family": model_ref.family, "sample_size": S, "coord_channels": mc.coord_channels, "context": T,
           "scheduler": mc.scheduler.to_dict(), "in_channels": C, "text_dim": D,
           "class_labels": getattr(mc, "class_labels", "pooled")}
    out_dir = Path(out_dir)
    te_path, un_path = out_dir / "text_encoder.onnx", out_dir / "unet.onnx"
    say(f"exporting the text encoder and the U-Net ({S}x{S}) to ONNX")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, mc.text.vocab_size, (2, T), generator=g)
    ids[:, -1] = mc.text.eos_token_id if mc.text.eos_token_id != 2 else mc.text.vocab_size - 1

    class TextGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = loaded.text_encoder

        def forward(self, input_ids):
            return self.m(input_ids)

    class UNetGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = loaded.unet

        def forward(self, sample, timestep, encoder_hidden_states, pooled):
            return self.m(sample, timestep, encoder_hidden_states, pooled)

    export_graph(TextGraph(), (ids,), te_path, ["input_ids"], ["last_hidden_state", "pooled"],
                 {"input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
                  "pooled": {0: "batch"}})
    ex = (torch.randn(2, C, S, S, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, T, D, generator=g),
          torch.randn(2, D, generator=g))
    export_graph(UNetGraph(), ex, un_path, ["sample", "timestep", "encoder_hidden_states", "pooled"], ["out"],
                 {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                  "encoder_hidden_states": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"},
                  "out": {0: "batch", 2: "height", 3: "width"}})

    say("checking parity with PyTorch")
    t_text, t_unet = TorchTextEncoder(loaded.text_encoder), TorchDenoiser(loaded.unet)
    o_text, o_unet = OnnxTextEncoder(open_session(te_path)), OnnxDenoiser(open_session(un_path))
    enc = loaded.prompt_encoder
    prompts = ["a large red circle in the centre on a blue background", "", "a small white square top left"]
    pids = np.array([enc.encode(p).ids for p in prompts], dtype=np.int64)
    th, tp = t_text(pids)
    oh, op = o_text(pids)
    text_diff = max(max_abs(th.numpy(), oh), max_abs(tp.numpy(), op))
    rng = np.random.default_rng(0)
    unet_diff = 0.0
    x = rng.standard_normal((3, C, S, S)).astype(np.float32)
    for t in PARITY_TIMESTEPS:
        ref = t_unet(torch.from_numpy(x), float(t), th, tp).numpy()
        unet_diff = max(unet_diff, max_abs(ref, o_unet(x, float(t), oh, op)))
    parity = {"text_encoder": {"max_abs_diff": float(f"{text_diff:.3g}"), "tolerance": TEXT_TOLERANCE,
                               "passed": bool(text_diff <= TEXT_TOLERANCE), "inputs": f"{len(prompts)} prompts"},
              "unet": {"max_abs_diff": float(f"{unet_diff:.3g}"), "tolerance": UNET_TOLERANCE,
                       "passed": bool(unet_diff <= UNET_TOLERANCE),
                       "inputs": f"batch 3 at timesteps {list(PARITY_TIMESTEPS)}"}}
    image_check = compare_sampling(loaded, (t_text, t_unet), (o_text, o_unet), prompts[:2], PARITY_SAMPLE_STEPS)
    parity["sampled_images"] = image_check
    options.get("gate", lambda p: None)(parity)
    graphs, opset = describe_graphs({"text_encoder": te_path, "unet": un_path})
    result = {"graphs": graphs, "parity": parity, "config": cfg, "opset": opset}
    scheme = options.get("quantize")
    if scheme:
        say(f"quantizing the weights to {scheme}, gating them against fp32 and scoring {N_QUALITY} images with the "
            "analyzer")
        q_te, q_un = quantize_graphs({"text_encoder": te_path, "unet": un_path}, scheme).values()
        q_text, q_unet = OnnxTextEncoder(open_session(q_te)), OnnxDenoiser(open_session(q_un))
        qh, qp = q_text(pids)
        gate = {f"text_encoder_{scheme}": relative_gate([(oh, qh), (op, qp)], scheme, f"{len(prompts)} prompts"),
                f"unet_{scheme}": relative_gate([(o_unet(x, float(t), oh, op), q_unet(x, float(t), oh, op))
                                                 for t in PARITY_TIMESTEPS], scheme,
                                                f"batch 3 at timesteps {list(PARITY_TIMESTEPS)}, fp32 text states")}
        options.get("gate", lambda p: None)(gate)
        parity.update(gate)
        result["quantization"] = {"quality": image_quality(loaded, (o_text, o_unet), (q_text, q_unet), scheme)}
        del o_text, o_unet, q_text, q_unet
        replace_graphs(((q_te, te_path), (q_un, un_path)))
    return result


def _nets(loaded, text, unet, xp):
    from plugins.image.pipeline import ImageNets

    cfg = loaded.cfg
    return ImageNets(xp, text, unet, cfg.sample_size, cfg.coord_channels, getattr(cfg, "class_labels", "pooled"),
                     cfg.scheduler, loaded.prompt_encoder)


def generate(loaded, nets, captions, steps, seed, guidance=3.0, sampler="dpmpp_2m"):
    """uint8 images for ``captions``: ``nets`` a (text, unet) pair of torch wrappers or onnxruntime runners, run
    through the one sampling loop with that backend's arrays and noise (the same noise for the same seed)."""
    from engine.diffusion import NumpyArrays, SampleSettings, TorchArrays
    from plugins.image.pipeline import TorchDenoiser, generate_images

    xp = TorchArrays() if isinstance(nets[1], TorchDenoiser) else NumpyArrays()
    return generate_images(_nets(loaded, nets[0], nets[1], xp), captions, SampleSettings(steps, guidance, sampler),
                           seed)


def compare_sampling(loaded, torch_nets, onnx_nets, captions, steps) -> dict:
    from engine.shapes import analyze

    a = generate(loaded, torch_nets, captions, steps, seed=11)
    b = generate(loaded, onnx_nets, captions, steps, seed=11)
    diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    same = sum(analyze(x) == analyze(y) for x, y in zip(a, b))
    return {"max_abs_diff": float(diff), "tolerance": float(IMAGE_TOLERANCE), "passed": diff <= IMAGE_TOLERANCE,
            "analyzer_agrees": f"{same}/{len(captions)}", "units": "pixel levels 0-255",
            "inputs": f"{len(captions)} prompts, {steps} dpmpp_2m steps, guidance 3, same seed; the one sampling "
                      "loop (engine.diffusion) on torch vs on numpy and onnxruntime with TorchRandn noise"}


def analyzer_score(images, captions) -> float:
    from engine.shapes import analyze, parse_caption

    return sum(analyze(im) == parse_caption(c) for im, c in zip(images, captions)) / max(1, len(captions))


def image_quality(loaded, fp32_nets, q_nets, scheme: str = "int8", steps: int = 20) -> dict:
    from engine.shapes import caption, sample_scene

    captions = [caption(sample_scene(np.random.default_rng(i))) for i in range(N_QUALITY)]
    a = generate(loaded, fp32_nets, captions, steps, seed=3)
    b = generate(loaded, q_nets, captions, steps, seed=3)
    return {"captions": f"{N_QUALITY} scenes (seeds 0-{N_QUALITY - 1}), {steps} dpmpp_2m steps, guidance 3",
            "analyzer_all_five_onnx_fp32": round(analyzer_score(a, captions), 4),
            f"analyzer_all_five_onnx_{scheme}": round(analyzer_score(b, captions), 4),
            f"analyzer_cost_{scheme}": round(analyzer_score(a, captions) - analyzer_score(b, captions), 4),
            f"max_pixel_diff_{scheme}_vs_fp32": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())}
