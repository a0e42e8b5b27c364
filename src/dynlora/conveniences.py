"""What the Hugging Face ecosystem expects of an adapted model, by the names PEFT and transformers give it:
parameter counts, a summary of what is adapted, gradient checkpointing that reaches the adapters, computing
without the adapters, merging them into the weights and back."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from torch import nn

from .lowrank import LowRankUpdate


class EcosystemMethods:
    """Mixed into :class:`~dynlora.model.DynamicLoRAModel`, whose base model (``model``), adapted updates
    (``_layers``) and modules saved whole (``saved_module_names``) it reads."""

    model: nn.Module
    _layers: dict[str, LowRankUpdate]
    _adapted: dict[str, nn.Module]  # the modules that hold updates: a linear layer, a mixture's experts
    saved_module_names: list[str]

    def trainable_parameters(self) -> int:
        """Parameters that train: adapter parameters at the *active* ranks plus the modules to save."""
        adapters = sum(m.active_parameters() for m in self._layers.values())
        extra = sum(p.numel() for n in self.saved_module_names for p in self.model.get_submodule(n).parameters())
        return adapters + extra

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the model as it computes (transformers' name): the base model's plus the adapters at their
        active ranks, not their capacity; ``only_trainable``: :meth:`trainable_parameters`."""
        if only_trainable:
            return self.trainable_parameters()
        adapter_names = {f"{n}.{pname}" for n, m in self._layers.items() for pname, *_ in m.rank_parameters()}
        base = sum(p.numel() for n, p in self.model.named_parameters() if n not in adapter_names)
        if exclude_embeddings:
            base -= sum(m.weight.numel() for m in self.model.modules() if isinstance(m, nn.Embedding))
        return base + sum(m.active_parameters() for m in self._layers.values())

    def adapted_summary(self) -> str:
        """How many updates of each kind are adapted: ``24 linear layers, 32 experts, 2 routers``."""
        counts = collections.Counter(m.kind for m in self._layers.values())
        words = {"linear": "linear layer", "expert": "expert", "router": "router"}
        return ", ".join(f"{counts[k]} {w}{'s' if counts[k] != 1 else ''}" for k, w in words.items() if counts[k])

    def print_trainable_parameters(self) -> None:
        """``trainable params: ... || all params: ... || trainable%: ...``, as PEFT prints it, then what is adapted
        (``|| adapted: 24 linear layers, 32 experts, 2 routers``)."""
        trainable, total = self.trainable_parameters(), self.num_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
            f" || adapted: {self.adapted_summary()}"
        )

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The base model's gradient checkpointing, with its inputs made to require grad (as PEFT does): with
        reentrant checkpointing a block whose inputs do not require grad passes no gradient to the adapters in it."""
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        self.model.enable_input_require_grads()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as its base model (the adapters are skipped; modules saved whole,
        such as a new task head, stay as trained). As PEFT's ``disable_adapter``."""
        if any(m.merged for m in self._adapted.values()):
            raise RuntimeError("the adapters are merged into the weights: call unmerge_adapter() first")
        for module in self._adapted.values():
            module.disabled = True
        try:
            yield
        finally:
            for module in self._adapted.values():
                module.disabled = False

    def merge_adapter(self) -> None:
        """Fold every adapter into its base weight (reversible with :meth:`unmerge_adapter`)."""
        for module in self._adapted.values():  # all or none: refused before any layer changes
            module.check_mergeable()
        for module in self._adapted.values():
            module.merge()

    def unmerge_adapter(self) -> None:
        for module in self._adapted.values():
            module.unmerge()
