"""Several processes (gloo on the CPU): the frozen base sharded with FSDP2, the trainable parameters averaged; the
same training as one process on the whole batch, re-allocation and a layer at rank 0 included."""

import glob
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import VOCAB, build, save_tiny_llama
from helpers import GLUE, dynlora, needs_glue
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from dynlora import DynamicLoRAConfig, get_dynlora_model
from dynlora.distributed import average_gradients, shard_frozen, transformer_blocks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "fsdp"
STEPS, WORLD = 12, 2
CONFIG = dict(target_modules="all-linear", rank=4, max_rank=8, alpha=8, warmup=2, interval=2, final=10, min_rank=0)


def lm_batch(step: int, n: int = 8, length: int = 10) -> dict[str, torch.Tensor]:
    """Equal lengths and no padding: every process's token-mean loss has the same weight in the average."""
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(1000 + step))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train(process: int = 0, world: int = 1, shard: bool = False, arch: str = "llama") -> dict:
    """STEPS steps of Dynamic LoRA on a tiny Llama (or a mixture of experts, its experts adapted); this process takes
    rows process::world of every batch."""
    from test_moe import moe

    torch.manual_seed(0)
    base = build("llama") if arch == "llama" else moe(arch)
    model = get_dynlora_model(base, DynamicLoRAConfig(**CONFIG, temperature=0.2)).train()
    if shard:
        shard_frozen(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    model.bind_optimizer(optimizer, STEPS)
    for step in range(1, STEPS + 1):
        batch = {k: v[process::world] for k, v in lm_batch(step).items()}
        model(**batch).loss.backward()
        if world > 1:
            average_gradients(params)
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return {
        "events": [e["ranks"] for e in model.allocation_events()],
        "adapter": {k: v.clone() for k, v in model.adapter_state_dict().items()},
        "frozen_sharded": all(isinstance(p, DTensor) for p in frozen),
        "trainable_whole": not any(isinstance(p, DTensor) for p in params),
    }


def worker(process: int, init_file: str, out_dir: str, shard: bool, arch: str = "llama") -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=process, world_size=WORLD)
    try:
        torch.save(train(process, WORLD, shard, arch), f"{out_dir}/{process}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard", [True, False], ids=["fsdp2", "replicated"])
def test_two_processes_train_as_one_on_the_whole_batch(shard, tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), shard), nprocs=WORLD, join=True)
    first, second = (torch.load(tmp_path / f"{p}.pt", weights_only=True) for p in range(WORLD))
    alone = train()
    assert first["frozen_sharded"] == shard and first["trainable_whole"]
    assert first["events"] == second["events"] == alone["events"]
    assert any(0 in ranks.values() for ranks in alone["events"])  # a layer dropped out, and training went on
    assert len({frozenset(r.items()) for r in alone["events"]}) > 1  # the allocation really moved
    for name, tensor in alone["adapter"].items():
        assert torch.equal(first["adapter"][name], second["adapter"][name]), name
        torch.testing.assert_close(first["adapter"][name], tensor, rtol=1e-3, atol=1e-3, msg=name)


def test_a_mixture_of_experts_sharded_over_two_processes_trains_as_one(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), True, "mixtral"), nprocs=WORLD, join=True)
    first, second = (torch.load(tmp_path / f"{p}.pt", weights_only=True) for p in range(WORLD))
    alone = train(arch="mixtral")
    assert first["frozen_sharded"] and first["trainable_whole"]
    assert first["events"] == second["events"] == alone["events"]
    experts = {n: r for n, r in alone["events"][-1].items() if ".experts.lora." in n}
    assert len(set(experts.values())) > 1, experts  # rank moved between the experts
    for name, tensor in alone["adapter"].items():
        assert torch.equal(first["adapter"][name], second["adapter"][name]), name
        torch.testing.assert_close(first["adapter"][name], tensor, rtol=1e-3, atol=1e-3, msg=name)


def test_a_layer_at_rank_zero_stays_in_the_graph_with_zero_gradients():
    model = get_dynlora_model(build("llama"), DynamicLoRAConfig(rank=4, init="lora")).train()
    layer = next(iter(model.lora_layers().values()))
    layer.set_rank(0)
    model(**lm_batch(0)).loss.backward()
    assert layer.lora_A.grad is not None and not layer.lora_A.grad.any()
    assert layer.lora_B.grad is not None and not layer.lora_B.grad.any()


