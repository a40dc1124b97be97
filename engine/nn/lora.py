"""LoRA: low-rank adapters on linear layers, for every family, in the file formats other tools read.

An adapter on a layer ``W`` (out x in) adds ``scale * B @ A`` with ``A`` (r x in), ``B`` (out x r) and
``scale = alpha / r`` (Hu et al. 2021, eq. 3): ``y = W x + scale * B (A dropout(x))``. Training freezes the base
and learns ``A`` and ``B`` (``B`` starts at zero, so an untrained adapter changes nothing).

    wrap(model, LoraSpec(rank=8, alpha=16, targets=("q_proj", "v_proj")))   # adds a trainable adapter "default"
    save_peft(model, folder, base_model="shakespeare-llama")                 # adapter_model.safetensors + config
    attach(model, read_adapter(path), weight=0.8, name="style")             # load one (PEFT or kohya) for use
    merge(model)                                                            # fold every adapter into W

Module paths are the model's own parameter paths, which match the reference libraries (transformers,
diffusers), so the PEFT file of ``model.layers.0.self_attn.q_proj`` holds
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, and the kohya file of the U-Net's
``down_blocks.0.attentions.0.proj_in`` holds ``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight``.
GPT-2's ``Conv1D`` layers (weight in x out) take adapters too (PEFT's ``fan_in_fan_out``).

Layers a network keeps apart but its files fuse (Phi-3): engine/nn/fused.py. New tokens (PEFT's trainable tokens):
engine/nn/new_tokens.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from engine.errors import ModelError, UsageError
from engine.generators import ADAPTER_WEIGHT_FILES, adapter_weights
from engine.nn.fused import fuse, fused_targets, split_fused
from engine.nn.new_tokens import TOKENS_KEY, TokenRows, add_token_rows, token_rows

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")  # module-name suffixes (PEFT's target_modules)


@dataclass
class Adapter:
    """One adapter read from a file: per module path, ``A`` (r x in), ``B`` (out x r) and its scale."""
    layers: dict  # path -> (A, B, scale)
    spec: LoraSpec
    format: str  # "peft" | "kohya"
    source: str = ""
    meta: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)  # path -> (token ids, rows (n x width)): PEFT's trainable tokens


class LoraLayer(nn.Module):
    """A linear (or GPT-2 Conv1D) layer with adapters beside it. ``base`` keeps its own parameter names."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.conv2d = isinstance(base, nn.Conv2d)  # a 1x1 convolution (SD 1.x's proj_in/out): linear on channels
        self.conv1d = not isinstance(base, nn.Linear) and not self.conv2d  # GPT-2's Conv1D: weight is (in, out)
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scales: dict = {}
        self.drop = nn.ModuleDict()

    def add(self, name: str, rank: int, scale: float, dropout: float = 0.0, A=None, B=None,
            generator: Optional[torch.Generator] = None) -> None:
        if A is None and (rank < 1 or rank > min(self.in_features, self.out_features)):  # a new adapter
            raise UsageError(f"A LoRA rank of {rank} does not fit a {self.out_features} x {self.in_features} layer; "
                             f"choose 1 to {min(self.in_features, self.out_features)}.")
        w = self.base.weight
        if A is None:
            A = torch.empty(rank, self.in_features, dtype=torch.float32)  # drawn on the CPU: the same on any device
            nn.init.kaiming_uniform_(A, a=5 ** 0.5, generator=generator)  # as PEFT initialises lora_A
            B = torch.zeros(self.out_features, rank, dtype=torch.float32)
        self.lora_A[name] = nn.Parameter(A.to(device=w.device, dtype=w.dtype))
        self.lora_B[name] = nn.Parameter(B.to(device=w.device, dtype=w.dtype))
        self.scales[name] = float(scale)
        self.drop[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self):  # what code that reads layer.weight (dtype, device, export) expects
        return self.base.weight

    def delta(self, name: str) -> torch.Tensor:
        """scale * B @ A in the base weight's layout."""
        d = self.scales[name] * (self.lora_B[name] @ self.lora_A[name])
        return d.t() if self.conv1d else (d[:, :, None, None] if self.conv2d else d)

    def forward(self, x):
        y = self.base(x)
        for name in self.lora_A:
            a, b = self.lora_A[name], self.lora_B[name]
            h = self.drop[name](x).to(a.dtype)
            if self.conv2d:  # channels first: (B, C, H, W)
                d = torch.einsum("bchw,rc,or->bohw", h, a, b)
            else:
                d = h @ a.t() @ b.t()
            y = y + self.scales[name] * d.to(y.dtype)
        return y


