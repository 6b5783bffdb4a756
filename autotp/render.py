"""Pictures of a plan: ``graph.dot`` (Graphviz) and ``plan.html`` (one self-contained page).

Both read the planned graph (``autotp.graph``) and ``plan.json``'s document
(``autotp.report.plan_document``); neither reads the model.  Colours name placements the
same way everywhere: sharded blue, partial sums orange, replicated grey; a collective is
a red octagon (filled when the forward issues it, outlined when only the backward does).
"""
from __future__ import annotations

import html
import re

from .graph import blocks, identical_blocks

__all__ = ["to_dot", "html_page", "COLOURS"]

COLOURS = {"shard": "#9ecae1", "partial": "#fdae6b", "replicate": "#e0e0e0", None: "#ffffff"}
COLLECTIVE = "#cb181d"


def _q(s) -> str:
    """A DOT double-quoted string."""
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(s) -> str:
    return "x".join(str(d) for d in s) if s is not None else ""


def _short(op: str) -> str:
    return re.sub(r"^aten\.|\.(default|Tensor|int|dim|using_ints)$", "", op)


def _node_attrs(name: str, d: dict) -> dict:
    fill = COLOURS.get(d.get("placement_kind"), "#ffffff")
    if d["kind"] == "collective":
        ops = " / ".join(f"{ph}: {op}" for ph, op in (("fwd", d["forward_op"]), ("bwd", d["backward_op"])) if op)
        label = f"{d['op']}\n{d['change']}\n{_shape(d['local_shape'])}\n{ops or 'no collective'}"
        if d["forward_op"]:
            return {"label": label, "shape": "octagon", "style": "filled", "fillcolor": COLLECTIVE,
                    "fontcolor": "white", "tooltip": d["why"]}
        return {"label": label, "shape": "octagon", "style": "dashed", "color": COLLECTIVE, "fillcolor": "white",
                "tooltip": d["why"]}
    if d["kind"] == "parameter":
        label = f"{d['parameter'] or d['target']}\n{d['placement']}  {_shape(d['local_shape'])}"
        return {"label": label, "shape": "note", "style": "filled", "fillcolor": fill, "tooltip": d["role"] or ""}
    if d["kind"] == "input":
        return {"label": f"{d['target']}\n{_shape(d['shape'])}", "shape": "invhouse", "style": "filled",
                "fillcolor": fill}
    if d["kind"] == "output":
        return {"label": "output", "shape": "house", "style": "filled", "fillcolor": "#ffffff"}
    label = f"{_short(d['op'])}\n{_shape(d['local_shape'])} {d['placement'] or ''}".rstrip()
    return {"label": label, "shape": "box", "style": "rounded,filled", "fillcolor": fill, "tooltip": d["why"] or ""}


def _drawn(d: dict) -> bool:
    """Values and collectives are drawn; scalar bookkeeping (``sym_size``...) is not."""
    return d["kind"] in ("collective", "output") or d["shape"] is not None


