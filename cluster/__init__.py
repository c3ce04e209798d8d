"""Kiln's front door: settings, connecting to Ray, the `kiln` CLI and the Python client."""