def _matches(path: str, targets) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def _layer(model: nn.Module, path: str) -> LoraLayer:
    """The LoraLayer at ``path``, wrapping the plain layer there first."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, child)
    if isinstance(module, LoraLayer):
        return module
    if not _adaptable(module):
        raise UsageError(f"LoRA needs a linear layer (or a 1x1 convolution), and {path} is a "
                         f"{type(module).__name__}.")
    wrapped = LoraLayer(module)
    setattr(parent, child, wrapped)
    return wrapped


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _adaptable(m: nn.Module) -> bool:
    """A linear layer, GPT-2's Conv1D, or a 1x1 convolution without groups."""
    if getattr(m, "weight", None) is None:
        return False
    if isinstance(m, nn.Conv2d):
        return m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1)
    return m.weight.dim() == 2 and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")


def linear_paths(model: nn.Module) -> list:
    return [n for n, m in model.named_modules() if not isinstance(m, LoraLayer) and n and _adaptable(m)]


def wrap(model: nn.Module, spec: LoraSpec, name: str = "default", seed: int = 0) -> list:
    """Freeze ``model`` and add a trainable adapter on every linear layer whose path ends with a target (``A``
    drawn from ``seed``, ``B`` zero); returns the paths. UsageError when no layer matches (naming the layers there
    are)."""
    paths = [p for p in linear_paths(model) if _matches(p, spec.targets)]
    if not paths:
        names = sorted({p.rsplit(".", 1)[-1] for p in linear_paths(model)})
        raise UsageError(f"No layer matches the LoRA targets {', '.join(spec.targets)}; this model's linear layers "
                         f"are named {', '.join(names)}.")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for path in paths:
        _layer(model, path).add(name, spec.rank, spec.alpha / spec.rank, spec.dropout, generator=generator)
    return paths


def trainable(model: nn.Module) -> list:
    """(name, parameter) of what trains: the adapters and new-token rows (``wrap`` froze the rest)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: nn.Module, name: str = "default") -> dict:
    """path -> (A, B) of one adapter, float32 on the CPU."""
    return {path: (m.lora_A[name].detach().float().cpu(), m.lora_B[name].detach().float().cpu())
            for path, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A}


# ----- files ---------------------------------------------------------------------------------------
def save_peft(model: nn.Module, folder, spec: LoraSpec, base_model: str = "", task_type: str = "CAUSAL_LM",
              name: str = "default") -> Path:
    """PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json`` (``PeftModel.from_pretrained``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, conv1d = {}, False
    layers, fused = fuse(model, adapter_state(model, name))
    modules = dict(model.named_modules())
    for path, (A, B) in layers.items():
        state[f"base_model.model.{path}.lora_A.weight"] = A.contiguous()
        state[f"base_model.model.{path}.lora_B.weight"] = B.contiguous()
        conv1d = conv1d or getattr(modules.get(path), "conv1d", False)  # a fused layer: not a module
    tokens = token_rows(model)
    for path, (ids, rows) in tokens.items():
        state[f"base_model.model.{path}.{TOKENS_KEY}"] = rows.clone()  # tied layers share one tensor
    save_file(state, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": task_type, "r": spec.rank, "lora_alpha": spec.alpha,
              "lora_dropout": spec.dropout, "target_modules": sorted(fused_targets(model, spec.targets)),
              "rank_pattern": {k: spec.rank * n for k, n in fused.items()},
              "alpha_pattern": {k: spec.alpha * n for k, n in fused.items()}, "bias": "none",
              "fan_in_fan_out": conv1d, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
              "base_model_name_or_path": base_model, "init_lora_weights": True,
              "trainable_token_indices": {p: ids for p, (ids, _) in tokens.items()} or None}
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def save_kohya(model, path, spec: LoraSpec, component: str = "unet", name: str = "default",
               metadata: Optional[dict] = None) -> Path:
    """kohya-ss's single file: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
    (``lora_te_`` for a text encoder). ``model``: one module (saved as ``component``), or {component: module}."""
    from safetensors.torch import save_file

    state = {}
    for comp, module in (model.items() if isinstance(model, dict) else [(component, model)]):
        prefix = KOHYA_PREFIXES[comp]
        for p, (A, B) in adapter_state(module, name).items():
            key = prefix + p.replace(".", "_")
            state[key + ".lora_down.weight"] = A.contiguous()
            state[key + ".lora_up.weight"] = B.contiguous()
            state[key + ".alpha"] = torch.tensor(float(spec.alpha))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
            "ss_network_alpha": str(spec.alpha), **(metadata or {})}
    path = Path(path)
    save_file(state, str(path), metadata=meta)
    return path


