"""`QuantizedEmbedding`: a token embedding that looks its rows up in a bitplan checkpoint's packed weights, and
`TiedQuantizedHead`, the output head of a model whose head shares that embedding.

The embedding is stored like a linear layer's weight W [vocab, hidden] (groups along the hidden dimension).
For a format without rotation every packed tensor holds one row per token, so a lookup unpacks and dequantizes
only the rows it needs. For a rotated format the stored weight is W_rot = R_vocab W R_hiddenᵀ: the rotation along
the vocabulary mixes every row into every other, so no row can be recovered alone; the whole matrix is dequantized
and rotated back once and kept (as QuantizedLinear does with cache=True), 4 × vocab × hidden bytes.
A tied head computes its logits with that same dequantized weight; it never holds a copy of its own.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import get_format, unrotate_weight
from .module import decode_seeds


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's forward over a packed [num_embeddings, embedding_dim] weight.

    `cache=True` keeps the dequantized matrix after its first use (a lookup, or a tied head's logits);
    `cache=False` dequantizes the rows of each lookup from the packed bytes, except for rotated formats, whose
    matrix is always dequantized once and kept (see the module docstring). `embed_scale` multiplies every looked-up
    row (Gemma's scaled embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, format_name: str, packed: dict[str, torch.Tensor],
                 cache: bool = True, embed_scale: torch.Tensor | None = None, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.format = get_format(format_name)
        self.cache = cache or self.format.rotated
        for key, value in packed.items():
            self.register_buffer(key, value.clone())
        self.register_buffer("embed_scale", embed_scale.clone() if embed_scale is not None else None, persistent=False)
        self._packed_keys = tuple(k for k in packed if k != "rotation_seeds")
        self._seeds = decode_seeds(packed["rotation_seeds"]) if self.format.rotated else None
        self._weight: torch.Tensor | None = None

    def _packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._packed_keys}

    def _dequantize(self, packed: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        return self.format.dequantize(self.format.unpack(packed, rows, self.embedding_dim)).float()

    def dequantized_weight(self) -> torch.Tensor:
        """The whole weight in the original basis, float32 [num_embeddings, embedding_dim]: exactly the W_hat
        that apply computed for this matrix."""
        device = getattr(self, self._packed_keys[0]).device
        if self._weight is not None and self._weight.device == device:
            return self._weight
        W = self._dequantize(self._packed(), self.num_embeddings)
        if self.format.rotated:
            W = unrotate_weight(W.to(torch.float64), *self._seeds).float()
        if self.cache:
            self._weight = W
        return W

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` (any shape) without dequantizing the rest; [*ids.shape, embedding_dim]."""
        packed = self._packed()
        if self._weight is not None or any(t.dim() == 0 or t.shape[0] != self.num_embeddings for t in packed.values()):
            return self.dequantized_weight()[ids]   # a layout without one row per token: the whole matrix
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = self._dequantize({k: t[unique] for k, t in packed.items()}, unique.numel())
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.dequantized_weight()[ids] if self.cache else self._rows(ids)
        return out * self.embed_scale.to(out.dtype) if self.embed_scale is not None else out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format.name}"


class TiedQuantizedHead(nn.Module):
    """The output head of a tied model: logits = x Ŵᵀ with Ŵ the embedding's dequantized weight. The embedding is
    held by reference, not as a submodule, so the model's state dict and parameters list it once."""

    def __init__(self, embedding: QuantizedEmbedding, bias: torch.Tensor | None = None):
        super().__init__()
        self._embedding = (embedding,)   # a tuple: nn.Module does not register it as a child
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = nn.Parameter(bias.clone(), requires_grad=False) if bias is not None else None

    @property
    def embedding(self) -> QuantizedEmbedding:
        return self._embedding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.embedding.dequantized_weight().to(x.dtype).T
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the quantized embedding"


def module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None) if module is not None else None


def is_tied(model: nn.Module) -> bool:
    """Whether the output head computes with the input embedding's own weight (one matrix, two roles)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    w_emb, w_head = getattr(emb, "weight", None), getattr(head, "weight", None)
    if not (isinstance(w_emb, torch.Tensor) and isinstance(w_head, torch.Tensor)):
        return False
    # a skeleton's weights (meta device, bitplan.apply.source) have no storage: there tying is one object
    return w_emb is w_head or (not w_emb.is_meta and w_emb.data_ptr() == w_head.data_ptr())


def vocab_matrices(model: nn.Module) -> dict[str, str]:
    """The model's token embedding (kind "embedding") and, when it is not tied to it, its output head (kind
    "head"), by module name. A tied head is the embedding's matrix and has no entry of its own."""
    out: dict[str, str] = {}
    emb = module_name(model, model.get_input_embeddings())
    if emb is not None and isinstance(model.get_submodule(emb), nn.Embedding):
        out[emb] = "embedding"
    head = module_name(model, model.get_output_embeddings())
    if head is not None and not is_tied(model) and isinstance(model.get_submodule(head), nn.Linear):
        out[head] = "head"
    return out
