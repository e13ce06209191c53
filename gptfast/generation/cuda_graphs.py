"""CUDA graphs of the decode step (model step + sampling step), cached per model.

A graph replays reads and writes at the addresses it captured: the model's parameters,
every buffer (each layer's KV cache), and a static SamplingTensors / DecodeState into
which each new call copies its values. ``graph_key`` names all of them, so a graph is
reused only when every one is the same memory.
"""
import collections
import dataclasses
import threading
import weakref

import torch

from gptfast.generation.decode_state import copy_fields


def _signature(obj):
    """Shapes, dtypes and host values of a SamplingTensors / DecodeState."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            parts.append((f.name, tuple(value.shape), value.dtype, str(value.device)))
        else:
            parts.append((f.name, value))
    return tuple(parts)


def _addresses(named_tensors):
    return tuple((name, t.data_ptr(), tuple(t.shape), t.dtype) for name, t in named_tensors)


def graph_key(model, engine_name: str, p, s) -> tuple:
    """What a captured decode step depends on: the engine, the backend, the sampling
    tensors' and state's layout, and the address of every parameter and buffer of
    ``model`` (all layers' KV caches included)."""
    return (engine_name, getattr(model, "backend", None), _signature(p), _signature(s),
            _addresses(model.named_parameters()), _addresses(model.named_buffers()))


def capture(model, engine, p, s):
    """Capture one decode step. Warm-up runs first on a side stream (allocator, cuBLAS,
    Triton compilation): the model step rewrites the cache entry the first real step
    writes anyway; the sampling step advances a scratch copy of the state."""
    scratch = s.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            engine.sample_step(model(s.tokens, input_pos=s.positions), p, scratch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        engine.sample_step(model(s.tokens, input_pos=s.positions), p, s)
    return graph


class DecodeGraphs:
    """Captured decode steps per model (a few each, least recently used dropped)."""

    MAX_PER_MODEL = 4

    def __init__(self, capture_fn=capture, device_types=("cuda",)):
        self._graphs = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._capture, self.device_types = capture_fn, device_types

    def supports(self, device) -> bool:
        return torch.device(device).type in self.device_types

    def get(self, model, engine, p, s):
        """(graph, static p, static s); on a hit, p and s are copied into the static ones."""
        key = graph_key(model, engine.name, p, s)
        with self._lock:
            per_model = self._graphs.setdefault(model, collections.OrderedDict())
            hit = per_model.get(key)
            if hit is not None:
                per_model.move_to_end(key)
                graph, p_static, s_static = hit
                copy_fields(p_static, p)
                copy_fields(s_static, s)
                return graph, p_static, s_static
        graph = self._capture(model, engine, p, s)
        with self._lock:
            per_model[key] = (graph, p, s)
            while len(per_model) > self.MAX_PER_MODEL:
                per_model.popitem(last=False)
        return graph, p, s


GRAPHS = DecodeGraphs()
