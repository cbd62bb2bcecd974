"""The preemption signals' handler, with real signals sent to this process (the end-to-end path,
a checkpoint and exit status 0 under torchrun on two nodes, is tests/test_cluster.py's)."""
import os
import signal

import pytest

from nemo_anchored.training.preemption import PreemptionSignals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT,
                                    signal.SIGHUP])
def test_a_signal_is_recorded_for_the_step_boundary_and_the_handlers_restored(signum):
    before = signal.getsignal(signum)
    with PreemptionSignals() as signals:
        os.kill(os.getpid(), signum)
        assert signals.received == signum  # recorded, the process still running
    assert signal.getsignal(signum) == before


def test_a_second_ctrl_c_interrupts_at_once():
    with PreemptionSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
