"""New tokens in a LoRA: PEFT's "trainable tokens" (a word a word-level vocabulary lacks).

The embedding's rows at the new ids (and the rows of the output layer, shared when its weight is tied to the
embedding) are replaced by trained values, ``W.index_copy(0, indices, rows)``; a layer grows when an id is past its
end. Files (engine/nn/lora.py) hold them as ``<path>.token_adapter.trainable_tokens_delta`` with
``trainable_token_indices`` in ``adapter_config.json``.

    add_token_rows(model, ["decoder.transformer.wte", "decoder.lm_head"], [28], train=True)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from engine.errors import UsageError

TOKENS_KEY = "token_adapter.trainable_tokens_delta"


class TokenRows(nn.Module):
    """An embedding or output layer whose rows ``indices`` read from ``rows`` (shared by tied layers)."""

    def __init__(self, base: nn.Module, indices, rows: nn.Parameter):
        super().__init__()
        self.base, self.rows = base, rows
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long), persistent=False)

    @property
    def weight(self):
        w = self.base.weight
        return w.index_copy(0, self.indices.to(w.device), self.rows.to(w.dtype))

    def forward(self, x):
        if isinstance(self.base, nn.Embedding):
            return nn.functional.embedding(x, self.weight, self.base.padding_idx)
        return nn.functional.linear(x, self.weight, self.base.bias)


def grow_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """``w`` with rows added up to ``rows``: each new row the mean row (a weight), or zero (a bias)."""
    if rows <= w.shape[0]:
        return w
    extra = w.float().mean(0, keepdim=True) if w.dim() == 2 else w.new_zeros(1)
    return torch.cat([w, extra.expand(rows - w.shape[0], *w.shape[1:]).to(w.dtype)])


def _grown(module: nn.Module, rows: int, weight=None) -> nn.Module:
    """``module`` (an Embedding or a Linear output layer) with ``rows`` rows (``grow_rows``); ``weight``: a grown
    weight to share (a layer tied to a grown embedding)."""
    w = module.weight
    if rows <= w.shape[0]:
        return module
    if isinstance(module, nn.Embedding):
        grown = nn.Embedding(rows, w.shape[1], padding_idx=module.padding_idx, device="meta")
    elif isinstance(module, nn.Linear):
        grown = nn.Linear(w.shape[1], rows, bias=module.bias is not None, device="meta")
        if module.bias is not None:
            grown.bias = nn.Parameter(grow_rows(module.bias.detach(), rows), requires_grad=False)
    else:
        raise UsageError(f"New tokens need an embedding or a linear output layer, not a {type(module).__name__}.")
    grown.weight = weight if weight is not None else nn.Parameter(grow_rows(w.detach(), rows), requires_grad=False)
    return grown


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def add_token_rows(model: nn.Module, paths, indices, rows: Optional[dict] = None, train: bool = False,
                   tie: bool = True) -> None:
    """Let the layers at ``paths`` (an input embedding, an output layer) read rows ``indices`` from new parameters,
    growing them when an id is past their end; a layer tied to another's weight shares its rows (and with ``tie``,
    so does one ``paths`` does not name). ``rows``: {path: values} (missing: the layer's current rows there, the
    mean row for a grown one); ``train``: the rows train (the rest stays frozen)."""
    indices, rows = [int(i) for i in indices], rows or {}
    need = max(indices) + 1
    shared: dict = {}  # id(original weight) -> (grown weight, rows parameter)
    for path in paths:
        layer = model.get_submodule(path)
        grown_weight, param = shared.get(id(layer.weight), (None, None))
        grown = _grown(layer, need, grown_weight)
        if param is None or path in rows:  # a tied layer the file gives its own values keeps them
            init = rows[path] if path in rows else grown.weight.detach()[indices].float()
            param = nn.Parameter(init.to(grown.weight.device, grown.weight.dtype).clone(), requires_grad=train)
        shared.setdefault(id(layer.weight), (grown.weight, param))
        _replace(model, path, TokenRows(grown, indices, param))
    if not tie:
        return
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, TokenRows)}
    for path, m in list(model.named_modules()):  # layers tied to one of ``paths`` that ``paths`` did not name
        if id(m) not in wrapped and not isinstance(m, TokenRows) and id(getattr(m, "weight", None)) in shared:
            grown_weight, param = shared[id(m.weight)]
            _replace(model, path, TokenRows(_grown(m, need, grown_weight), indices, param))


def token_rows(model: nn.Module) -> dict:
    """path -> (ids, rows) of every layer with new-token rows."""
    return {p: (m.indices.tolist(), m.rows.detach().float().cpu()) for p, m in model.named_modules()
            if isinstance(m, TokenRows)}


def merge_tokens(state: dict, tokens: dict) -> Optional[tuple]:
    """Write an adapter's new-token rows ({path: (ids, rows)}) into ``state`` (the embedding and output weights
    the file holds: a tied output layer is stored once), growing them (and a grown layer's bias) to the highest id;
    returns (rows before, rows after) when they grew, else None. The rows replace, so a merge weight does not scale
    them."""
    grew = None
    for path, (ids, rows) in tokens.items():
        w = state.get(path + ".weight")
        if w is None:
            continue
        need = max(ids) + 1
        if need > w.shape[0]:
            bias = state.get(path + ".bias")
            if bias is not None and bias.shape[0] == w.shape[0]:
                state[path + ".bias"] = grow_rows(bias, need)
            grew = (w.shape[0], need)
        w = grow_rows(w, need).clone()
        w[ids] = rows.to(w.dtype)
        state[path + ".weight"] = w
    return grew
