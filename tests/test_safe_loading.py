"""Loading never unpickles what it reads from disk.

* A scan of the package's source (autotp/*.py, autotp/rules/*.py, passes/*.py): no
  ``pickle.load`` / ``pickle.loads`` / ``pickle.Unpickler`` (however imported), no
  ``torch.load`` without ``weights_only=True``, no ``numpy.load(allow_pickle=True)``.  One
  file is allowed pickle: ``autotp/launch.py`` (see ``PICKLE_ALLOWED``).
* Crafted checkpoints at world size 2 (gloo): a format-1 checkpoint whose pickled metadata
  would create a marker directory when unpickled, a format-2 checkpoint whose DCP
  ``.metadata`` pickle would, and one whose ``autotp.json`` declares a pickled object or a
  file outside the checkpoint directory.  Each is refused with a clear error (or, for the
  ``.metadata`` one, loads without reading that file), and no marker ever appears.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import pickle
import shutil

import pytest
import torch

from distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The one file allowed to unpickle: autotp/launch.py's WorkerPool sends messages between the
# parent process and the worker processes it started itself, as pickle bytes over
# multiprocessing pipes.  Nothing it unpickles is read from disk (a checkpoint reaches the
# workers as a path, and they load it with autotp's own loaders), so it is no way in for a
# file's contents.  Any other use of pickle to read data fails the scan.
PICKLE_ALLOWED = {"autotp/launch.py"}

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve"}
UNPICKLING = {"load", "loads", "Unpickler", "open"}  # shelve.open unpickles what it reads


def _package_files() -> list[str]:
    files = [*glob.glob(os.path.join(ROOT, "autotp", "*.py")), *glob.glob(os.path.join(ROOT, "autotp", "rules", "*.py")),
             *glob.glob(os.path.join(ROOT, "passes", "*.py"))]
    return sorted(os.path.relpath(f, ROOT) for f in files)


def _true_keyword(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<source>") -> list[tuple[int, str, str]]:
    """``(line, kind, what)`` of every way ``source`` could unpickle data: kind "pickle" (any use of an
    unpickling function of a pickle-like module) or "torch.load" / "numpy.load" (a call that may unpickle)."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> the dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(node) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    found = []
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Name, ast.Attribute)) or isinstance(getattr(node, "ctx", None), ast.Store):
            continue
        name = dotted(node)
        if name is None:
            continue
        module, _, attr = name.rpartition(".")
        call = calls.get(id(node))
        if module.split(".")[0] in PICKLE_MODULES and attr in UNPICKLING:
            found.append((node.lineno, "pickle", name))
        elif name in ("torch.load", "torch.serialization.load"):
            if call is None or not _true_keyword(call, "weights_only"):
                found.append((node.lineno, "torch.load", "without weights_only=True"))
        elif name == "numpy.load" and call is not None and _true_keyword(call, "allow_pickle"):
            found.append((node.lineno, "numpy.load", "allow_pickle=True"))
    return sorted(set(found))


def test_the_scan_finds_every_spelling():
    bad = """
import pickle, torch, numpy as np
import pickle as pk
from pickle import loads as undump
from torch import load
import torch.serialization
pickle.loads(b"")
pk.load(f)
undump(b"")
class U(pickle.Unpickler): pass
torch.load(f)
torch.load(f, weights_only=False)
load(f, map_location="cpu")
torch.serialization.load(f)
np.load(f, allow_pickle=True)
reader = torch.load
"""
    found = unsafe_loads(bad)
    assert [line for line, _, _ in found] == [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], found
    good = """
import pickle, torch, numpy as np
data = pickle.dumps(obj)
pickle.dump(obj, f)
torch.load(f, map_location="cpu", weights_only=True)
np.load(f)
obj.load(f)
"""
    assert unsafe_loads(good) == []


def test_no_unpickling_of_files_in_the_package():
    files = _package_files()
    assert "autotp/checkpoint.py" in files and "autotp/rules/base.py" in files and "passes/base.py" in files
    unsafe = {}
    for rel in files:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            found = unsafe_loads(f.read(), rel)
        if rel in PICKLE_ALLOWED:
            found = [u for u in found if u[1] != "pickle"]
        if found:
            unsafe[rel] = found
    assert unsafe == {}, f"these may unpickle data read from files (see PICKLE_ALLOWED for the one exception): {unsafe}"
    # the exception is still needed (else drop it): launch.py's pipes do unpickle
    with open(os.path.join(ROOT, "autotp", "launch.py"), encoding="utf-8") as f:
        assert any(kind == "pickle" for _, kind, _ in unsafe_loads(f.read()))


# ---------------------------------------------------------------------------------------------
# crafted checkpoints, at world size 2


