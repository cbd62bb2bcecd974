"""The `nemo-anchored` command line: main.py's table of sub-commands, and one module per
sub-command with its parser's arguments and what runs it (``add_arguments(parser)`` and
``run(args) -> exit status``)."""
