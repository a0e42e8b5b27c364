import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from dynlora import DynamicLoRALinear


def make(rank=4, max_rank=8, alpha=8.0, conv=False, seed=0):
    torch.manual_seed(seed)
    base = Conv1D(12, 10) if conv else nn.Linear(10, 12)  # both: 10 in, 12 out
    layer = DynamicLoRALinear(base, rank=rank, alpha=alpha, max_rank=max_rank)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def manual(layer, x):
    r = layer.rank
    delta = layer.lora_B[:, :r] @ layer.lora_A[:r] * (layer.alpha / layer.initial_rank)
    return layer.base_layer(x) + x @ delta.T


@pytest.mark.parametrize("conv", [False, True])
def test_forward_is_lora_formula_at_active_rank(conv):
    layer = make(conv=conv)
    x = torch.randn(5, 10)
    assert torch.allclose(layer(x), manual(layer, x), atol=1e-6)
    layer.set_rank(2)
    assert torch.allclose(layer(x), manual(layer, x), atol=1e-6)


def test_init_is_noop_and_only_adapter_is_trainable_by_caller():
    torch.manual_seed(0)
    base = nn.Linear(10, 12)
    layer = DynamicLoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (12, 4)
    assert layer.lora_A.abs().sum() > 0


def test_inactive_components_get_no_gradient():
    layer = make(rank=3, max_rank=8)
    layer(torch.randn(4, 10)).sum().backward()
    assert layer.lora_A.grad[:3].abs().sum() > 0 and layer.lora_B.grad[:, :3].abs().sum() > 0
    assert layer.lora_A.grad[3:].abs().sum() == 0 and layer.lora_B.grad[:, 3:].abs().sum() == 0


@pytest.mark.parametrize("conv", [False, True])
def test_merge_unmerge_exact(conv):
    layer = make(conv=conv)
    x = torch.randn(6, 10)
    before = layer(x)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    assert layer.merged
    assert (layer(x) - before).abs().max() < 1e-5
    assert (layer.base_layer(x) - before).abs().max() < 1e-5
    layer.unmerge()
    assert (layer.base_layer.weight - w0).abs().max() < 1e-6
    assert (layer(x) - before).abs().max() < 1e-5


def test_growth_leaves_output_unchanged_and_adds_fresh_rows():
    layer = make(rank=2, max_rank=8)
    x = torch.randn(4, 10)
    before = layer(x)
    old_a = layer.lora_A[:2].clone()
    layer.set_rank(6, generator=torch.Generator().manual_seed(0))
    assert layer.rank == 6
    assert torch.allclose(layer(x), before, atol=1e-6)
    assert torch.equal(layer.lora_A[:2], old_a)
    assert layer.lora_B[:, 2:6].abs().sum() == 0
    assert layer.lora_A[2:6].abs().sum() > 0


def test_growth_is_deterministic_for_a_generator():
    a, b = make(rank=1), make(rank=1)
    a.set_rank(5, generator=torch.Generator().manual_seed(3))
    b.set_rank(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.lora_A, b.lora_A)


def test_shrink_to_zero_is_base_layer_and_growth_back_works():
    layer = make()
    x = torch.randn(2, 10)
    layer.set_rank(0)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert layer.active_parameters() == 0
    layer.set_rank(3)
    assert torch.allclose(layer(x), layer.base_layer(x))


def test_scale_fixed_by_initial_rank():
    layer = make(rank=4, alpha=8.0)
    layer.set_rank(8)
    assert layer.scaling == 2.0


def test_rslora_scale_is_alpha_over_the_square_root_of_the_initial_rank():
    base = nn.Linear(10, 12)
    layer = DynamicLoRALinear(base, rank=4, alpha=8.0, max_rank=8, rslora=True)
    nn.init.normal_(layer.lora_B)
    layer.set_rank(8)
    assert layer.scaling == 4.0  # 8 / sqrt(4), fixed by the initial rank as LoRA's
    x = torch.randn(3, 10)
    expected = base(x) + x @ (layer.lora_B @ layer.lora_A).T * 4.0
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_bad_ranks_raise():
    with pytest.raises(ValueError, match="min\\(in, out\\)"):
        DynamicLoRALinear(nn.Linear(10, 12), rank=4, alpha=1, max_rank=11)
    with pytest.raises(ValueError):
        DynamicLoRALinear(nn.Linear(10, 12), rank=0, alpha=1)
    layer = make(max_rank=8)
    with pytest.raises(ValueError, match="outside"):
        layer.set_rank(9)
    with pytest.raises(TypeError):
        DynamicLoRALinear(nn.Embedding(3, 4), rank=1, alpha=1)


def test_merged_layer_refuses_rank_change():
    layer = make()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_rank(2)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = DynamicLoRALinear(nn.Linear(10, 12), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 10)
    layer.eval()
    assert torch.allclose(layer(x), manual(layer, x), atol=1e-6)
    layer.train()
    assert not torch.allclose(layer(x), manual(layer, x), atol=1e-3)


def test_mixed_dtype_base_uses_adapter_precision():
    torch.manual_seed(0)
    base = nn.Linear(10, 12).to(torch.bfloat16)
    layer = DynamicLoRALinear(base, rank=4, alpha=8)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn(12, 4)
    x = torch.randn(3, 10, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ (layer.lora_B @ layer.lora_A).T * layer.scaling
    assert torch.allclose(y.float(), expected, atol=5e-2)


@pytest.mark.parametrize("conv", [False, True])
def test_rebase_keeps_function_and_orders_by_singular_value(conv):
    layer = make(rank=5, max_rank=8, conv=conv)
    with torch.no_grad():
        layer.lora_A[:5].normal_()
    x = torch.randn(7, 10)
    before, delta = layer(x), layer.delta_weight().clone()
    a0, b0 = (t.clone() for t in layer.active_factors())
    t, t_inv = layer.rebase()
    a, b = layer.active_factors()
    assert torch.allclose(layer(x), before, atol=1e-5)
    assert torch.allclose(layer.delta_weight(), delta, atol=1e-5)
    assert torch.allclose(a @ a.T, torch.eye(5), atol=1e-5)  # orthonormal rows
    norms = b.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-6)  # strongest direction first
    assert torch.allclose(t @ a0, a, atol=1e-5) and torch.allclose(b0 @ t_inv, b, atol=1e-5)


def test_shrink_after_rebase_keeps_the_dominant_direction():
    # A known answer: the update is a strong rank-1 term plus a weak one, stored in the "wrong" order.
    torch.manual_seed(0)
    layer = DynamicLoRALinear(nn.Linear(6, 6), rank=2, alpha=2)  # scale 1
    u = torch.nn.functional.normalize(torch.randn(6, 2), dim=0)
    v = torch.nn.functional.normalize(torch.randn(2, 6), dim=1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.stack([u[:, 0] * 0.1, u[:, 1] * 5.0], dim=1))  # weak first, strong second
        layer.lora_A.copy_(v)
    strong = 5.0 * torch.outer(u[:, 1], v[1])
    layer.rebase()
    layer.set_rank(1)
    err_kept = (layer.delta_weight() - strong).norm()
    assert err_kept < 0.15  # only the weak term (norm <= 0.1 * |<v0, v1>| effects) is lost
    assert (layer.delta_weight() - 0.1 * torch.outer(u[:, 0], v[0])).norm() > 4