def to_dot(g, doc: dict, *, expand: bool = False) -> str:
    """``graph.dot``: one cluster per transformer block; a group of identical blocks is drawn once,
    labelled "x N", with its edges to the rest of the graph kept (unless ``expand``)."""
    members = blocks(g)
    mapping: dict[str, str] = {}  # node of a block drawn as its group's first block -> that block's node
    titles: dict[str, str] = {b: b for b in members}
    for group in identical_blocks(g):
        if expand or len(group) < 2:
            continue
        rep = members[group[0]]
        same = [b for b in group[1:] if [g.nodes[n]["op"] for n in members[b]] == [g.nodes[n]["op"] for n in rep]]
        for b in same:
            mapping.update(zip(members[b], rep))
            titles.pop(b)
        shown = [group[0]] + same
        titles[group[0]] = f"{group[0]}  \u00d7 {len(shown)}  ({shown[0]} \u2026 {shown[-1]}: identical structure)"
    world = doc["world_size"]
    fwd = {t["op"]: t["count"] for t in doc["collective_totals"] if t["phase"] == "forward"}
    title = (f"autotp plan, world_size={world}: forward "
             + (", ".join(f"{op} x{n}" for op, n in sorted(fwd.items())) or "no collectives"))
    lines = ["digraph plan {",
             f"  graph [rankdir=TB, fontname=Helvetica, fontsize=11, labelloc=t, label={_q(title)}, newrank=true];",
             "  node [fontname=Helvetica, fontsize=9, penwidth=0.8];",
             '  edge [arrowsize=0.5, color="#777777"];']
    drawn = {n for n, d in g.nodes(data=True) if _drawn(d) and n not in mapping}
    for i, (block, title) in enumerate(titles.items()):
        lines.append(f"  subgraph {_q(f'cluster_{i}')} {{")
        lines.append(f'    label={_q(title)}; style="rounded,filled"; fillcolor="#f7f7f7"; color="#aaaaaa";')
        for n in members[block]:
            if n in drawn:
                lines.append(f"    {_q(n)} [{_attrs(_node_attrs(n, g.nodes[n]))}];")
        lines.append("  }")
    in_block = {n for b in titles for n in members[b]}
    for n in g.nodes:
        if n in drawn and n not in in_block:
            lines.append(f"  {_q(n)} [{_attrs(_node_attrs(n, g.nodes[n]))}];")
    edges = set()
    for u, v in g.edges:
        a, b = mapping.get(u, u), mapping.get(v, v)
        if a not in drawn or b not in drawn or a == b:
            continue
        if (u in mapping or v in mapping) and g.nodes[u]["block"] != g.nodes[v]["block"] and \
                g.nodes[a]["block"] == g.nodes[b]["block"]:
            continue  # one collapsed block feeding the next: drawn as the "x N" of the cluster
        edges.add((a, b))
    order = {n: i for i, n in enumerate(g.nodes)}
    for a, b in sorted(edges, key=lambda e: (order[e[0]], order[e[1]])):
        lines.append(f"  {_q(a)} -> {_q(b)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _attrs(d: dict) -> str:
    return ", ".join(f"{k}={_q(v)}" for k, v in d.items())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fff}