def test_blocks_are_what_transformers_keeps_whole():
    blocks = transformer_blocks(build("llama"))
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2


TORCHRUN = ("-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "-m", "dynlora.cli")


def train_command(model: str, steps: int) -> list:
    """`dynlora train` of a tiny Llama classifier on RTE whose allocation drives a layer to rank 0."""
    command = ["train", "--task", "rte", "--model", model, "--objective", "classify", "--data-dir", GLUE]
    command += ["--max-steps", steps, "--max-train-samples", 64, "--max-eval-samples", 32, "--max-length", 64]
    return command + ["--rank", 4, "--min-rank", 0, "--temperature", 0.3, "--no-progress"]


@needs_glue
def test_dynlora_train_under_torchrun_and_accelerate_with_and_without_fsdp_equals_one_process(tmp_path):
    """The command: one process at batch 8 and two at batch 4 each (torchrun with --fsdp and without, accelerate
    launch with the shipped config) make the same re-allocations (a layer reaches rank 0), end with the same adapter
    and score the same on dev."""
    common = train_command(save_tiny_llama(tmp_path / "llama", chat_template=None), steps=8)
    accelerate = ("-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "accelerate.yaml"))
    accelerate += ("-m", "dynlora.cli")
    runs = {
        "one": dynlora(*common, "--batch-size", 8, "--output-dir", tmp_path / "one"),
        "two": dynlora(*common, "--batch-size", 4, "--output-dir", tmp_path / "two", module=TORCHRUN),
        "fsdp": dynlora(*common, "--batch-size", 4, "--fsdp", "--output-dir", tmp_path / "fsdp", module=TORCHRUN),
        "accelerate": dynlora(
            *common, "--batch-size", 4, "--fsdp", "--output-dir", tmp_path / "accelerate", module=accelerate
        ),
    }
    results, events, adapters = {}, {}, {}
    for name, done in runs.items():
        assert done.returncode == 0, done.stderr[-3000:]
        out = tmp_path / name
        results[name] = json.loads((out / "results.json").read_text())
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        events[name] = [e["ranks"] for e in log if e.get("event") == "allocation"]
        adapters[name] = load_file(glob.glob(str(out / "adapter" / "*.safetensors"))[0])
    assert all(e == events["one"] for e in events.values())
    assert any(0 in ranks.values() for ranks in events["one"])
    assert all(r["metrics"] == results["one"]["metrics"] for r in results.values())
    for name, tensor in adapters["one"].items():
        for other in ("two", "fsdp", "accelerate"):
            torch.testing.assert_close(adapters[other][name], tensor, rtol=1e-4, atol=1e-4, msg=f"{other} {name}")


@needs_glue
def test_sigterm_stops_every_fsdp_process_after_the_same_step_and_the_run_resumes_exactly(tmp_path):
    """torchrun passes SIGTERM on to its processes, each at its own moment: they agree on the step to stop after,
    save one checkpoint, one of them says how to resume, and the resumed run ends as an uninterrupted one."""
    import signal
    import subprocess
    import sys

    from helpers import ENV, wait_until_training

    command = [*train_command(save_tiny_llama(tmp_path / "llama", chat_template=None), steps=60), "--fsdp"]
    straight = dynlora(*command, "--batch-size", 4, "--output-dir", tmp_path / "straight", module=TORCHRUN)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, *TORCHRUN, *map(str, command), "--batch-size", "4", "--output-dir", str(out)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_until_training(proc, [out / "log.jsonl"])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert err.count("interrupted at step") == 1, err[-3000:]
    assert f"torchrun --nproc_per_node {WORLD} -m dynlora.cli train --output-dir {out} --resume" in err
    step = int((out / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    assert 0 < step < 60

    resumed = dynlora("train", "--output-dir", out, "--resume", "--no-progress", module=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = [json.loads((d / "results.json").read_text()) for d in (tmp_path / "straight", out)]
    assert finished[0]["metrics"] == finished[1]["metrics"] and finished[0]["ranks"] == finished[1]["ranks"]
    adapters = [load_file(glob.glob(str(d / "adapter" / "*.safetensors"))[0]) for d in (tmp_path / "straight", out)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
