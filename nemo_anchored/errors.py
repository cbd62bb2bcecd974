"""The one base class of the failures a user can fix (a bad recipe, data file, checkpoint or
argument): every layer raises its own subclass, and the command line reports any of them in one
line instead of a traceback (nemo_anchored/cli/main.py). Plain Python, so every layer can
import it."""


class UserError(Exception):
    """An expected failure that the CLI reports in one line with exit status 2; its message
    names the file, key or flag at fault. Anything else is a bug and keeps its traceback."""
