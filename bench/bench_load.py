"""load: peak resident memory of shard-on-load, autotp.from_pretrained per rank vs loading the whole checkpoint.

Run::

    python bench/harness.py load --preset gpt2-medium --world-sizes 2   # 24 layers, hidden 1024, ~3-5 min
    python bench/harness.py load --small                                # 4 layers of the preset, smoke test

The parent writes the preset's model with random weights (``harness.build``; gpt2-medium: fp32, 1.4 GB) with
``save_pretrained`` to a temporary directory, then measures, each in a fresh process:

* whole: ``from_pretrained(path)`` of the model's class -- what every peer (HF ``tp_plan``,
  DeepSpeed AutoTP, parallelformers) does on every rank before sharding;
* autotp: W gloo ranks under torchrun, each ``autotp.from_pretrained(path, W)`` (capture and plan
  on meta/unbacked parameters, then positional reads of the rank's slices), followed by one short
  ``generate`` so the result is known to work.

For each: the resident set after imports (the interpreter, torch, transformers and the model's
modeling module, about 90 MB of code and tables that are not the model), the peak (``VmHWM``), and
the difference, which is what loading the model cost.  The ratios are against the
checkpoint's tensor bytes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.abspath(__file__)
RANKS = False  # the launching process writes the checkpoint and starts fresh processes itself


def _model_class(path: str):
    """The checkpoint's model class, imported (its modeling code counts as imports)."""
    import transformers

    return getattr(transformers, transformers.AutoConfig.from_pretrained(path).architectures[0])


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
    cls = _model_class(path)  # the modeling code (~90 MB of imports) counts as imports

    base = rss_mb("VmRSS")
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(input_ids=torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
    print(json.dumps({"base": base, "peak": rss_mb("VmHWM")}))


def rank_job(path: str) -> None:
    import torch
    import torch.distributed as dist
    import transformers

    import autotp

    transformers.logging.set_verbosity_error()
    _model_class(path)  # the modeling code counts as imports, as above

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


def add_args(p):
    p.add_argument("--preset", default="gpt2-medium", help="one of harness.PRESETS")
    p.add_argument("--world-sizes", default="2", help="comma-separated world sizes (torchrun ranks), one run each")
    p.add_argument("--small", action="store_true", help="4 layers of the preset")


def run(a) -> dict:
    import torch

    import harness as H

    import transformers

    transformers.utils.logging.disable_progress_bar()
    pre = H.preset(a.preset)
    if a.small:
        pre = dataclasses.replace(pre, layers=4)
    tmp = tempfile.mkdtemp(prefix="bench_load_")
    out = {"model": pre.describe(), "worlds": {}}
    try:
        model = H.build(pre)
        model.save_pretrained(tmp)
        del model
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out["whole"] = last_json(subprocess.run([sys.executable, HERE, "--whole", tmp], env=env, capture_output=True,
                                                text=True, check=True).stdout)
        for w in [int(x) for x in str(a.world_sizes).split(",") if x.strip()]:
            out["worlds"][w] = last_json(subprocess.run(
                ["torchrun", "--nproc_per_node", str(w), HERE, "--rank-job", tmp], env=env, capture_output=True,
                text=True, check=True).stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["torch"] = torch.__version__
    return out


def report(a, results) -> str:
    import harness as H  # not at the top: the measured child processes import only what they measure

    res = results[0]
    w = res["whole"]
    L = ["=" * 100]
    for world, r in res["worlds"].items():
        ckpt_mb = r[0]["ckpt"]
        L.append(f"shard-on-load peak resident memory: {res['model']}, fp32, checkpoint tensors {ckpt_mb:.0f} MiB, "
                 f"world size {world}")
        body = [["whole from_pretrained", f"{w['base']:.0f}", f"{w['peak']:.0f}", f"{w['peak'] - w['base']:.0f}",
                 f"{(w['peak'] - w['base']) / ckpt_mb:.2f}"]]
        for i, row in enumerate(r):
            body.append([f"autotp rank {i}", f"{row['base']:.0f}", f"{row['peak']:.0f}",
                         f"{row['peak'] - row['base']:.0f}", f"{(row['peak'] - row['base']) / ckpt_mb:.2f}"])
        L += H.table(["MiB", "after imports", "peak", "peak - imports", "/ checkpoint"], body)
        L.append(f"per rank: parameters held {r[0]['params']:.0f} MiB, tensor bytes read {r[0]['read']:.0f} MiB; "
                 f"absolute peak / checkpoint = {r[0]['peak'] / ckpt_mb:.2f} (autotp) vs {w['peak'] / ckpt_mb:.2f} "
                 "(whole)")
        L.append("autotp timings (rank 0): " + ", ".join(f"{k} {v:.1f} s" for k, v in r[0]["timings"].items()))
    L.append("=" * 100)
    return "\n".join(L)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--whole":  # the fresh processes the parent starts
        whole(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--rank-job":
        rank_job(sys.argv[2])
    else:
        sys.path.insert(0, os.path.dirname(HERE))
        import harness

        harness.main(["load"] + sys.argv[1:])
