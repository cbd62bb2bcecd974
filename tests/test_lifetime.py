"""Children that end with the process that started them (nemo_anchored/lifetime.py): a
process that forks a sleeping child, then is SIGKILLed."""
import os
import signal
import subprocess
import sys

import pytest

from tests.launch import REPO, outlives
SCRIPT = r"""
import os, signal, sys, time
from nemo_anchored.lifetime import forked_children_die_with_this_process
if sys.argv[1] == "hook":
    forked_children_die_with_this_process()
child = os.fork()
if child == 0:
    for stream in (1, 2):  # the test reads the parent's output to its end
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("hook", [True, False])
def test_forked_child_ends_with_its_killed_parent(hook):
    result = subprocess.run([sys.executable, "-c", SCRIPT, "hook" if hook else "none"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    child = int(result.stdout)
    survived = bool(outlives([child], grace_s=5 if hook else 1))
    if survived:
        os.kill(child, signal.SIGKILL)
    assert survived != hook  # without the hook the child outlives its parent
