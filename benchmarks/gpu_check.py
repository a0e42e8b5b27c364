"""The device check: the shipped models trained in bf16 on a GPU, each adapter method side by side.

    python benchmarks/gpu_check.py [--steps 200] [--models minilm,smollm2] [--device cuda] [--precision bf16]

On a machine without CUDA it prints one line and exits 0 (``--device cpu`` runs the same code on the CPU as a
smoke test, and writes nothing). For each setup of step_time.py (MiniLM-L6 q/v, SmolLM2-135M with its 210
projections) and each method (the frozen limit, dynlora static LoRA, Dynamic LoRA, PEFT LoRA, PEFT AdaLoRA),
one at a time on the device (step_time.py's rows: static LoRA also at Dynamic LoRA's capacity, Dynamic LoRA with the
input adaptation off and on): ``--steps`` training steps after a warm-up, then

- step time, as a ratio to the frozen limit (device-synchronised wall time over the steps);
- peak device memory (``torch.cuda.max_memory_allocated``) of that method alone;
- host syncs per step: calls that read a tensor's value back to the host (``item``, ``tolist``, ``bool``,
  ``cpu``, ...), counted by a TorchFunctionMode over 20 steps between two re-allocations, in every library (model,
  PEFT, dynlora, and torch's AdamW, which reads its step count once per parameter unless fused or capturable):
  Dynamic LoRA's count minus static LoRA's is the engine's.

On CUDA it writes benchmarks/results/gpu_check.json and the gpu_check section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from common import write_section
from step_time import SETUPS, make_step

from dynlora.diagnostics import HostReads

HERE = Path(__file__).resolve().parent
SYNC_STEPS = 20
BATCH = {"minilm": (32, 128), "smollm2": (8, 256)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(build, batch, steps: int, dtype: torch.dtype | None, device: torch.device) -> dict[str, float]:
    """Warm-up, timed steps, peak memory and host reads per step of one method, alone on the device."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(build(), batch, autocast=dtype)
    for _ in range(5):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    with HostReads() as reads:
        for _ in range(SYNC_STEPS):
            step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    del step
    gc.collect()
    return {"step_s": seconds, "peak_mib": peak, "host_reads_per_step": reads.count / SYNC_STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run that writes nothing")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per method")
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; skipped (--device cpu runs it on the CPU as a smoke test)")
        return
    models = args.models.split(",")
    unknown = [m for m in models if m not in SETUPS]
    if unknown:
        sys.exit(f"error: unknown model {unknown[0]!r}; choose from {', '.join(SETUPS)}")
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    results: dict[str, dict[str, dict[str, float]]] = {}
    lines = []
    for name in models:
        setup = dataclasses.replace(SETUPS[name], device=args.device)
        batch = setup.batch(*BATCH[name])
        configs = setup.train_configs()
        results[name] = {m: measure(build, batch, args.steps, dtype, device) for m, build in configs.items()}
        limit = results[name]["frozen limit"]["step_s"]
        lines.append(f"{setup.title}; batch {BATCH[name][0]}x{BATCH[name][1]}, {args.precision}, {device}")
        lines.append(f"  {'method':<30} {'step / frozen':>14} {'peak MiB':>10} {'host reads/step':>16}")
        for method, r in results[name].items():
            lines.append(
                f"  {method:<30} {r['step_s'] / limit:>13.3f}x {r['peak_mib']:>10.0f} {r['host_reads_per_step']:>16.1f}"
            )
    print("\n".join(lines))
    if device.type != "cuda":
        return

    env = {
        "date": date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    record = {"command": command.strip(), "env": env, "steps": args.steps, "precision": args.precision, **results}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "gpu_check.json").write_text(json.dumps(record, indent=2) + "\n")
    body = f"""## Device check ({env["gpu"]}, {args.precision})

`{record["command"]}` — {env["date"]}; torch {env["torch"]}, transformers {env["transformers"]}. Each method alone
on the device, {args.steps} timed steps after 5 warm-up steps; host reads counted over {SYNC_STEPS} steps.

```
{chr(10).join(lines)}
```

Raw figures: [results/gpu_check.json](results/gpu_check.json)."""
    write_section(HERE / "RESULTS.md", "gpu_check", body)


if __name__ == "__main__":
    main()