class Payload:
    """Unpickling this creates the directory ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _sharded(world: int, seed: int):
    import autotp

    torch.manual_seed(seed)
    return autotp.shard(MLP(), world, example_inputs=(torch.randn(2, 8),))


def _attempt(fn) -> str:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the message is what the test reads (DCP's errors are BaseExceptions)
        return f"{type(e).__name__}: {e}"
    return "loaded"


def _crafted(rank, world, root):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import autotp.checkpoint as ckpt

    def marker(name: str) -> str:
        return os.path.join(root, f"EXECUTED-{name}")

    sharded = _sharded(world, seed=0)
    params = {name: p.detach().clone() for name, p in sharded.module.named_parameters()}
    out = {}

    # (a) a format-1 checkpoint as an older autotp wrote it: metadata pickled into DCP byte entries,
    #     here payloads (loading it the old way would run them: pickle.loads, or DCP's torch.load)
    old = os.path.join(root, "format1")
    dcp.save({"model": dict(params), "autotp": {"meta": pickle.dumps(Payload(marker("meta"))),
                                                "extra": Payload(marker("extra"))}}, checkpoint_id=old)
    out["format1"] = _attempt(lambda: ckpt.load(old, _sharded(world, seed=1)))

    # a genuine format-2 checkpoint, to tamper with
    good = os.path.join(root, "good")
    ckpt.save(good, sharded, step=7, extra={"pos": 3})
    dist.barrier()
    if rank == 0:
        # (b) DCP's .metadata replaced by a payload: autotp never reads that file
        shutil.copytree(good, os.path.join(root, "metadata_payload"))
        with open(os.path.join(root, "metadata_payload", ".metadata"), "wb") as f:
            pickle.dump(Payload(marker("dcp_metadata")), f)
        # (c) autotp.json says a tensor is a pickled object, stored (as DCP stores objects) in a file
        #     of the directory: DCP would torch.load(weights_only=False) it
        bytes_dir = os.path.join(root, "bytes_entry")
        shutil.copytree(good, bytes_dir)
        torch.save(Payload(marker("bytes_entry")), os.path.join(bytes_dir, "__0_1.distcp"))
        doc = json.load(open(os.path.join(bytes_dir, "autotp.json")))
        doc["dcp"]["tensors"]["model.up.weight"]["kind"] = "bytes"
        for entry in doc["dcp"]["storage"]:
            if entry["fqn"] == "model.up.weight":
                entry.update(file="__0_1.distcp", start=0, length=os.path.getsize(os.path.join(bytes_dir,
                                                                                                  "__0_1.distcp")))
        json.dump(doc, open(os.path.join(bytes_dir, "autotp.json"), "w"))
        # (d) autotp.json points a tensor at a file outside the checkpoint directory
        outside = os.path.join(root, "outside")
        shutil.copytree(good, outside)
        doc = json.load(open(os.path.join(outside, "autotp.json")))
        doc["dcp"]["storage"][0]["file"] = "../format1/__0_0.distcp"
        json.dump(doc, open(os.path.join(outside, "autotp.json"), "w"))
    dist.barrier()

    loaded = _sharded(world, seed=2)
    out["metadata_payload"] = _attempt(lambda: out.__setitem__(
        "metadata_payload_info", ckpt.load(os.path.join(root, "metadata_payload"), loaded)))
    out["same_weights"] = all(torch.equal(p, params[name]) for name, p in loaded.module.named_parameters())
    out["bytes_entry"] = _attempt(lambda: ckpt.load(os.path.join(root, "bytes_entry"), _sharded(world, seed=1)))
    out["outside"] = _attempt(lambda: ckpt.load(os.path.join(root, "outside"), _sharded(world, seed=1)))
    dist.barrier()
    out["markers"] = sorted(n for n in os.listdir(root) if n.startswith("EXECUTED"))
    return out


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("crafted"))
    return root, run_ranks(_crafted, 2, root)


def test_the_payload_is_live(tmp_path):
    # what the crafted checkpoints hold does run code when unpickled: the tests below are meaningful
    pickle.loads(pickle.dumps(Payload(str(tmp_path / "EXECUTED"))))
    assert os.path.isdir(tmp_path / "EXECUTED")


def test_crafted_checkpoints_run_nothing(crafted):
    root, results = crafted
    assert [r["markers"] for r in results] == [[], []]
    assert not any(n.startswith("EXECUTED") for n in os.listdir(root))


def test_format_1_checkpoint_is_refused_not_unpickled(crafted):
    for r in crafted[1]:  # every rank raises the same clear error
        assert r["format1"].startswith("ValueError: checkpoint at "), r["format1"]
        assert "was written by an older autotp (checkpoint format 1" in r["format1"]
        assert "cannot be loaded safely" in r["format1"] and "arbitrary code" in r["format1"]


def test_dcp_metadata_pickle_is_never_read(crafted):
    for r in crafted[1]:
        assert r["metadata_payload"] == "loaded", r["metadata_payload"]
        assert r["metadata_payload_info"] == {"step": 7, "extra": {"pos": 3}, "world_size": 2}
        assert r["same_weights"]


def test_declared_pickled_object_is_refused(crafted):
    for r in crafted[1]:
        assert r["bytes_entry"].startswith("ValueError: "), r["bytes_entry"]
        assert "says 'model.up.weight' is stored as 'bytes', not as a tensor" in r["bytes_entry"]
        assert "never unpickles" in r["bytes_entry"]


def test_file_outside_the_checkpoint_is_refused(crafted):
    for r in crafted[1]:
        assert r["outside"].startswith("ValueError: "), r["outside"]
        assert "names the file '../format1/__0_0.distcp', not a file of the checkpoint directory" in r["outside"]
