"""The ``gptfast`` verbs, one module each (see gptfast/cli.py), and what they share."""
import contextlib
import signal


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within this block SIGTERM (what `timeout` sends) raises KeyboardInterrupt, so a
    long run stops measuring and still reports what it measured."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
