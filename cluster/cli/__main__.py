"""`python -m cluster.cli`."""

from cluster.cli import run

run()