def read_adapter(path, component_paths: Optional[dict] = None) -> Adapter:
    """A PEFT folder (or its ``adapter_model.safetensors``) or a kohya ``.safetensors`` file.

    ``component_paths``: for kohya files, {component: [module paths]} of the model the file is meant for, to
    turn ``lora_unet_down_blocks_0_...`` back into ``down_blocks.0...`` (underscores are ambiguous)."""
    from safetensors import safe_open

    path = Path(path)
    file = adapter_weights(path)
    if not file.is_file():
        raise UsageError(f"{path} is neither a LoRA folder (with {' or '.join(ADAPTER_WEIGHT_FILES)}) nor a LoRA "
                         ".safetensors file.")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise ModelError(f"{file.name} is not a readable safetensors file ({exc}).") from None
    if any(k.endswith(".lora_down.weight") for k in tensors):
        return _read_kohya(tensors, meta, str(path), component_paths or {})
    config_path = (path if path.is_dir() else path.parent) / PEFT_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return _read_peft(tensors, config, str(path), {} if config else packed_configs(meta, str(path)))


def packed_configs(meta: dict, source: str) -> dict:
    """The per-component PEFT configs that diffusers' ``save_lora_weights`` packs into a file's header
    (``lora_adapter_metadata``: ``{"unet.r": 4, "unet.lora_alpha": 16, "text_encoder.r": ...}``), by component."""
    packed = meta.get("lora_adapter_metadata")
    if not packed:
        return {}
    try:
        flat = json.loads(packed)
    except ValueError:
        flat = None
    if not isinstance(flat, dict):
        raise ModelError(f"{Path(source).name}: its lora_adapter_metadata is not the JSON object diffusers writes.")
    out: dict = {}
    for key, value in flat.items():
        component, dot, name = str(key).partition(".")
        if dot:
            out.setdefault(component, {})[name] = value
    return out


def _refuse_unread(source: str, unread: list, what: str) -> None:
    """UsageError naming the first of the tensors an adapter holds that the studio would not apply: a partly
    applied adapter gives other outputs than its reference library, with no word."""
    if unread:
        raise UsageError(f"{Path(source).name} holds {unread[0]}" + (f" (and {len(unread) - 1} more)" if len(unread) > 1
                         else "") + f", {what}, which the studio does not apply yet; nothing was applied.")


def _read_peft(tensors: dict, config: dict, source: str, components: Optional[dict] = None) -> Adapter:
    """``components``: a config per pipeline component (a diffusers file's packed metadata), used for the layers
    of that component instead of ``config``."""
    components = components or {}
    for cfg in (config, *components.values()):
        features = [name for name, on in (("use_dora", cfg.get("use_dora")), ("lora_bias", cfg.get("lora_bias")),
                                          ("modules_to_save", cfg.get("modules_to_save"))) if on]
        if features:
            raise UsageError(f"{Path(source).name} uses PEFT's {', '.join(features)}, which the studio does not "
                             "apply yet; nothing was applied.")
    config = config or next(iter(components.values()), {})
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", rank))
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+?)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    found, tokens = {}, {}
    indices = config.get("trainable_token_indices") or {}
    for k, v in tensors.items():
        m = pattern.match(k)
        if m:
            found.setdefault(_component_path(m.group(1)), {})[m.group(2)] = v
        elif k.endswith("." + TOKENS_KEY):
            path = k[: -len(TOKENS_KEY) - 1].removeprefix("base_model.model.")
            ids = indices if isinstance(indices, list) else next(
                (v for name, v in indices.items() if path == name or path.endswith("." + name)), None)
            if ids is None or len(ids) != v.shape[0]:
                raise ModelError(f"{source}: adapter_config.json's trainable_token_indices do not name the "
                                 f"{v.shape[0]} new-token rows of {path}.")
            tokens[path] = ([int(i) for i in ids], v)

    def layer_scale(path: str) -> float:  # rank_pattern / alpha_pattern: per-layer r and alpha
        component, slash, rest = path.partition("/")
        cfg = components.get(component, config) if slash else config
        # a component's patterns name its modules as that component does (the text encoder's from text_model.)
        local = ("text_model." + rest if component == "text_encoder" else rest) if slash else path
        own_rank = int(cfg.get("r", rank))
        own_alpha = float(cfg.get("lora_alpha", own_rank))
        r, a = _pattern(cfg.get("rank_pattern"), local, own_rank), _pattern(cfg.get("alpha_pattern"), local,
                                                                              own_alpha)
        return a / r if not cfg.get("use_rslora") else a / r ** 0.5

    layers = {p: (ab["A"], ab["B"], layer_scale(p)) for p, ab in found.items() if set(ab) == {"A", "B"}}
    if not layers and not tokens:
        raise UsageError(f"{source} holds no LoRA weights (no lora_A / lora_B pairs).")
    _refuse_unread(source, sorted(k for k in tensors if not pattern.match(k) and not k.endswith("." + TOKENS_KEY)),
                   "a part of a PEFT adapter other than LoRA A/B pairs and new-token rows")
    spec = LoraSpec(rank, alpha, float(config.get("lora_dropout", 0.0)), tuple(config.get("target_modules") or ()))
    return Adapter(layers, spec, "peft", source, config, tokens)


