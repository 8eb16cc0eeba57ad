"""Activations that the backward pass recomputes instead of storing, for the decoder families.

Several of a decoder's intermediates are kept for the backward pass twice over: a norm's output is
saved by the projection after it while the norm's own node keeps the norm's input; attention's
merged heads are saved by the output projection while SDPA keeps the per-sequence outputs they
were copied from; Qwen3's rotated queries and keys are saved by SDPA while QK-norm keeps their
unnormalized input. Under `recomputed()` such an intermediate, registered with `derive` as `fn`
of tensors that are stored anyway, is packed as that recipe when a node saves it and recomputed
when the backward pass unpacks it: the same expression on the same inputs, so the same numbers,
bit for bit, for one cheap elementwise or copy pass.

This is torch's saved-tensor hooks mechanism; where other hooks are already set (activation
checkpointing, CPU offloading), `recomputed` steps aside and they see every tensor as before.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch


class _Entry:
    """`fn(*args)` for one registered tensor; args may be other entries (recipes of recipes).

    Several saved views of one tensor (SDPA's per-sequence slices) share its entry: the first
    unpack recomputes it, the others reuse that until the last of them is unpacked.
    """

    __slots__ = ("fn", "args", "pending", "value")

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple) -> None:
        self.fn, self.args, self.pending, self.value = fn, args, 0, None

    def compute(self) -> torch.Tensor:
        return self.fn(*(a.compute() if isinstance(a, _Entry) else a for a in self.args))


class _Packed:
    __slots__ = ("entry", "size", "stride", "offset")

    def __init__(self, entry: _Entry, t: torch.Tensor) -> None:
        self.entry, self.size, self.stride, self.offset = entry, t.shape, t.stride(), t.storage_offset()
        entry.pending += 1


class _Recipes:
    """The tensors registered in one `recomputed()` block, by storage address, while they are alive."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[weakref.ref, _Entry]] = {}

    def lookup(self, t: torch.Tensor) -> _Entry | None:
        """The entry of `t`'s storage; None for an unregistered one or one whose tensor died (its
        memory may hold another tensor now)."""
        hit = self.live.get(t.untyped_storage().data_ptr())
        if hit is None:
            return None
        y = hit[0]()
        return hit[1] if y is not None and y.dtype == t.dtype else None

    def pack(self, t: torch.Tensor) -> Any:
        entry = self.lookup(t)
        return t if entry is None else _Packed(entry, t)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        entry = packed.entry
        value = entry.compute() if entry.value is None else entry.value
        entry.pending -= 1
        entry.value = value if entry.pending > 0 else None
        return value.as_strided(packed.size, packed.stride, packed.offset)


class _Active(threading.local):
    recipes: _Recipes | None = None


_ACTIVE = _Active()


def derive(y: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any, only_if_derived: bool = False) -> torch.Tensor:
    """Register `y == fn(*args)` so that a saved `y` (or view of it) is recomputed; returns `y`.

    `fn` must be deterministic and `args` tensors the backward pass keeps anyway (or constants):
    the recipe holds them. An arg that is itself registered is held as its recipe, so with
    `only_if_derived` `y` is registered only when some arg is (else holding the args would cost
    what storing `y` does). Outside `recomputed()`, or for a `y` that is not a whole fresh tensor,
    nothing happens.
    """
    recipes = _ACTIVE.recipes
    if recipes is None or not y.is_contiguous() or y.storage_offset() != 0:
        return y
    args = tuple(_as_recipe(recipes, a) for a in args)
    if only_if_derived and not any(isinstance(a, _Entry) for a in args):
        return y
    recipes.live[y.untyped_storage().data_ptr()] = weakref.ref(y), _Entry(fn, args)
    return y


def _as_recipe(recipes: _Recipes, a: Any) -> Any:
    if not isinstance(a, torch.Tensor):
        return a
    entry = recipes.lookup(a)
    if entry is None or a.storage_offset() != 0 or not a.is_contiguous():
        return a
    return entry


@contextlib.contextmanager
def recomputed() -> Iterator[None]:
    """Within the block, tensors registered with `derive` are recomputed in the backward pass
    instead of stored. A no-op without autograd and where saved-tensor hooks are set already."""
    if not torch.is_grad_enabled() or _ACTIVE.recipes is not None or not _no_saved_tensor_hooks():
        yield
        return
    recipes = _Recipes()
    _ACTIVE.recipes = recipes
    try:
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, recipes.unpack):
            yield
    finally:
        _ACTIVE.recipes = None


def _no_saved_tensor_hooks() -> bool:
    """Whether no saved-tensor hooks are set and hooks may be set (torch has no public query for this)."""
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    if top is None or enabled is None or not enabled():
        return False
    try:
        return top(False) is None
    except TypeError:  # another signature: unknown, so assume hooks may be set
        return False
