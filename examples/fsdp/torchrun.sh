#!/usr/bin/env bash
# A sharded dynlora run launched by torchrun: one process per GPU (NPROC, default 2), the frozen base sharded over
# them with FSDP2 (--fsdp), the adapters whole on each process. The global batch is NPROC × --batch-size; the
# run's allocation, adapter and scores equal a one-process run at that batch (tests/test_sharded.py).
# Extra arguments go to `dynlora train`, e.g.:  examples/fsdp/torchrun.sh --max-steps 50 --output-dir runs/fsdp
set -euo pipefail
torchrun --nproc_per_node "${NPROC:-2}" -m dynlora.cli train --fsdp \
    --model smollm2 --task sst2 --precision bf16 --batch-size 8 --max-steps 200 "$@"