header{background:#24292f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d1d9}main{padding:12px 24px 40px}
h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:12.5px;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f6f8fa;position:sticky;top:0}td.n{text-align:right;
font-variant-numeric:tabular-nums}code{font-size:12px}.sw{display:inline-block;width:11px;height:11px;
border:1px solid #888;margin:0 4px 0 12px;vertical-align:-1px}#q{font-size:14px;padding:5px 8px;width:320px}
.bar{display:flex;height:18px;background:#f0f0f0;border:1px solid #ccc;margin:2px 0}.bar div{height:100%}
.bars td{border:none;padding:2px 8px}.p{background:#6baed6}.a{background:#fd8d3c}
#graph{overflow:auto;border:1px solid #ddd;max-height:900px;padding:6px}#graph svg{max-width:none}
.note{color:#8a6d3b;background:#fcf8e3;padding:6px 10px;border:1px solid #faebcc}
.tag{font-size:11px;color:#555}
"""

_JS = """
(function () {
  var q = document.getElementById('q'), shown = document.getElementById('shown');
  function filter() {
    var t = q.value.trim().toLowerCase(), n = 0;
    document.querySelectorAll('[data-name]').forEach(function (row) {
      var hit = !t || row.getAttribute('data-name').toLowerCase().indexOf(t) >= 0;
      row.style.display = hit ? '' : 'none';
      if (hit) { n += 1; }
    });
    document.querySelectorAll('#graph g.node').forEach(function (g) {
      g.style.opacity = (!t || g.textContent.toLowerCase().indexOf(t) >= 0) ? '1' : '0.15';
    });
    shown.textContent = t ? n + ' rows match' : '';
  }
  q.addEventListener('input', filter);
  if (location.hash.indexOf('#q=') === 0) {  // plan.html#q=c_attn: a link to a search
    q.value = decodeURIComponent(location.hash.slice(3));
  }
  filter();
})();
"""


def html_page(doc: dict, svg: str | None, *, note: str | None = None) -> str:
    """``plan.html``: everything inline (CSS, script, SVG), nothing fetched."""
    e = html.escape
    mem, world = doc["memory"], doc["world_size"]
    fwd = {t["op"]: t["count"] for t in doc["collective_totals"] if t["phase"] == "forward"}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<link rel="icon" href="data:,">', f"<title>autotp plan: world_size={world}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<header><h1>autotp plan &middot; world_size={world}</h1><p>{len(doc['parameters'])} parameters, "
           f"{len(doc['blocks'])} transformer blocks; per forward: "
           f"{e(', '.join(f'{op} x{n}' for op, n in sorted(fwd.items())) or 'no collectives')}; parameters per "
           f"rank {_mib(mem['param_bytes_per_rank'])} of {_mib(mem['param_bytes_total'])}</p></header><main>",
           '<p><input id="q" type="search" placeholder="search parameters, blocks, ops" aria-label="search"> '
           '<span id="shown" class="tag"></span></p>']
    out += (_memory(doc) + _totals(doc) + _blocks_table(doc) + _graph(svg, note) + _sequence(doc) + _replicated(doc)
            + _params_table(doc))
    out.append(f"</main><script>{_JS}</script></body></html>")
    return "\n".join(out)


def _graph(svg: str | None, note: str | None) -> list[str]:
    out = ["<h2>Graph</h2><p>"]
    for kind, label in (("shard", "sharded"), ("partial", "partial sum"), ("replicate", "replicated")):
        out.append(f'<span class="sw" style="background:{COLOURS[kind]}"></span>{label}')
    out.append(f'<span class="sw" style="background:{COLLECTIVE}"></span>collective (outlined: backward only)</p>')
    if note:
        out.append(f'<p class="note">{html.escape(note)}</p>')
    if svg:
        out.append('<div id="graph">' + re.sub(r"^.*?(?=<svg)", "", svg, flags=re.S) + "</div>")
    else:
        out.append('<div id="graph"><p class="note">No picture: graph.dot is beside this page '
                   "(render it with Graphviz: <code>dot -Tsvg graph.dot</code>).</p></div>")
    return out


def _memory(doc: dict) -> list[str]:
    mem = doc["memory"]
    whole = mem["unsharded"]
    scale = max(whole["param_bytes"] + whole["activation_peak_bytes"], 1)
    rows = [("unsharded (1 process)", whole["param_bytes"], whole["activation_peak_bytes"])]
    rows += [(f"rank {r['rank']}", r["param_bytes"], r["activation_peak_bytes"]) for r in mem["per_rank"]]
    out = ["<h2>Memory per rank</h2>",
           f'<p class="tag"><span class="sw p"></span>parameters <span class="sw a"></span>activations (peak of '
           f"an inference forward at the example inputs' size); scale: the unsharded model</p>",
           '<table class="bars">']
    for name, p, a in rows:
        out.append(f'<tr><td style="width:160px">{name}</td><td><div class="bar">'
                   f'<div class="p" style="width:{100 * p / scale:.2f}%"></div>'
                   f'<div class="a" style="width:{100 * a / scale:.2f}%"></div></div></td>'
                   f'<td class="n" style="width:220px">{_mib(p)} + {_mib(a)}</td></tr>')
    out.append("</table>")
    return out


def _totals(doc: dict) -> list[str]:
    out = ["<h2>Collectives</h2><table><tr><th>phase</th><th>op</th><th>count</th>"
           "<th>bytes sent per rank</th></tr>"]
    for t in doc["collective_totals"]:
        out.append(f"<tr><td>{t['phase']}</td><td>{t['op']}</td><td class='n'>{t['count']}</td>"
                   f"<td class='n'>{t['message_bytes']:,}</td></tr>")
    if not doc["collective_totals"]:
        out.append("<tr><td colspan=4>none: nothing is sharded</td></tr>")
    out.append("</table>")
    return out


def _blocks_table(doc: dict) -> list[str]:
    e = html.escape
    params = doc["parameters"]
    out = ["<h2>Transformer blocks</h2>", '<table id="blocks"><tr><th>block</th><th>same structure as</th>'
           "<th>parameters (placement)</th><th>collectives fwd / bwd</th><th>parameter bytes per rank</th>"
           "<th>collective bytes per rank</th></tr>"]
    for b in doc["blocks"]:
        names = " ".join(b["parameters"])
        plist = ", ".join(f"{e(p.rsplit('.', 2)[-2] if p.count('.') >= 2 else p)}.{e(p.rsplit('.', 1)[-1])} "
                          f"<code>{e(params[p]['placement'])}</code>" for p in b["parameters"])
        out.append(f'<tr class="block" data-name="{e(b["name"] + " " + names)}"><td><code>{e(b["name"])}</code></td>'
                   f"<td>{e(b['same_as'] or '')}</td><td>{plist}</td>"
                   f"<td class='n'>{b['collectives']['forward']} / {b['collectives']['backward']}</td>"
                   f"<td class='n'>{b['param_bytes_per_rank']:,}</td><td class='n'>{b['collective_message_bytes']:,}</td></tr>")
    if not doc["blocks"]:
        out.append("<tr><td colspan=6>no transformer block found (no module list in the model)</td></tr>")
    out.append("</table>")
    return out


def _params_table(doc: dict) -> list[str]:
    e = html.escape
    out = ["<h2>Parameters</h2>", '<table id="params"><tr><th>parameter</th><th>placement</th><th>global</th>'
           "<th>local</th><th>role</th><th>bytes per rank</th></tr>"]
    for name, p in doc["parameters"].items():
        out.append(f'<tr data-name="{e(name)}"><td><code>{e(name)}</code></td><td><code>{e(p["placement"])}</code></td>'
                   f"<td>{_shape(p['global_shape'])}</td><td>{_shape(p['local_shape'])}</td><td>{e(p['role'])}</td>"
                   f"<td class='n'>{p['local_bytes']:,}</td></tr>")
    out.append("</table>")
    return out


def _sequence(doc: dict) -> list[str]:
    """Sequence parallelism's regions: how many values sit on a sequence shard, and why those at an edge do not."""
    seq = doc.get("sequence")
    if not seq:
        return []
    e = html.escape
    out = ["<h2>Sequence-parallel regions</h2>",
           f"<p>{len(seq['nodes'])} values between the parallel blocks are sharded along the sequence (each rank "
           "holds 1/world of them): reduce-scatter into a region, all-gather out of it.</p>"]
    if seq["kept"]:
        out.append('<table id="sequence-kept"><tr><th>left as it was</th><th>why</th></tr>')
        out += [f"<tr><td><code>{e(n)}</code></td><td>{e(why)}</td></tr>" for n, why in seq["kept"].items()]
        out.append("</table>")
    return out


def _replicated(doc: dict) -> list[str]:
    e = html.escape
    out = ["<h2>Left replicated</h2>"]
    if not doc["replicated"]:
        return out + ["<p>Every layer the analysis could shard is sharded.</p>"]
    out.append('<table id="replicated"><tr><th>parameter</th><th>why</th><th>path</th></tr>')
    for r in doc["replicated"]:
        path = " \u2192 ".join(r["path"])
        out.append(f'<tr data-name="{e(r["parameter"])}"><td><code>{e(r["parameter"])}</code></td><td>{e(r["why"])}</td>'
                   f"<td><code>{e(path)}</code></td></tr>")
    out.append("</table>")
    return out
