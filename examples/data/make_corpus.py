"""Write ``corpus.jsonl``: real English prose from the docstrings of Python's standard library.

    python examples/data/make_corpus.py            # rewrites examples/data/corpus.jsonl

One document per module: its docstring, then the docstrings of its public classes,
functions and methods, in source order. No network; the output is committed so that
the examples and tests never run this (docstrings differ a little between Python
versions). The text is Python's documentation, under the PSF license.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import sys
import warnings

# Modules that act when imported (open a browser, print, start a GUI) or hold no prose.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3",
        "__hello__", "__phello__", "ensurepip", "venv", "xxlimited", "xxlimited_35", "xxsubtype"}
MIN_DOC_CHARS = 400      # a module with less text than this is left out (no prose to learn from)
MAX_DOC_CHARS = 2_500    # per module, so no single module dominates the corpus


def _members(module):
    """Public classes and functions defined in ``module`` (not re-exported), in source order."""
    out = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            out.append((name, obj))
            out.extend((f"{name}.{m}", f) for m, f in vars(obj).items()
                       if not m.startswith("_") and inspect.isfunction(f))
        elif inspect.isfunction(obj):
            out.append((name, obj))

    def line(item):
        try:
            return inspect.getsourcelines(item[1])[1]
        except (OSError, TypeError):
            return 1 << 30
    return sorted(out, key=line)


def module_text(name: str) -> str:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-only or optional modules (msvcrt, _tkinter, ...)
            return ""
    parts = [inspect.cleandoc(module.__doc__)] if module.__doc__ else []
    for member, obj in _members(module):
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40:
            parts.append(f"{member}: {doc}")
    text = "\n\n".join(parts)
    if len(text) > MAX_DOC_CHARS:  # cut at a paragraph boundary
        cut = text.rfind("\n\n", 0, MAX_DOC_CHARS)
        text = text[:cut if cut > 0 else MAX_DOC_CHARS]
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.jsonl"))
    ap.add_argument("--max-bytes", type=int, default=350_000, help="stop once the corpus is this large")
    args = ap.parse_args()
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP)
    docs, size = [], 0
    for name in names:
        text = module_text(name)
        if len(text) < MIN_DOC_CHARS:
            continue
        line = json.dumps({"text": text, "source": f"python {sys.version_info.major}.{sys.version_info.minor} "
                                                  f"stdlib: {name}"}, ensure_ascii=False)
        if size + len(line) + 1 > args.max_bytes:
            break
        docs.append(line)
        size += len(line.encode()) + 1
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    print(f"wrote {len(docs)} documents, {size:,} bytes to {args.output}")


if __name__ == "__main__":
    main()
