"""LoRA on layers a network keeps apart but its weight files fuse (Phi-3's ``qkv_proj`` / ``gate_up_proj``).

Such a network names them in ``model.fused_layers`` ({"qkv_proj": ("q_proj", "k_proj", "v_proj")}). Its adapters are
saved on the fused layer (``A`` stacked, ``B`` block-diagonal, rank and alpha scaled by the number of parts in
``rank_pattern`` / ``alpha_pattern`` so the scale is unchanged), and an adapter on the fused layer is split into its
parts on loading, so the files are those peft reads and writes.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _layer(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def fused_targets(model: nn.Module, targets) -> set:
    """PEFT's target_modules: the parts' names replaced by their fused layer's."""
    fused = getattr(model, "fused_layers", {})
    out = {t for t in targets if not any(t in parts for parts in fused.values())}
    return out | {name for name, parts in fused.items() if any(t in parts for t in targets)}


def fuse(model: nn.Module, layers: dict) -> tuple:
    """{path: (A, B)} with the parts of each of ``model.fused_layers`` joined into one layer (``A`` stacked, ``B``
    block-diagonal; a part without an adapter gets zeros); returns (layers, {fused name: number of parts})."""
    fused = getattr(model, "fused_layers", {})
    out, groups, counts = {}, {}, {}
    for path, ab in layers.items():
        parent, _, leaf = path.rpartition(".")
        name = next((n for n, parts in fused.items() if leaf in parts), None)
        if name is None:
            out[path] = ab
        else:
            groups.setdefault((parent, name), {})[leaf] = ab
    for (parent, name), got in groups.items():
        r = next(iter(got.values()))[0].shape[0]
        As, Bs = [], []
        for leaf in fused[name]:
            layer = model.get_submodule(f"{parent}.{leaf}")
            A, B = got.get(leaf, (torch.zeros(r, layer.in_features), torch.zeros(layer.out_features, r)))
            As.append(A)
            Bs.append(B)
        out[f"{parent}.{name}"] = (torch.cat(As), torch.block_diag(*Bs))
        counts[name] = len(fused[name])
    return out, counts


def split_fused(model, layers: dict) -> dict:
    """An adapter's layers ({path: (A, B, scale)}) with each one on a fused layer the model keeps apart split into
    its parts (the rows of ``B`` by the parts' output sizes; ``A`` shared); what does not fit is left for ``attach``
    to name."""
    fused = getattr(model, "fused_layers", {}) if isinstance(model, nn.Module) else {}
    out = {}
    for path, (A, B, scale) in layers.items():
        parent, _, leaf = path.rpartition(".")
        parts = [_layer(model, f"{parent}.{p}") for p in fused.get(leaf, ())]
        if not parts or _layer(model, path) is not None or None in parts \
                or sum(p.out_features for p in parts) != B.shape[0]:
            out[path] = (A, B, scale)
            continue
        for part, b in zip(fused[leaf], B.split([p.out_features for p in parts])):
            out[f"{parent}.{part}"] = (A, b, scale)
    return out