def _pattern(pattern: Optional[dict], path: str, default):
    """The value of PEFT's rank_pattern / alpha_pattern whose key (a name or a regex) matches the end of ``path``."""
    return next((v for k, v in (pattern or {}).items() if re.fullmatch(rf"(.*\.)?{k}", path)), default)


def _component_path(path: str) -> str:
    """diffusers' LoRA files name the pipeline component first (``unet.down_blocks...``,
    ``text_encoder.text_model.encoder...``): those become ``component/path`` (see ``attach``)."""
    for component in ("unet", "text_encoder"):
        if path.startswith(component + "."):
            rest = path[len(component) + 1:]
            if component == "text_encoder" and rest.startswith("text_model."):
                rest = rest[len("text_model."):]
            return f"{component}/{rest}"
    return path


def _read_kohya(tensors: dict, meta: dict, source: str, component_paths: dict) -> Adapter:
    """With several components, the layers' keys are ``component/path`` (see ``attach``)."""
    lookup = {}
    for component, paths in component_paths.items():
        prefix = KOHYA_PREFIXES.get(component, component)
        several = len(component_paths) > 1
        for p in paths:
            key = f"{component}/{p}" if several else p
            lookup[prefix + p.replace(".", "_")] = key
            if component == "text_encoder":  # kohya names the CLIP text encoder's layers under text_model
                lookup[prefix + "text_model_" + p.replace(".", "_")] = key
    layers, ranks = {}, set()
    for k, down in tensors.items():
        if not k.endswith(".lora_down.weight"):
            continue
        key = k[: -len(".lora_down.weight")]
        up = tensors.get(key + ".lora_up.weight")
        if up is None:
            continue
        if down.dim() == 4:  # a conv LoRA of 1x1 kernels: the same as a linear one
            if down.shape[2:] != (1, 1) or up.shape[2:] != (1, 1):
                raise UsageError(f"{source}: {key} is a LoRA on a convolution with a wider kernel, which the studio "
                                 "does not load yet.")
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        rank = down.shape[0]
        ranks.add(rank)
        alpha = float(tensors[key + ".alpha"]) if key + ".alpha" in tensors else float(rank)
        if key not in lookup and component_paths:
            raise UsageError(f"The LoRA module {key} of {Path(source).name} matches no layer of this model; the LoRA "
                             "was made for another base model.")
        layers[lookup.get(key, key)] = (down, up, alpha / rank)
    if not layers:
        raise UsageError(f"{source} holds no LoRA weights (no lora_down / lora_up pairs).")
    _refuse_unread(source, sorted(k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight",
                                                                           ".alpha"))),
                   "a part other than kohya LoRA pairs (DoRA's dora_scale, LoHa, LoKr)")
    rank = max(ranks)
    return Adapter(layers, LoraSpec(rank, float(meta.get("ss_network_alpha", rank))), "kohya", source, meta)


