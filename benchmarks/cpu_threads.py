"""Training steps per second on the CPU for torch thread counts: which count should ``gmt-align sft`` use?

```bash
python benchmarks/cpu_threads.py --model .cache/quickstart/SmolLM2-135M-Instruct --threads 1 2 --processes 1 2 --repeats 2
```

Each measurement starts ``processes`` fresh worker processes at once (several ranks, or other jobs, on one
machine), each with ``OMP_NUM_THREADS`` = its thread count, and each times ``--steps`` steps of forward,
backward and AdamW on the model (fp32, batch ``--batch`` x ``--length`` tokens) after one warm-up step. The
table gives, per (processes, threads), the median steps/s of one process over every run and repeat, with the
lowest and highest. Also printed: the machine's cores and its 1-minute load average before the runs (a busy
machine is a contended one: say so with any figure).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(model_dir: str, steps: int, batch: int, length: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, first-touch
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def measure(args, processes: int, threads: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--length", str(args.length)]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(processes)]
    rates = []
    for run in runs:
        out, err = run.communicate()
        if run.returncode != 0:
            raise SystemExit(f"worker failed (status {run.returncode}):\n{err[-2000:]}")
        rates.append(float(out.strip().splitlines()[-1]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/quickstart/SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--processes", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(worker(args.model, args.steps, args.batch, args.length))
        return
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"model {Path(args.model).name}, batch {args.batch} x {args.length} tokens, {args.steps} timed steps; "
          f"{cores} cores ({psutil.cpu_count(logical=False)} physical), load average {os.getloadavg()[0]:.2f}")
    results = {(p, t): [] for p in args.processes for t in args.threads}
    for repeat in range(args.repeats):  # interleaved, so that a change in the machine's load touches every setting
        for key in results:
            rates = measure(args, *key)
            results[key] += rates
            print(f"# repeat {repeat + 1}: {key[0]} processes x {key[1]} threads: "
                  f"{', '.join(f'{rate:.3f}' for rate in rates)} steps/s (load average {os.getloadavg()[0]:.2f})",
                  flush=True)
    print("processes  threads  steps/s per process: median (min-max), runs")
    for (processes, threads), rates in results.items():
        print(f"{processes:9d}  {threads:7d}  {statistics.median(rates):.3f} ({min(rates):.3f}-{max(rates):.3f}), "
              f"{len(rates)}")


if __name__ == "__main__":
    main()
