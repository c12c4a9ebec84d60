"""Subcommands of the `moekit` CLI, one module each (see moekit.cli)."""
