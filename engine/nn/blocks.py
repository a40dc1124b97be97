"""Small transformer blocks that several families' networks share: activations by their config names, the
two-layer MLP (``fc1``/``fc2``, as ViT and CLIP name it), the pre-norm layer of CLIP and BLIP, and multi-head self-attention over q/k/v projections."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    """The activation a transformers config calls ``name``; ValueError for one the studio does not know."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation function {name!r}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """fc2(act(fc1(x))), with transformers' ViT/CLIP parameter names."""

    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CausalLM(nn.Module):
    """What the decoders' language-model classes share (GPT-2's, and the Llama family's)."""
    n_layers = 0  # set by add_head
    max_positions = 0

    def add_head(self, width: int, vocab: int, embedding: nn.Embedding, tie: bool, n_layers: int,
                 max_positions: int) -> None:
        """The language-model head (tied to ``embedding`` when ``tie``), and the sizes the decoding loop asks."""
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.lm_head.weight = embedding.weight
        self.n_layers, self.max_positions = n_layers, max_positions

    def new_cache(self):
        from engine.nn.cache import KVCache

        return KVCache(self.n_layers)

    @torch.inference_mode()
    def step(self, input_ids, past=None, attention_mask=None, position_ids=None):
        """Decoding interface: last-position logits (B, V) as float32, and the updated cache. A left-padded batch
        passes ``attention_mask`` (B, P + T) and ``position_ids`` (B, T)."""
        logits, past = self(input_ids, past=past, logits_to_keep=1, attention_mask=attention_mask,
                            position_ids=position_ids)
        return logits[:, -1].float(), past


def load_strict(model: nn.Module, state: dict, assign: bool = False) -> None:
    """``model.load_state_dict`` that names the first missing and unexpected keys in a KeyError."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    if missing or unexpected:
        raise KeyError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


class PreNormLayer(nn.Module):
    """A pre-norm transformer layer under CLIP's and BLIP's parameter names: ``x + self_attn(layer_norm1(x))``,
    then ``+ mlp(layer_norm2(x))``; ``attn`` is the family's attention module."""

    def __init__(self, attn: nn.Module, hidden: int, inner: int, act: str, eps: float):
        super().__init__()
        self.self_attn = attn
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, inner, act)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PreNormEncoder(nn.Module):
    """``layers``: ``cfg.num_hidden_layers`` PreNormLayers, each with ``attention(cfg)`` (CLIP's and BLIP's
    ``encoder``); the family's model runs them."""

    def __init__(self, cfg, attention):
        super().__init__()
        sizes = (cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(PreNormLayer(attention(cfg), *sizes) for _ in range(cfg.num_hidden_layers))


def self_attention(x, q_proj, k_proj, v_proj, n_head: int, causal: bool = False):
    """Multi-head attention of x (B, T, D) over itself; returns (B, T, D) before the output projection."""
    B, T, D = x.shape
    q, k, v = (p(x).view(B, T, n_head, D // n_head).transpose(1, 2) for p in (q_proj, k_proj, v_proj))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, T, D)


class TiedTable(nn.Module):
    """A tied embedding / output table in an export form, stored once as (C, V): ``forward(h)`` is the output head
    (``h @ table``, a MatMul on the stored table, no transposed copy), ``embed(ids)`` gathers the table's columns.
    Exporting the two uses of one (V, C) weight as written makes the exporter fold a transposed second copy."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)

    def forward(self, h):
        return h @ self.table

    def embed(self, ids):
        return self.table.index_select(1, ids.reshape(-1)).t().reshape(*ids.shape, self.table.shape[0])


class TiedEmbedding(nn.Module):
    """The embedding side of a ``TiedTable`` (holds it, so the model's embedding attribute keeps working)."""

    def __init__(self, tied: TiedTable):
        super().__init__()
        self.tied = tied

    def forward(self, ids):
        return self.tied.embed(ids)


def tie_for_export(embedding: nn.Embedding, head: nn.Linear):
    """(embedding, head) modules for an export form: a ``TiedTable`` when the head's weight is the embedding's
    (each stored once), else the two unchanged."""
    if head.weight is not embedding.weight or head.bias is not None:
        return embedding, head
    tied = TiedTable(head.weight)
    return TiedEmbedding(tied), tied
