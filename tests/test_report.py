"""What ``Plan.dump`` writes: ``plan.json`` against its schema and against a real run,
``graph.dot`` read back by networkx/pydot, identical blocks found by structure, "why
replicated" paths, and ``plan.html`` in a real headless browser.

The run comparison: a GPT-2 planned in this process at world size 4 must report, in
``plan.json``, the collectives (op, order, per-rank message shape, dtype, bytes) and byte
totals that ``CommDebugMode`` records when the same model runs sharded on 4 gloo ranks; the
ranks dump their own plan through ``AUTOTP_DUMP`` at ``shard`` time, which must equal ours.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections import Counter

import networkx as nx
import pytest
import torch
from torch import nn

import autotp
from autotp import graph as G
from autotp.report import SCHEMA, plan_document, validate
from distributed import run_ranks

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAYERS = 3


def _gpt2(layers: int = LAYERS):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=64, vocab_size=99,
                                  bos_token_id=98, eos_token_id=98, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids():
    return torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gpt2_dump(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2_plan")
    plan = autotp.plan(_gpt2(), 4, example_inputs=(_ids(),), example_kwargs={"use_cache": False})
    written = plan.dump(out)
    return plan, written, json.loads((out / "plan.json").read_text())


class LayerNormOverShard(nn.Module):
    """A column linear whose output is layer-normed over the features: its shard cannot be kept."""

    def __init__(self):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


# ---------------------------------------------------------------------------------------------- plan.json


def test_plan_json_follows_its_schema_and_its_numbers_add_up(gpt2_dump):
    plan, _, doc = gpt2_dump
    assert validate(doc) == []
    assert doc["world_size"] == 4 and doc["example_inputs"] == [{"name": "input_ids", "shape": [2, 8],
                                                                 "dtype": "int64"}]
    assert sum(p["local_bytes"] for p in doc["parameters"].values()) == doc["memory"]["param_bytes_per_rank"]
    assert sum(p["bytes"] for p in doc["parameters"].values()) == doc["memory"]["param_bytes_total"]
    assert [r["rank"] for r in doc["memory"]["per_rank"]] == [0, 1, 2, 3]
    rank0, whole = doc["memory"]["per_rank"][0], doc["memory"]["unsharded"]
    assert 0 < rank0["activation_peak_bytes"] <= rank0["activation_bytes"]
    assert rank0["activation_bytes"] < whole["activation_bytes"]  # sharded activations are smaller
    assert len(doc["collectives"]) == len(plan.collectives)
    # blocks: one per layer of the config, the later ones recognised as the first's structure
    assert [b["name"] for b in doc["blocks"]] == [f"transformer.h.{i}" for i in range(LAYERS)]
    # the last block differs: its residual sum meets ln_f (no residual after it), so the analysis
    # reduces its MLP's partial sum before the add instead of adding the residual on rank 0
    assert [b["same_as"] for b in doc["blocks"]] == [None] + ["transformer.h.0"] * (LAYERS - 2) + [None]
    assert all(b["collectives"] == {"forward": 2, "backward": 2} for b in doc["blocks"])  # Megatron: 2 per layer
    assert all(len(b["parameters"]) == 12 for b in doc["blocks"])


def test_activation_bytes_of_an_mlp_counted_by_hand():
    # x (4, 8) -> linear (4, 32) -> relu -> linear (4, 8), fp32, 2 ranks: each holds half the hidden (4, 16)
    plan = autotp.plan(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)), 2,
                       example_inputs=(torch.randn(4, 8),))
    mem = plan_document(plan)["memory"]
    x, y, hidden, hidden_local = 4 * 8 * 4, 4 * 8 * 4, 4 * 32 * 4, 4 * 16 * 4
    assert mem["per_rank"][1]["activation_bytes"] == x + 2 * hidden_local + y
    assert mem["per_rank"][1]["activation_peak_bytes"] == 2 * hidden_local  # relu's input and output; x is freed
    assert mem["unsharded"]["activation_bytes"] == x + 2 * hidden + y
    assert mem["unsharded"]["activation_peak_bytes"] == 2 * hidden


def test_the_schema_check_finds_what_breaks_it(gpt2_dump):
    doc = gpt2_dump[2]
    broken = []
    for edit in (lambda d: d.pop("schema_version"), lambda d: d["memory"].update(per_rank="all"),
                 lambda d: d["collectives"][0].update(op="broadcast"), lambda d: d.update(extra=1),
                 lambda d: d["blocks"][0].update(nodes=-1), lambda d: d["parameters"].update(w={"placement": "R"}),
                 lambda d: d["collectives"][0].update(bytes=True)):
        bad = copy.deepcopy(doc)
        edit(bad)
        broken.append(validate(bad))
    assert all(len(errors) >= 1 for errors in broken), broken
    assert "$.memory.per_rank: expected array" in broken[1][0]
    json.dumps(SCHEMA)  # the schema is JSON itself (a JSON Schema a reader can use)


def test_replicated_layers_name_the_path_to_the_op_that_could_not_keep_the_shard(tmp_path):
    plan = autotp.plan(LayerNormOverShard(), 2, example_inputs=(torch.randn(4, 8),))
    plan.dump(tmp_path)
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert validate(doc) == []
    (entry,) = [r for r in doc["replicated"] if r["parameter"] == "up.weight"]
    at = re.search(r"\(at (\w+)\)$", entry["why"]).group(1)
    g = G.planned_graph(plan)
    path = entry["path"]
    assert g.nodes[path[0]]["parameter"] == "up.weight" and path[-1] == at
    assert g.nodes[at]["op"] == "aten.layer_norm.default"
    assert all(g.has_edge(a, b) for a, b in zip(path, path[1:]))
    assert doc["parameters"]["up.weight"]["placement"] == "R"


# ---------------------------------------------------------------------------------------------- vs a real run


def _ran(rank: int, world: int, dump_dir: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from test_plan_contract import Recorder

    os.environ["AUTOTP_DUMP"] = dump_dir  # rank 0 dumps the plan it applies
    sharded = autotp.shard(_gpt2(), world, example_inputs=(_ids(),), example_kwargs={"use_cache": False})
    sharded(_ids(), use_cache=False)  # the first call checks the ranks' inputs agree (not in the plan)
    with Recorder() as fwd:
        out = sharded(_ids(), use_cache=False)
    with Recorder() as bwd:
        out.logits.float().square().mean().backward()
    return {**{phase: {"log": [(op, list(shape), str(dtype).replace("torch.", ""),
                                int(torch.Size(shape).numel()) * dtype.itemsize) for op, shape, dtype in rec.log],
                       "counted": rec.counted()}
               for phase, rec in (("forward", fwd), ("backward", bwd))},
            "fusions": [dict(f) for f in sharded.plan.fusions]}


def test_plan_json_reports_the_collectives_and_bytes_a_real_run_issues(gpt2_dump, tmp_path):
    doc = gpt2_dump[2]
    runs = run_ranks(_ran, 4, str(tmp_path / "from_shard"))
    planned = {ph: [(c["op"], tuple(c["local_shape"]), c["dtype"], c["message_bytes"]) for c in doc["collectives"]
                    if c["phase"] == ph] for ph in ("forward", "backward")}
    totals = {(t["op"], t["phase"]): (t["count"], t["message_bytes"]) for t in doc["collective_totals"]}
    for rank, ran in enumerate(runs):
        assert ran["forward"]["log"], rank
        ran_fwd, ran_bwd = ([(op, tuple(shape), dtype, n) for op, shape, dtype, n in ran[ph]["log"]]
                            for ph in ("forward", "backward"))
        assert ran_fwd == planned["forward"], rank  # in order
        assert Counter(ran_bwd) == Counter(planned["backward"]), rank
        for phase in ("forward", "backward"):
            assert ran[phase]["counted"] == sum(n for (_, ph), (n, _) in totals.items() if ph == phase)
            for op in ("all_reduce", "all_gather"):
                mine = [x for x in ran[phase]["log"] if x[0] == op]
                assert (len(mine), sum(x[3] for x in mine)) == totals.get((op, phase), (0, 0)), (rank, phase, op)
    from_shard = json.loads((tmp_path / "from_shard" / "plan.json").read_text())
    # AUTOTP_DUMP at shard time wrote the plan this process made, and what rank 0's lowering fused
    assert doc["fusions"] == [] and from_shard.pop("fusions") == runs[0]["fusions"]
    assert from_shard == {k: v for k, v in doc.items() if k != "fusions"}


def test_autotp_dump_at_plan_time(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTP_DUMP", str(tmp_path / "d"))
    autotp.plan(LayerNormOverShard(), 2, example_inputs=(torch.randn(4, 8),))
    assert {"plan.json", "graph.dot", "plan.html"} <= set(os.listdir(tmp_path / "d"))


# ---------------------------------------------------------------------------------------------- graph.dot


def _dot_node_attributes(path) -> dict:
    """``{node: attributes}`` as pydot reads them, clusters included (networkx's reader keeps the
    topology of nodes declared in a cluster but not their attributes)."""
    import pydot

    out, todo = {}, list(pydot.graph_from_dot_file(str(path)))
    while todo:
        graph = todo.pop()
        for node in graph.get_node_list():
            if node.get_name() not in ("node", "edge", "graph"):
                out[node.get_name().strip('"')] = {k: v.strip('"') for k, v in node.get_attributes().items()}
        todo += graph.get_subgraph_list()
    return out


def test_graph_dot_parses_back_coloured_clustered_and_collapsed(gpt2_dump, tmp_path):
    plan = gpt2_dump[0]
    g = G.planned_graph(plan)
    drawn = {n for n, d in g.nodes(data=True) if d["shape"] is not None or d["kind"] in ("collective", "output")}
    plan.dump(tmp_path / "expanded", expand=True)
    full = nx.nx_pydot.read_dot(str(tmp_path / "expanded" / "graph.dot"))
    names = {n.strip('"') for n in full.nodes} - {"node", "edge", "graph", "\\n"}
    assert names == drawn
    assert {(a.strip('"'), b.strip('"')) for a, b, _ in full.edges} == {(a, b) for a, b in g.edges
                                                                        if a in drawn and b in drawn}
    attrs = _dot_node_attributes(tmp_path / "expanded" / "graph.dot")
    assert set(attrs) == drawn
    fills = {}
    for n, d in g.nodes(data=True):
        if d["kind"] == "parameter":
            fills.setdefault(d["placement_kind"], set()).add(attrs[n]["fillcolor"])
    assert len(fills["shard"]) == 1 and len(fills["replicate"]) == 1 and fills["shard"] != fills["replicate"]
    collectives = [n for n, d in g.nodes(data=True) if d["kind"] == "collective"]
    assert collectives and all(attrs[n]["shape"] == "octagon" for n in collectives)
    assert all(attrs[n]["shape"] != "octagon" for n in drawn if n not in collectives)
    # collapsed (the default): the first block is drawn for itself and its twin h.1, "x 2"; h.1 is
    # not drawn; the last block (another structure, see above) is drawn on its own
    plan.dump(tmp_path / "collapsed")
    text = (tmp_path / "collapsed" / "graph.dot").read_text()
    small = nx.nx_pydot.read_dot(str(tmp_path / "collapsed" / "graph.dot"))
    kept = {n.strip('"') for n in small.nodes}
    members = G.blocks(g)
    assert set(members["transformer.h.0"]) & drawn <= kept
    assert set(members[f"transformer.h.{LAYERS - 1}"]) & drawn <= kept
    assert not set(members["transformer.h.1"]) & kept
    assert f"\u00d7 {LAYERS - 1}" in text and text.count("subgraph") == 2
    assert small.number_of_nodes() < full.number_of_nodes()


def test_svg_when_graphviz_is_installed_and_a_note_when_not(gpt2_dump, tmp_path, monkeypatch):
    plan = gpt2_dump[0]
    if shutil.which("dot"):
        written = plan.dump(tmp_path / "with")
        import xml.etree.ElementTree as ET

        root = ET.parse(written["graph.svg"]).getroot()
        assert root.tag.endswith("svg") and "note" not in written
        assert "<svg" in (tmp_path / "with" / "plan.html").read_text()
    import autotp.report

    monkeypatch.setattr(autotp.report.shutil, "which", lambda name: None)
    written = plan.dump(tmp_path / "without")
    assert "graph.svg" not in written and "apt-get install graphviz" in written["note"]
    assert not (tmp_path / "without" / "graph.svg").exists()
    assert "apt-get install graphviz" in (tmp_path / "without" / "plan.html").read_text()


# ---------------------------------------------------------------------------------------------- identical blocks


class Stack(nn.Module):
    """Embedding -> blocks -> head, the blocks in a module list called ``attr``; ``wide`` widens block 1."""

    def __init__(self, attr: str = "layers", wide: bool = False):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        blocks = [nn.Sequential(nn.Linear(16, 64 if (wide and i == 1) else 32), nn.GELU(),
                                nn.Linear(64 if (wide and i == 1) else 32, 16)) for i in range(3)]
        setattr(self, attr, nn.ModuleList(blocks))
        self.attr = attr

    def forward(self, ids):
        h = self.emb(ids)
        for b in getattr(self, self.attr):
            h = h + b(h)
        return h


def _hashes(model) -> dict:
    plan = autotp.plan(model, 2, example_inputs=(torch.randint(0, 64, (2, 5)),))
    return G.block_hashes(G.planned_graph(plan))


def test_identical_blocks_are_found_by_structure_not_by_name():
    same, renamed, wide = _hashes(Stack()), _hashes(Stack("blocks")), _hashes(Stack(wide=True))
    assert list(same) == ["layers.0", "layers.1", "layers.2"] and len(set(same.values())) == 1
    assert list(renamed) == ["blocks.0", "blocks.1", "blocks.2"]
    assert list(renamed.values()) == list(same.values())  # another name, the same structure
    assert wide["layers.0"] == wide["layers.2"] != wide["layers.1"]


# ---------------------------------------------------------------------------------------------- plan.html


def _chromium(*args: str, url: str, profile) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    """Console messages (headless chromium logs every level as INFO:CONSOLE): the page writes none."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                              ".ci/run installs it)")
def test_plan_page_in_headless_chromium(gpt2_dump, tmp_path):
    page = gpt2_dump[1]["plan.html"]
    text = open(page).read()
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert all(v.startswith(("data:", "#")) for v in links), links  # nothing fetched: one file, offline
    # the detector of console messages sees an error when there is one
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert _console(_chromium("--dump-dom", url=bad.as_uri(), profile=tmp_path / "p0").stderr)

    run = _chromium("--dump-dom", url=f"file://{page}", profile=tmp_path / "p1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console(run.stderr) == []
    rows = re.findall(r'<tr class="block" data-name="([^" ]+)', run.stdout)
    assert rows == [f"transformer.h.{i}" for i in range(LAYERS)]
    assert "<svg" in run.stdout and 'id="q"' in run.stdout
    # the search (here from the address: plan.html#q=...) hides the rows that do not match
    run = _chromium("--dump-dom", url=f"file://{page}#q=transformer.h.1.", profile=tmp_path / "p2")
    assert _console(run.stderr) == []
    tags = re.findall(r'<tr class="block"[^>]*>', run.stdout)
    assert len(tags) == LAYERS
    shown = [re.search(r'data-name="([^" ]+)', t).group(1) for t in tags if "display: none" not in t]
    assert shown == ["transformer.h.1"]
    shot = tmp_path / "plan_page.png"  # a test artifact, in pytest's tmp dir
    run = _chromium("--screenshot=" + str(shot), "--window-size=1200,1400", url=f"file://{page}",
                    profile=tmp_path / "p3")
    assert _console(run.stderr) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
