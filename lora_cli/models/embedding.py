"""`embedding`: nn.Embedding, built on the meta device without its random initialisation.

Models are built on the meta device to read their shapes or to receive a checkpoint's tensors. There,
nn.Embedding's `normal_` init has a meta kernel written in Python, whose first call imports
`torch._meta_registrations` and `torch._dynamo`: seconds of every command that loads a base, for values
that are never used. Linear's uniform init has a native meta kernel and costs nothing.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """nn.Embedding(num_embeddings, embedding_dim); on the meta device its weight is left uninitialised."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
    return nn.Embedding(num_embeddings, embedding_dim)
