"""The served model: one copy of the base, with slots that loaded adapters occupy, run on mixed batches."""

from __future__ import annotations

import torch
from torch import nn

from lora_cli.adapters.adapter import Adapter
from lora_cli.formats.checkpoint import BaseCheckpoint
from lora_cli.lora.layers import lora_scale
from lora_cli.lora.multi import Head, MultiHead, MultiLoRALinear, Route, Routing
from lora_cli.models import families
from lora_cli.runtime.precision import autocast, configure_matmuls
from lora_cli.tasks.classifier import frozen_backbone


class MultiAdapterModel:
    """The base model once; `install` puts an adapter (its LoRA factors and head) in a slot, and `logits`
    runs rows of any mix of slots in one packed forward, each row through its own adapter.

    Every Linear of the blocks can take a LoRA update, so adapters with any targets share the model. An
    adapter's own LoRA on its head (the book's all-linear recipe) is folded into its head when installed.
    Not thread-safe: one caller (the scheduler's worker) installs, removes and runs.
    """

    def __init__(self, base: BaseCheckpoint, device: torch.device, precision: str = "fp32") -> None:
        self.base, self.device, self.precision = base, device, precision
        self.pad_id = families.of(base.config).pad_id
        self.route = Route()
        model = frozen_backbone(base)
        self.layers: dict[str, MultiLoRALinear] = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.startswith("trf_blocks."):
                parent, _, child = name.rpartition(".")
                layer = MultiLoRALinear(module, self.route)
                setattr(model.get_submodule(parent), child, layer)
                self.layers[name] = layer
        self.head = MultiHead(self.route)
        model.out_head = self.head
        configure_matmuls(device)
        self.model = model.eval().to(device)
        self.slots: set[int] = set()

    def install(self, slot: int, adapter: Adapter) -> None:
        """Put an adapter, already checked to fit the base (`adapters.adapter.check_fits`), in `slot`."""
        if slot in self.slots:
            raise ValueError(f"slot {slot} is taken")
        spec, tensors = adapter.spec, adapter.tensors
        scale = lora_scale(spec.alpha, spec.rank, spec.scaling)

        def weight(name: str) -> torch.Tensor:  # a copy: the file's mapping may be gone (or the file rewritten) later
            return tensors[name].to(self.device, torch.float32, copy=True).contiguous()

        head_name = "out_head.linear" if "out_head" in spec.targets else "out_head"
        head_weight = weight(f"{head_name}.weight")
        if "out_head" in spec.targets:  # W + scale * (A @ B).T, as `LinearWithLoRA.merge` folds it
            head_weight = head_weight + (weight("out_head.lora.A") @ weight("out_head.lora.B")).T * scale
        bias = tensors.get(f"{head_name}.bias")
        factors = {
            target: (weight(f"{target}.lora.A").mul_(scale), weight(f"{target}.lora.B"))
            for target in spec.targets if target != "out_head"
        }
        unknown = sorted(set(factors) - set(self.layers))
        if unknown:
            raise ValueError(f"LoRA targets outside the blocks' Linear layers: {unknown}")
        for target, value in factors.items():
            self.layers[target].factors[slot] = value
        self.head.heads[slot] = Head(head_weight, None if bias is None else weight(f"{head_name}.bias"))
        self.slots.add(slot)

    def remove(self, slot: int) -> None:
        """Free a slot (its tensors go with the last reference)."""
        for layer in self.layers.values():
            layer.factors.pop(slot, None)
        self.head.heads.pop(slot, None)
        self.slots.discard(slot)

    @torch.inference_mode()
    def logits(self, slots: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Raw logits (rows, the batch's most classes) on the CPU; `slots[i]` is row i's adapter, rows grouped by
        slot. Row i's logits are its first `classes` columns."""
        lengths = [len(t) for t in tokens]
        ids = torch.full((len(tokens), max(lengths)), self.pad_id, dtype=torch.long)
        for i, row in enumerate(tokens):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        last = torch.tensor(lengths) - 1  # stays on the CPU: the packing is planned there
        self.route.current = Routing.from_lengths(slots, lengths)
        try:
            with autocast(self.device, self.precision):
                out = self.model(ids.to(self.device, non_blocking=True), last)
        finally:
            self.route.current = None
        return out.float().cpu()
