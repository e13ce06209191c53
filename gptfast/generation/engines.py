"""The two engines that run the sampling step and the decode loop: ``"cpp"``
(csrc/sampling.cpp, loaded by gptfast.runtime.extension) and ``"python"`` (the twin,
gptfast.reference.sampler, driven from Python). They pick identical tokens."""
import torch

from gptfast.runtime import extension
from gptfast.reference import sampler as twin
from gptfast.reference import speculative_round as speculative_twin

ENGINES = ("auto", "cpp", "python")
_TABLES = {}


def _cached_table(make, vocab_size, device):
    """Token hash tables are constant per (vocabulary, device): build each once."""
    key = (make, vocab_size, str(torch.device(device)))
    if key not in _TABLES:
        _TABLES[key] = make(vocab_size, torch.device(device))
    return _TABLES[key]


class CppEngine:
    """The C++ extension's sampling step and decode loop. ``force_aten`` makes CPU tensors
    take the general ATen path (the one CUDA runs) instead of the CPU fast path."""

    name = "cpp"

    def __init__(self, module, force_aten: bool = False):
        self.module, self.force_aten = module, force_aten

    def token_table(self, vocab_size, device):
        return _cached_table(self.module.token_table, vocab_size, device)

    def sample_step(self, logits, p, s):
        return self.module.sample_step(logits, p, s, self.force_aten)

    def decode_loop(self, p, s, model_step, graph_replay, on_sync, num_steps, sync_every, first_step):
        return self.module.decode_loop(p, s, model_step, graph_replay, on_sync, num_steps, sync_every, first_step,
                                       self.force_aten)

    def speculative_loop(self, p, s, spec, draft_step, verify_step, on_sync, num_rounds, sync_rounds, k, first_step):
        return self.module.speculative_loop(p, s, spec, draft_step, verify_step, on_sync, num_rounds, sync_rounds, k,
                                            first_step, self.force_aten)


class PythonEngine:
    """The twin: gptfast.reference.sampler's step, and the same loop written in Python."""

    name = "python"

    @staticmethod
    def token_table(vocab_size, device):
        return _cached_table(twin.token_table, vocab_size, device)

    @staticmethod
    def sample_step(logits, p, s):
        return twin.sample_step(logits, p, s)

    @staticmethod
    def decode_loop(p, s, model_step, graph_replay, on_sync, num_steps, sync_every, first_step):
        """Line for line the loop of csrc/sampling.cpp (see ``decode_loop`` there)."""
        host_reads_are_free = s.tokens.device.type == "cpu"
        for i in range(num_steps):
            if graph_replay:
                model_step()
            else:
                twin.sample_step(model_step(s.tokens, s.positions), p, s)
            generated = first_step + i + 1
            sync = generated % sync_every == 0 or i + 1 == num_steps
            if not sync and host_reads_are_free:
                sync = bool(s.finished.all()) or int(s.bad_step.max()) >= 0
            if sync and on_sync(generated):
                return i + 1
        return num_steps

    @staticmethod
    def speculative_loop(p, s, spec, draft_step, verify_step, on_sync, num_rounds, sync_rounds, k, first_step):
        """Line for line ``speculative_loop`` of csrc/sampling.cpp: rounds of
        gptfast.reference.speculative_round, a host sync every ``sync_rounds`` rounds (and, on CPU,
        as soon as every row is done or a row's logits went bad)."""
        host_reads_are_free = s.tokens.device.type == "cpu"
        width = s.out_tokens.shape[1]
        for i in range(num_rounds):
            speculative_twin.speculative_round(p, s, spec, draft_step, verify_step, k)
            bound = min(width, first_step + (i + 1) * (k + 1))
            sync = (i + 1) % sync_rounds == 0 or i + 1 == num_rounds
            if not sync and host_reads_are_free:
                sync = bool(s.finished.all()) or int(s.bad_step.max()) >= 0
            if sync and on_sync(bound):
                return i + 1
        return num_rounds


def get_engine(engine: str = "auto"):
    """``"cpp"`` (error if the extension is unavailable), ``"python"``, or ``"auto"``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "python":
        return PythonEngine()
    module = extension.load_extension()
    if module is None:
        if engine == "cpp":
            raise RuntimeError(f"engine='cpp' but the C++ sampling extension is unavailable: "
                               f"{extension.extension_status()}")
        return PythonEngine()
    return CppEngine(module)
