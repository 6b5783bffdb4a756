"""``python -m autotp``: the ``autotp`` command line (``autotp/cli.py``)."""
import sys

from .cli import main

sys.exit(main())
