"""Stop signals: a rank that stopped keeps ignoring them until it exits (a late copy of the signal must not turn
the preemption exit 75, which requeues, into a death by signal, which does not)."""

import signal
from types import SimpleNamespace

from gorilla_dist.stopping import SIGNALS, StopSignals

LAYOUT = SimpleNamespace(rank=1, world=1, is_main=False)


def test_after_a_stop_the_signals_stay_ignored_until_exit():
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        stop = StopSignals(LAYOUT)
        stop.saved()
        stop.close()
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_without_a_stop_close_restores_the_handlers_from_before():
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        stop = StopSignals(LAYOUT)
        assert all(signal.getsignal(sig) == stop._handle for sig in SIGNALS)
        stop.close()
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
