"""Which bare parameters of a model are a mixture of experts' fused expert weights and its routers (experts.py
adapts them; targets.py matches them against ``target_modules``)."""

from __future__ import annotations

from torch import nn

from .layer import SUPPORTED_BASE_LAYERS


def is_experts_module(module: nn.Module) -> bool:
    """transformers' fused experts: a ``...Experts`` class, or a module that says its ``num_experts``."""
    return type(module).__name__.endswith("Experts") or isinstance(getattr(module, "num_experts", None), int)


def expert_parameters(model: nn.Module) -> list[str]:
    """``<module>.<parameter>`` of every fused expert weight (a 3-D floating-point parameter of an experts module,
    experts first; not, say, a ViT's 3-D ``cls_token``), in model order."""
    return [
        f"{name}.{pname}"
        for name, module in model.named_modules()
        if is_experts_module(module)
        for pname, p in module.named_parameters(recurse=False)
        if p.dim() == 3 and p.is_floating_point()
    ]


def routers(model: nn.Module, experts: list[str]) -> list[str]:
    """``<module>.weight`` of every router: a module (not a linear layer) beside an experts module whose 2-D
    ``weight`` has one row per expert."""
    found: list[str] = []
    for name in experts:
        parent = name.rpartition(".")[0].rpartition(".")[0]
        count = model.get_parameter(name).shape[0]
        for child_name, child in model.get_submodule(parent).named_children():
            weight = child._parameters.get("weight")
            router = f"{parent}.{child_name}.weight".lstrip(".")
            linear = isinstance(child, SUPPORTED_BASE_LAYERS)
            if not linear and weight is not None and weight.dim() == 2 and weight.shape[0] == count:
                found += [router] if router not in found else []
    return found


def parameter_targets(model: nn.Module) -> list[str]:
    """Every adaptable bare parameter: fused experts, then routers."""
    experts = expert_parameters(model)
    return experts + routers(model, experts)
