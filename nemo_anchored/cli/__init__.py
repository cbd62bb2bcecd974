"""The `nemo-anchored` command line."""
