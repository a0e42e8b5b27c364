"""--device and --precision: mixed-precision training keeps adapters and optimizer in float32, fp16 scales its loss,
a device the machine lacks is one error line; a half-precision base gets float32 adapters."""

import json

import pytest
import torch
from conftest import build
from helpers import csv_data, ok, run_cli, train_args

from dynlora import DynamicLoRAConfig, get_dynlora_model
from dynlora.training.devices import Precision, resolve_device
from dynlora.training.loop import TrainingRun
from dynlora.training.settings import TrainSettings


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float32_adapters_and_records_its_precision(tmp_path, tiny_model_dir, precision):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    settings = TrainSettings(
        model=tiny_model_dir,
        train_file=str(train),
        dev_file=str(train),
        max_steps=4,
        batch_size=4,
        max_length=32,
        output_dir=str(tmp_path / "run"),
        progress=False,
        precision=precision,
        lr=1e-2,
        adapter={"rank": 2, "warmup": 1, "interval": 1, "final": 3},
    )
    run = TrainingRun(settings)
    result = run.run()
    assert result["steps"] == 4 and 0 <= result["metrics"]["validation"]["accuracy"] <= 1
    assert all(p.dtype == torch.float32 for p in run.params)  # autocast computes in half; the weights train in fp32
    assert all(
        v.dtype == torch.float32
        for state in run.optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    assert len(run.model.allocation_events()) == 3
    manifest = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert manifest["identity"]["precision"] == precision


def test_fp16_loss_scaling_retries_an_overflowing_step_with_a_smaller_scale():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision = Precision("fp16", torch.device("cpu"))
    precision.backward((weight * 2).sum())
    weight.grad.fill_(float("inf"))  # what a scaled gradient that overflowed fp16 looks like
    precision.unscale(optimizer)
    scale = precision.scaler.get_scale()
    assert precision.retry_after_overflow(6.0)  # the loss was finite: the scaler's to fix, not a divergence
    assert precision.scaler.get_scale() < scale
    assert not precision.retry_after_overflow(float("nan"))  # a non-finite loss is not the scaler's to fix
    assert not Precision("bf16", torch.device("cpu")).retry_after_overflow(1.0)  # bf16 needs no scaling


def test_a_device_the_machine_lacks_is_one_error_line(capsys, tmp_path, tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto").type in ("cpu", "mps")
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    line = run_cli(capsys, *train_args(tiny_model_dir, train, tmp_path / "run", "--device", "cuda"))
    assert "--device cuda: this machine has no CUDA device" in line and not (tmp_path / "run").exists()
    ok(capsys, *train_args(tiny_model_dir, train, tmp_path / "cpu-run", "--device", "cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_gets_float32_adapters_and_merges_in_its_own_dtype(dtype):
    base = build("llama").to(dtype)
    model = get_dynlora_model(base, DynamicLoRAConfig(rank=2, init="lora"))
    layer = next(iter(model.lora_layers().values()))
    assert layer.lora_A.dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
    with torch.no_grad():
        layer.lora_B.normal_()
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.merge_adapter()
        after = model(input_ids=ids).logits
    assert layer.base_layer.weight.dtype == dtype and before.dtype == dtype
    assert torch.allclose(before.float(), after.float(), atol=0.1, rtol=0.05)  # equal up to half precision


def test_fp16_gives_up_retrying_a_gradient_that_overflows_at_every_scale():
    from dynlora.training.devices import MAX_RETRIES

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    precision = Precision("fp16", torch.device("cpu"))
    retries = 0
    while retries <= 100:  # before the bound, this retried forever
        precision.backward((weight * 2).sum())
        weight.grad.fill_(float("inf"))  # non-finite whatever the scale: the model's, not the scaler's
        precision.unscale(optimizer)
        if not precision.retry_after_overflow(6.0):
            break
        optimizer.zero_grad()
        retries += 1
    assert retries == MAX_RETRIES
    assert precision.retry_after_overflow(6.0)  # the count starts again for the next step
