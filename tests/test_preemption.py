import os
import signal

import pytest

from moco.runtime import preemption


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}
    preemption.reset()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption.reset()


@pytest.mark.parametrize("sig", preemption.SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_only_sets_the_stop_flag(handlers, sig):
    preemption.install()
    assert not preemption.stop_requested()
    os.kill(os.getpid(), sig)  # the process survives: the default action (terminate) is replaced
    assert preemption.stop_requested()
    assert str(preemption.Preempted(4)) == f"stopped by {signal.Signals(sig).name} at step 4"
