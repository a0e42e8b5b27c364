"""torch.compile: the adapted forward is one graph, and a compiled model trains as the eager one, through
re-allocations that change the factors' shapes. The ``aot_eager`` backend traces and differentiates as inductor
does without needing a C++ compiler on the machine."""

import pytest
import torch
from conftest import VOCAB, tiny_llama

from dynlora import DynamicLoRAConfig, get_dynlora_model

STEPS = 10


def make(input_adaptive="mergeable"):
    torch.manual_seed(0)
    config = DynamicLoRAConfig(
        rank=4,
        alpha=8,
        target_modules="all-linear",
        warmup=3,
        interval=2,
        final=8,
        input_adaptive=input_adaptive,
        **({"input_norm_every": 2} if input_adaptive == "mergeable" else {}),
    )
    model = get_dynlora_model(tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.bind_optimizer(optimizer, STEPS)
    return model, optimizer


def batch(step: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("input_adaptive", ["mergeable", None])
def test_the_adapted_forward_compiles_without_a_graph_break(input_adaptive):
    model, _ = make(input_adaptive)
    model.train()
    explained = torch._dynamo.explain(model)(**batch(1))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons[:3]]


def test_a_compiled_model_trains_as_the_eager_one_through_reallocations():
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, optimizer = make()
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        model.train()
        losses = []
        for step in range(1, STEPS + 1):
            loss = forward(**batch(step)).loss
            loss.backward()
            optimizer.step()
            model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(loss.detach())
        runs.append((model, torch.stack(losses)))
    (eager, eager_losses), (compiled, compiled_losses) = runs
    assert len(eager.allocation_events()) == 3 and compiled.rank_pattern() == eager.rank_pattern()
    assert torch.allclose(compiled_losses, eager_losses, atol=1e-5)
    a, b = eager.adapter_state_dict(), compiled.adapter_state_dict()  # input statistics included
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
