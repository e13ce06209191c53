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


def device_arg(value: str):
    """argparse ``type`` of a ``--device`` flag: the torch.device that ``value`` (auto, cpu,
    cuda, cuda:N) stands for here. A nonsense name, or CUDA on a machine without it, is a
    usage error naming the flag and the value, before anything loads."""
    import argparse

    from gptfast.runtime.devices import resolve_device

    try:
        return resolve_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
