"""``python -m autotp``: the ``autotp`` command line (``autotp/cli.py``)."""
from .cli import run

run()