def attach(model, adapter: Adapter, weight: float = 1.0, name: str = "default") -> None:
    """Add ``adapter`` to ``model`` (frozen, for generation) with its output scaled by ``weight``; ``model`` is
    a module, or {component: module} for an adapter read with several components (keys ``component/path``).
    UsageError, naming the module, when a layer is missing or its shape does not fit."""
    for path, (A, B, scale) in split_fused(model, adapter.layers).items():
        if A.dim() == 4 and A.shape[2:] == (1, 1) and B.shape[2:] == (1, 1):  # PEFT's 1x1-convolution LoRA
            A, B = A[:, :, 0, 0], B[:, :, 0, 0]
        target = model
        if isinstance(model, dict):
            if "/" in path:
                component, _, path = path.partition("/")
                target = model.get(component)
            else:  # a PEFT file names plain paths: the component that has the layer
                target = next((m for m in model.values() if _has(m, path)), None)
        elif "/" in path:  # a component-prefixed file on a one-module model
            path = path.partition("/")[2]
        try:
            if target is None:
                raise AttributeError(path)
            layer = _layer(target, path)
        except AttributeError:
            raise UsageError(f"The LoRA {Path(adapter.source).name} adapts {path}, which this model does not have; "
                             "it was made for another base model.") from None
        if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features or A.shape[0] != B.shape[1]:
            raise UsageError(f"The LoRA {Path(adapter.source).name} does not fit {path}: it is "
                             f"{B.shape[0]} x {A.shape[1]}, the layer {layer.out_features} x {layer.in_features}; "
                             "it was made for another base model.")
        layer.add(name, A.shape[0], scale * weight, 0.0, A, B)
        layer.lora_A[name].requires_grad_(False)
        layer.lora_B[name].requires_grad_(False)
    if adapter.tokens:
        target = model if isinstance(model, nn.Module) else None
        missing = [p for p in adapter.tokens if target is None or not _has(target, p)]
        if missing:
            raise UsageError(f"The LoRA {Path(adapter.source).name} has new-token rows for {missing[0]}, which this "
                             "model does not have; it was made for another base model.")
        ids = {tuple(i) for i, _ in adapter.tokens.values()}
        if len(ids) > 1 or any(isinstance(m, TokenRows) for m in target.modules()):
            raise UsageError(f"The LoRA {Path(adapter.source).name} adds tokens, and so does another adapter of "
                             "this job (or it adds different ones to different layers); use one such adapter at "
                             "a time.")
        # A layer tied to a named one follows it only where the model's config says its embeddings are tied,
        # as peft does (a vision-encoder-decoder's config says not, though its GPT-2 decoder ties them).
        add_token_rows(target, list(adapter.tokens), next(iter(ids)), {p: r for p, (_, r) in adapter.tokens.items()},
                       tie=bool(getattr(getattr(target, "config", None), "tie_word_embeddings", False)))


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and unwrap the layers (the model is plain again)."""
    for path, layer in [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLayer)]:
        with torch.no_grad():
            for name in list(layer.lora_A):
                layer.base.weight += layer.delta(name).to(layer.base.weight.dtype)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer.base)
    return model


def base_state_dict(model: nn.Module) -> dict:
    """The model's state dict under its plain parameter names (``.base.`` dropped, adapters left out)."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items()
            if ".lora_A." not in k and ".lora_B." not in k}


def apply_adapters(model, adapters):
    """Attach a request's adapters (``engine.generators.AdapterRef``: path and weight) to a loaded model (one
    module, or {"unet": ..., "text_encoder": ...}), frozen, in its own dtype; returns ``model``."""
    modules = model if isinstance(model, dict) else {"unet": model, "text_encoder": model}
    paths = {c: linear_paths(m) for c, m in modules.items()}
    if not isinstance(model, dict):
        paths = {"unet": paths["unet"]}  # one module: a kohya file's names map onto it whatever its prefix
    for i, ref in enumerate(adapters):
        attach(model, read_adapter(ref.path, paths), weight=ref.weight, name=f"adapter{i}")
    for m in modules.values():
        m.eval()
    return model


def merge_into_state(state: dict, adapter: Adapter, weight: float = 1.0) -> dict:
    """Add ``weight * scale * B @ A`` to ``state[path + ".weight"]`` for every adapted layer (the file-level merge
    behind `studio models merge-lora`; a GPT-2 Conv1D weight, stored in x out, gets the transposed delta)."""
    for path, (A, B, scale) in adapter.layers.items():
        key = path + ".weight"
        if key not in state:
            raise UsageError(f"The LoRA {Path(adapter.source).name} adapts {path}, which this model does not have; "
                             "it was made for another base model.")
        w = state[key]
        delta = (weight * scale) * (B.float() @ A.float())
        if w.dim() == 4:  # a 1x1 convolution
            delta = delta[:, :, None, None]
        if adapter.meta.get("fan_in_fan_out"):  # PEFT's flag for GPT-2's Conv1D (weights stored in x out)
            delta = delta.t()
        if tuple(w.shape) != tuple(delta.shape):
            raise UsageError(f"The LoRA {Path(adapter.source).name} does not fit {path}: it is "
                             f"{tuple(delta.shape)}, the weight {tuple(w.shape)}; it was made for another base model.")
        state[key] = (w.float() + delta).to(w.dtype)
    return state
