"""Ctrl-C and SIGTERM ask the loop to stop at the next step boundary; a second one interrupts at once."""

from __future__ import annotations

import os
import signal

import pytest

from rlmesh.train import SIGNAL_EXIT_CODES, stop_on_signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_requests_a_stop_and_the_second_interrupts(signum: int):
    before = signal.getsignal(signum)
    with stop_on_signals() as stop:
        assert stop.signal_name is None
        os.kill(os.getpid(), signum)
        assert stop.signal_name == signal.Signals(signum).name  # noted, nothing raised: the step goes on
        with pytest.raises(KeyboardInterrupt, match="stopping now"):
            os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is before  # the previous handler is back
    assert SIGNAL_EXIT_CODES[signal.Signals(signum).name] == 128 + signum
