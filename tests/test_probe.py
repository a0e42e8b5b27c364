"""init="gradient": components start along the top directions of the layer's measured loss gradient ∂L/∂W."""

import pytest
import torch
from conftest import VOCAB, build
from test_engine import data, engine_config, make, train
from transformers.pytorch_utils import Conv1D

from dynlora import DynamicLoRAConfig, DynamicLoRAModel, get_dynlora_model
from dynlora.input_adaptation import InputNorm
from dynlora.probe import top_directions


def exact_top(grad, k, taken=None):
    """Top right singular vectors by a full SVD (after projecting out ``taken``): the reference."""
    if taken is not None:
        q, _ = torch.linalg.qr(taken.T)
        grad = grad - grad @ q @ q.T
    return torch.linalg.svd(grad)[2][:k]


def true_weight_gradients(model, step=None, inputs=None):
    """∂L/∂W (out × in, a Conv1D's transposed) of every adapted layer's frozen base weight by autograd, on
    ``inputs`` or the batch of ``step``: the reference the probe's hooks must reproduce."""
    layers = model.lora_layers()
    for layer in layers.values():
        layer.base_layer.weight.requires_grad_(True)
        layer.base_layer.weight.grad = None
    model(**(inputs if inputs is not None else data(step))).loss.backward()
    grads = {}
    for name, layer in layers.items():
        w = layer.base_layer.weight
        grads[name] = (w.grad.T if isinstance(layer.base_layer, Conv1D) else w.grad).clone()
        w.requires_grad_(False)
        w.grad = None
    model.zero_grad(set_to_none=True)
    return grads


def subspace_overlap(rows, reference):
    """1.0 when the row spaces of ``rows`` and ``reference`` (same count) are the same, less otherwise."""
    q, _ = torch.linalg.qr(rows.T.double())
    return (reference.double() @ q).square().sum().item() / reference.shape[0]


@pytest.mark.parametrize("gate", [None, "mergeable"])
def test_first_step_points_every_layer_along_its_gradient(gate):
    model, opt = make(engine_config(init="gradient", input_adaptive=gate, reallocate=False))
    model.train()
    reference = true_weight_gradients(model, 1)
    train(model, opt, 1, 1, 10)
    for name, layer in model.lora_layers().items():
        rows = layer.effective_rows().detach()  # what the input sees, gate included
        assert subspace_overlap(rows, exact_top(reference[name], layer.rank)) > 0.99
        assert torch.allclose(rows.norm(dim=1), torch.full((layer.rank,), 3**-0.5), atol=1e-5)
        assert layer.lora_B.abs().max() == 0  # the adapter is still a no-op: B starts again at zero
        assert opt.state[layer.lora_B]["exp_avg"].abs().max() == 0  # the step's update of B (old A) is gone


def test_grown_components_take_the_gradient_directions_not_yet_covered():
    model, opt = make(engine_config(init="gradient", input_adaptive=None))
    train(model, opt, 1, 3, 20)  # the first re-allocation is at step 4
    reference = true_weight_gradients(model, 4)
    old = model.rank_pattern()
    train(model, opt, 4, 4, 20)  # the re-allocation step: measures ∂L/∂W, then grows and shrinks layers
    grown = {n: r for n, r in model.rank_pattern().items() if r > old[n]}
    assert grown
    for name, rank in grown.items():
        layer = model.lora_layers()[name]
        rows = layer.effective_rows().detach()
        new, kept = rows[old[name] :], rows[: old[name]]
        assert (new @ kept.T).abs().max() < 1e-5  # orthogonal to the directions already in use
        expected = exact_top(reference[name], rank - old[name], kept)
        assert subspace_overlap(new, expected) > 0.99
        assert layer.lora_B[:, old[name] : rank].abs().max() < 5e-3  # one optimizer step from zero (lr 5e-3)


