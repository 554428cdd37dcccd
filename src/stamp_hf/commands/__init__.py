"""Subcommands of the `stamp-hf` console script (see stamp_hf.cli)."""
