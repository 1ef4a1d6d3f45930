"""Simulate a baseline / post-dose [11C]AZ10419369 study: the ``petbind-simulate`` command.

Kept for checkouts without the console script installed::

    python scripts/simulate_study.py OUT [--subjects N] [--seed S] [--kinetics {srtm,2tcm}] ...

Options and outputs: ``petbind-simulate --help`` (:mod:`petbind.sim.cli`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petbind.sim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
