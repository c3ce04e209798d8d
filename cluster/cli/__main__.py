"""`python -m kiln.cli`."""

from kiln.cli import run

run()
