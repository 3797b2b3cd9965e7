"""Build a LongABC-style dataset with LongAttn: windows → resumable multi-process scoring → selection → export (→ push).

Single process (CPU or one GPU); the offline demo is the default config:

    python recipes/longabc.py --config recipes/configs/demo.yaml
    # prints a per-category summary table and writes longattn-demo/hub
    # (datasets.load_dataset("longattn-demo/hub", "filtered")); the time is in the README's demo section

Several processes on one machine (one per GPU; gloo on CPU):

    accelerate launch --num_processes 8 recipes/longabc.py --config recipes/configs/longabc32k.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/longabc.py --config recipes/configs/demo.yaml  # 2 CPU processes
    torchrun --standalone --nproc_per_node 8 recipes/longabc.py --config recipes/configs/longabc32k.yaml

(`accelerate launch --cpu` always starts one process, whatever --num_processes says; the run says so.)

Several machines, on storage every machine sees at the same path (output_dir), run on each
machine (machine_rank 0 … N−1; num_processes counts all processes of all machines):

    accelerate launch --num_machines 4 --machine_rank $RANK --main_process_ip 10.0.0.1 \
        --main_process_port 29500 --num_processes 32 \
        recipes/longabc.py --config recipes/configs/longabc32k.yaml

Slurm (one task per node, each starting 8 GPU processes):

    #SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8
    export MAIN=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)
    srun bash -c 'accelerate launch --num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID \
        --main_process_ip $MAIN --main_process_port 29500 --num_processes $((8 * SLURM_NNODES)) \
        recipes/longabc.py --config recipes/configs/longabc32k.yaml'

What to expect. Every process claims input files (one shard each) and windows them into
output_dir/windows (token ids only); then every process claims the next free chunk (chunk_size
windows of one shard) and writes output_dir/scores/chunk-NNNNNN.parquet plus a ``.done`` marker
(row count, sha256, config fingerprint, digest of the windows it holds). Kill any process at any
moment and relaunch the same command, on any number of processes: finished work is skipped and
the rest is spread over every process; the final data has every window exactly once. Edited,
added or removed source files are noticed: only their windows are rebuilt and rescored.
Relaunching into the same output_dir with a different model, W, k, layer, dtype or chunk_size is
refused; selection settings (keep_fraction, alpha, ...) may change freely. While a launch runs,
it holds output_dir/.lock: a second launch into the same folder is refused. The main process then
merges, selects (output_dir/selection.parquet), exports (output_dir/hub) and, with
``--push-to-hub REPO_ID``, uploads; with HF_HUB_OFFLINE=1 and a push target it stops before any work.
The options are those of ``hf-longattn run`` (``python recipes/longabc.py --help``), e.g.
``--output-dir``, ``--input PATH``, ``--push-to-hub``, ``--set keep_fraction=0.25``.
Cost in the paper (LongABC-32K-Raw, 36B tokens, H800): ~100 GPU-hours with LLaMA-3.1-70B.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from hf_longattn.cli import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_longattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
