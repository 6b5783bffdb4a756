"""Peak resident memory of shard-on-load: autotp.from_pretrained per rank vs loading the whole checkpoint.

Run::

    python bench/bench_load.py            # GPT-2-medium config (24 layers, hidden 1024, 16 heads), ~3-5 min
    python bench/bench_load.py --small    # 4 layers, smoke test

The parent writes a GPT-2-medium-sized model with random weights (fp32, 1.4 GB) with
``save_pretrained`` to a temporary directory, then measures, each in a fresh process:

* whole: ``GPT2LMHeadModel.from_pretrained(path)`` -- what every peer (HF ``tp_plan``,
  DeepSpeed AutoTP, parallelformers) does on every rank before sharding;
* autotp: 2 gloo ranks under torchrun, each ``autotp.from_pretrained(path, 2)`` (capture and plan
  on meta/unbacked parameters, then positional reads of the rank's slices), followed by one short
  ``generate`` so the result is known to work.

For each: the resident set after imports (the interpreter, torch, transformers and the model's
modeling module, about 90 MB of code and tables that are not the model), the peak (``VmHWM``), and
the difference, which is what loading the model cost.  The ratios are against the
checkpoint's tensor bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.abspath(__file__)


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def whole(path: str) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import GPT2LMHeadModel  # the modeling code (~90 MB of imports) counts as imports

    base = rss_mb("VmRSS")
    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
    print(json.dumps({"base": base, "peak": rss_mb("VmHWM")}))


def rank_job(path: str) -> None:
    import torch
    import torch.distributed as dist
    import transformers

    import autotp

    transformers.logging.set_verbosity_error()
    import transformers.models.gpt2.modeling_gpt2  # the modeling code counts as imports, as above

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = rss_mb("VmRSS")
    model = autotp.from_pretrained(path, dist.get_world_size())
    with torch.no_grad():
        model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
    row = {"base": base, "peak": rss_mb("VmHWM"), "read": model.autotp_load_stats["bytes_read"] / 2**20,
           "params": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
           "timings": model.autotp_steps.timings, "ckpt": model.autotp_load_stats["checkpoint_bytes"] / 2**20}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print(json.dumps(rows))
    dist.destroy_process_group()


def last_json(out: str):
    return json.loads([line for line in out.splitlines() if line.startswith(("{", "["))][-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--whole", help=argparse.SUPPRESS)
    p.add_argument("--rank-job", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.whole:
        return whole(a.whole)
    if a.rank_job:
        return rank_job(a.rank_job)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    layers = 4 if a.small else 24
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=1024, n_head=16, n_positions=1024)
    tmp = tempfile.mkdtemp(prefix="bench_load_")
    try:
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        model.save_pretrained(tmp)
        del model
        env = dict(os.environ, OMP_NUM_THREADS="1")
        w = last_json(subprocess.run([sys.executable, HERE, "--whole", tmp], env=env, capture_output=True,
                                     text=True, check=True).stdout)
        r = last_json(subprocess.run(["torchrun", "--nproc_per_node", str(a.world), HERE, "--rank-job", tmp], env=env,
                                     capture_output=True, text=True, check=True).stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ckpt_mb = r[0]["ckpt"]
    print("=" * 100)
    print(f"shard-on-load peak resident memory: GPT2LMHeadModel {layers} layers x 1024 (n_head 16), fp32, "
          f"checkpoint tensors {ckpt_mb:.0f} MiB, world size {a.world}")
    print(f"{'':<28}{'after imports':>14}{'peak':>10}{'peak - imports':>16}{'/ checkpoint':>14}")
    print(f"{'whole from_pretrained':<28}{w['base']:>14.0f}{w['peak']:>10.0f}{w['peak'] - w['base']:>16.0f}"
          f"{(w['peak'] - w['base']) / ckpt_mb:>14.2f}")
    for i, row in enumerate(r):
        print(f"{f'autotp rank {i}':<28}{row['base']:>14.0f}{row['peak']:>10.0f}{row['peak'] - row['base']:>16.0f}"
              f"{(row['peak'] - row['base']) / ckpt_mb:>14.2f}")
    print(f"per rank: parameters held {r[0]['params']:.0f} MiB, tensor bytes read {r[0]['read']:.0f} MiB; "
          f"absolute peak / checkpoint = {r[0]['peak'] / ckpt_mb:.2f} (autotp) vs {w['peak'] / ckpt_mb:.2f} (whole)")
    print("autotp timings (rank 0): " + ", ".join(f"{k} {v:.1f} s" for k, v in r[0]["timings"].items()))
    print(f"command: python bench/bench_load.py{' --small' if a.small else ''}")
    print("=" * 100)


if __name__ == "__main__":
    main()