def test_growth_keeps_outputs_when_components_start_along_the_gradient():
    model, opt = make(engine_config(init="gradient"))
    train(model, opt, 1, 3, 20)
    grads = true_weight_gradients(model, 3)
    model.eval()
    batch = {k: v for k, v in data(0).items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
        model.engine.resize({n: 6 for n in model.lora_layers()}, grads)  # grow every layer 4 -> 6
        after = model(**batch).logits
    assert (after - before).abs().max() < 1e-6


def test_probes_measure_only_the_steps_that_need_it():
    model, opt = make(engine_config(init="gradient"))
    armed = []

    def check(m, step):
        armed.append(all(probe.armed for probe in m.engine.probes.values()))
        assert all(probe.weight_grad is None for probe in m.engine.probes.values())  # nothing kept after use

    train(model, opt, 1, 16, 20, check)
    # after step s the probes are armed for step s + 1: re-allocations at 4, 7, 10, 13, 16
    assert [s + 1 for s, a in enumerate(armed, start=1) if a] == [4, 7, 10, 13, 16]


def test_a_loaded_adapter_is_not_reinitialised(tmp_path):
    model, opt = make(engine_config(init="gradient"))
    train(model, opt, 1, 5, 20)
    model.save_pretrained(tmp_path)
    loaded = DynamicLoRAModel.from_pretrained(build("bert"), tmp_path)
    saved = loaded.adapter_state_dict()
    opt2 = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.0)
    train(loaded, opt2, 1, 1, 20)  # continued training from step 1 with lr 0: nothing may change
    after = loaded.adapter_state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in saved if "input_norm" not in k)


def test_a_skipped_step_measures_again():
    model, opt = make(engine_config(init="gradient", reallocate=False))
    model.bind_optimizer(opt, 10)
    model.train()
    model(**data(1)).loss.backward()
    model.skip_step()  # e.g. a non-finite loss: this measurement must not be used
    opt.zero_grad()
    name, layer = next(iter(model.lora_layers().items()))
    assert model.engine.probes[name].armed and model.engine.probes[name].weight_grad is None
    reference = true_weight_gradients(model, 2)
    model(**data(2)).loss.backward()
    opt.step()
    model.update_and_allocate(1)
    assert subspace_overlap(layer.effective_rows().detach(), exact_top(reference[name], layer.rank)) > 0.99


def test_gradient_checkpointing_measures_the_same_gradient():
    states = []
    for checkpointing in (False, True):
        model, opt = make(engine_config(init="gradient"))
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        train(model, opt, 1, 8, 20)
        states.append((model.allocation_events(), model.adapter_state_dict()))
    assert [h["ranks"] for h in states[0][0]] == [h["ranks"] for h in states[1][0]]
    # The recomputation observes its inputs again: the unfolded block holds each token twice, with the same mean.
    folded = [k for k in states[0][1] if not InputNorm.is_unfolded(k)]
    assert all(torch.allclose(states[0][1][k], states[1][1][k], atol=1e-5) for k in folded)


def test_unknown_init_is_a_clear_error():
    with pytest.raises(ValueError, match="init must be one of"):
        engine_config(init="pissa")


def test_top_directions_capture_nearly_the_optimal_energy_of_any_spectrum():
    g = torch.Generator().manual_seed(0)
    decaying = (torch.randn(512, 96, generator=g) * torch.logspace(0, -2, 96)).T @ torch.randn(512, 96, generator=g)
    for grad in (decaying, torch.randn(96, 80, generator=g)):  # a flat spectrum is the hard case
        best = torch.linalg.svdvals(grad)[:8].square().sum()
        rows = top_directions(grad, 8)
        assert torch.allclose(rows @ rows.T, torch.eye(8), atol=1e-5)
        assert (grad @ rows.T).square().sum() / best > 0.98


def test_top_directions_have_a_fixed_sign_so_a_summed_gradient_starts_the_same_components():
    """Over two processes the measured gradient is twice one process's, rounded differently: same rows."""
    noise = torch.Generator().manual_seed(1)
    for seed in range(20):
        grad = torch.randn(48, 40, generator=torch.Generator().manual_seed(seed))
        rows = top_directions(grad, 6)
        assert (rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)) > 0).all()  # largest entry positive
        summed = 2 * grad + 1e-6 * torch.randn(48, 40, generator=noise)
        torch.testing.assert_close(top_directions(summed, 6), rows, atol=1e-4, rtol=1e-3)


def test_every_architecture_starts_along_its_own_weight_gradient(arch):
    """BERT, GPT-2 (Conv1D, weight stored in × out), Llama and Qwen2 (grouped-query v_proj: out ≠ in)."""
    model = get_dynlora_model(
        build(arch), DynamicLoRAConfig(rank=2, reallocate=False, input_adaptive=None, init="gradient")
    )
    model.train()
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(4, dtype=torch.long) if arch == "bert" else ids  # classification or next-token loss
    layers = model.lora_layers()
    reference = true_weight_gradients(model, inputs={"input_ids": ids, "labels": labels})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.bind_optimizer(opt, 5)
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    model.update_and_allocate(1)
    for name, layer in layers.items():
        assert subspace_overlap(layer.effective_rows().detach(), exact_top(reference[name], layer.rank)) > 0.99
