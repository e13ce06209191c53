"""Batched generation: prefill, then the decode loop driven from C++ (or its Python twin).

``generate(model, prompts, params)`` runs:

1. prefill: prompts right-padded to the longest, one forward over the static KV cache;
   each row's logits are taken at its own last real token;
2. the first sampling step on those logits;
3. the decode loop: model step (one token per row at that row's own position; the pad
   entries a short row left in the cache are masked by its cache length and overwritten
   as it advances) + sampling step, with the sampled token staying on the device. On
   CUDA both are captured once in a CUDA graph and replayed. The host reads the device
   only every ``sync_every`` tokens: finished flags and new tokens in one transfer, then
   streaming and stop-string checks happen on the host.

Two engines run the loop: ``"cpp"`` (csrc/sampling.cpp) and ``"python"``
(gptfast.reference.sampling driven from Python). They pick identical tokens.
"""
import collections
import dataclasses
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch

from gptfast import cpu_linear
from gptfast.reference import sampling as twin
from gptfast.sampling import (
    SamplingParams,
    build_sampling_tensors,
    load_extension,
    new_decode_state,
    resolve_seeds,
)

DEFAULT_SYNC_EVERY = 16
ENGINES = ("auto", "cpp", "python")


class InvalidLogitsError(RuntimeError):
    """The model produced NaN logits, or every token of a row was masked to -inf."""


@dataclass
class GenerationResult:
    """One row's output.

    ``token_ids`` are the generated tokens: a stop token that ended the row is included;
    tokens after a stop string are dropped. ``text`` (with a tokenizer) is their decoding
    without the stop token and cut before the stop string. ``finish_reason`` is "stop"
    (stop token or string; ``stop_reason`` says which) or "length".
    """

    prompt_token_ids: List[int]
    token_ids: List[int]
    finish_reason: str
    stop_reason: Union[int, str, None]
    seed: int
    text: Optional[str] = None
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[tuple]]] = None


# ---- engines ----------------------------------------------------------------------------


_TABLES = {}


def _cached_table(make, vocab_size, device):
    """Token hash tables are constant per (vocabulary, device): build each once."""
    key = (make, vocab_size, str(torch.device(device)))
    if key not in _TABLES:
        _TABLES[key] = make(vocab_size, device)
    return _TABLES[key]


class CppEngine:
    """The C++ extension's sampling step and decode loop. ``force_aten`` makes CPU tensors
    take the general ATen path (the one CUDA runs) instead of the CPU fast path."""

    name = "cpp"

    def __init__(self, module, force_aten: bool = False):
        self.module, self.force_aten = module, force_aten

    def token_table(self, vocab_size, device):
        return _cached_table(self.module.token_table, vocab_size, torch.device(device))

    def sample_step(self, logits, p, s):
        return self.module.sample_step(logits, p, s, self.force_aten)

    def decode_loop(self, p, s, model_step, graph_replay, on_sync, num_steps, sync_every, first_step):
        return self.module.decode_loop(p, s, model_step, graph_replay, on_sync, num_steps, sync_every, first_step,
                                       self.force_aten)


class PythonEngine:
    """The twin: gptfast.reference.sampling's step, and the same loop written in Python."""

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


def get_engine(engine: str = "auto"):
    """``"cpp"`` (error if the extension is unavailable), ``"python"``, or ``"auto"``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "python":
        return PythonEngine()
    module = load_extension()
    if module is None:
        if engine == "cpp":
            from gptfast.sampling import extension_status

            raise RuntimeError(f"engine='cpp' but the C++ sampling extension is unavailable: {extension_status()}")
        return PythonEngine()
    return CppEngine(module)


# ---- inputs -----------------------------------------------------------------------------


def _normalize_prompts(prompts, tokenizer, vocab_size) -> List[List[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.is_floating_point():
            raise ValueError(f"prompt tensor must be (T,) or (B, T) integer token ids, got {tuple(prompts.shape)} {prompts.dtype}")
        prompts = prompts.tolist()
    elif isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    out = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {row} is a string: pass tokenizer= to encode it")
            prompt = tokenizer.encode(prompt)
        prompt = list(prompt)
        if not prompt:
            raise ValueError(f"prompt {row} is empty: generation needs at least one prompt token")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"prompt {row} holds a non-integer token id {t!r}")
            if not 0 <= t < vocab_size:
                raise ValueError(f"prompt {row} holds token id {t}, outside the vocabulary of {vocab_size} tokens")
        out.append(prompt)
    return out


def _normalize_params(params, batch) -> List[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"got {len(params)} SamplingParams for {batch} prompts")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
    return params


# ---- host side of the loop: chunks, streaming, stop strings ---------------------------


class _HostRows:
    """What the host knows about each row; updated at every sync from one device read."""

    def __init__(self, prompts, params, seeds, state, tokenizer, stream):
        self.params, self.state, self.tokenizer, self.stream = params, state, tokenizer, stream
        B = len(prompts)
        self.prompts, self.seeds = prompts, seeds
        self.tokens = [[] for _ in range(B)]
        self.done = [False] * B
        self.reason = ["length"] * B
        self.stop_reason = [None] * B
        self.text = [""] * B  # decoded text so far (stop token excluded, cut at a stop string)
        self.sent_tokens = [0] * B
        self.sent_text = [0] * B
        self.checked = [0] * B  # tokens whose text was already searched for stop strings
        self.synced = 0  # device steps already read

    def on_sync(self, generated: int) -> bool:
        """Read steps [synced, generated) of every row; return True when all rows are done."""
        s, B = self.state, len(self.tokens)
        flags = torch.stack([s.finish_reason, s.bad_step], dim=1)
        packed = torch.cat([flags, s.out_tokens[:, self.synced:generated]], dim=1).cpu()  # the one sync
        if (packed[:, 1] >= 0).any():
            row = int((packed[:, 1] >= 0).nonzero()[0])
            raise InvalidLogitsError(
                f"row {row}: logits are NaN or all -inf at generated token {int(packed[row, 1])} (after penalties, "
                "logit bias and min_new_tokens masking); check the model's weights and dtype (fp16 overflow?) and "
                "that logit_bias does not ban every token"
            )
        self.synced = generated
        stop_string_rows = []
        for row in range(B):
            if self.done[row]:
                continue
            self.checked[row] = len(self.tokens[row])
            self.tokens[row].extend(t for t in packed[row, 2:].tolist() if t >= 0)
            device_reason = int(packed[row, 0])
            if device_reason == twin.FINISH_STOP_TOKEN:
                self._finish(row, "stop", self.tokens[row][-1])
            elif device_reason == twin.FINISH_LENGTH:
                self._finish(row, "length", None)
            if self.tokenizer is not None and self._update_text(row) and device_reason == twin.FINISH_RUNNING:
                stop_string_rows.append(row)
            self._emit(row)
        if stop_string_rows:  # tell the device: these rows stop generating
            index = torch.tensor(stop_string_rows, device=s.finished.device)
            s.finished[index] = True
            s.finish_reason[index] = twin.FINISH_STOP_STRING
        return all(self.done)

    def _finish(self, row, reason, stop_reason):
        self.done[row], self.reason[row], self.stop_reason[row] = True, reason, stop_reason

    def _update_text(self, row) -> bool:
        """Decode the row; on a stop string cut text and tokens there. True if one matched."""
        tokens = self.tokens[row]
        visible = tokens[:-1] if self.reason[row] == "stop" and self.stop_reason[row] is not None else tokens
        text = self.tokenizer.decode(visible)
        stops = self.params[row].stop
        if stops:
            start = max(0, len(self.text[row]) - max(len(x) for x in stops) + 1)
            hits = [(text.find(x, start), x) for x in stops if text.find(x, start) >= 0]
            if hits:
                at, matched = min(hits)
                # Keep the fewest tokens whose text contains the whole stop string.
                keep = next(n for n in range(self.checked[row], len(visible) + 1)
                            if self.tokenizer.decode(visible[:n]).find(matched, start) >= 0)
                del tokens[keep:]
                self.text[row] = text[:at]
                self._finish(row, "stop", matched)
                return True
        self.text[row] = text
        return False

    def _emit(self, row):
        if self.stream is None:
            return
        new_tokens = self.tokens[row][self.sent_tokens[row]:]
        text_delta = None
        if self.tokenizer is not None:
            end = len(self.text[row])
            if not self.done[row]:
                # Hold back what may still change: a partial UTF-8 character, or the start
                # of a stop string that the next tokens could complete.
                hold = max((len(x) for x in self.params[row].stop), default=1) - 1
                end = max(self.sent_text[row], end - hold)
                while end > self.sent_text[row] and self.text[row][end - 1] == "\ufffd":
                    end -= 1
            text_delta = self.text[row][self.sent_text[row]:end]
            self.sent_text[row] = end
        self.sent_tokens[row] = len(self.tokens[row])
        if new_tokens or text_delta:
            self.stream(row, new_tokens, text_delta)

    def results(self) -> List[GenerationResult]:
        s = self.state
        out = []
        lp = s.out_logprobs.cpu() if s.out_logprobs is not None else None
        top_ids = s.out_top_ids.cpu() if s.out_top_ids is not None else None
        top_lp = s.out_top_logprobs.cpu() if s.out_top_logprobs is not None else None
        for row, p in enumerate(self.params):
            n = len(self.tokens[row])
            result = GenerationResult(
                prompt_token_ids=list(self.prompts[row]),
                token_ids=list(self.tokens[row]),
                finish_reason=self.reason[row],
                stop_reason=self.stop_reason[row],
                seed=self.seeds[row],
                text=self.text[row] if self.tokenizer is not None else None,
            )
            if p.logprobs is not None:
                result.logprobs = lp[row, :n].tolist()
                if p.logprobs > 0:
                    ids, values = top_ids[row, :n, : p.logprobs].tolist(), top_lp[row, :n, : p.logprobs].tolist()
                    result.top_logprobs = [list(zip(i, v)) for i, v in zip(ids, values)]
                else:
                    result.top_logprobs = [[] for _ in range(n)]
            out.append(result)
        return out


# ---- KV cache and CUDA graphs -----------------------------------------------------------


def _ensure_cache(model, batch, length, device, dtype):
    """Reuse the model's KV cache when it has exactly this shape (captured graphs point at
    it), else allocate one."""
    cache = getattr(model, "kv_cache", None)
    if (cache is not None and cache.max_batch == batch and cache.max_seq_len == length
            and cache.k.device == device and cache.k.dtype == dtype):
        return
    model.setup_cache(batch, length, device=device, dtype=dtype)


def _signature(obj):
    """Shapes, dtypes and host values of a SamplingTensors / DecodeState (a graph's key)."""
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            parts.append((f.name, tuple(value.shape), value.dtype, str(value.device)))
        else:
            parts.append((f.name, value))
    return tuple(parts)


class _DecodeGraphs:
    """Captured decode steps (model step + sampling step) per model, reused across calls.

    A graph is tied to the memory it captured: the model's parameters and KV cache, and a
    static SamplingTensors / DecodeState, into which each new call copies its values.
    """

    MAX_PER_MODEL = 4

    def __init__(self):
        self._graphs = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, model, engine, p, s):
        """(graph, static p, static s); p and s are copied into the static ones if cached."""
        cache = model.kv_cache
        key = (engine.name, _signature(p), _signature(s), cache.k.data_ptr(), getattr(model, "backend", None),
               tuple(t.data_ptr() for t in model.parameters()))
        with self._lock:
            per_model = self._graphs.setdefault(model, collections.OrderedDict())
            hit = per_model.get(key)
            if hit is not None:
                per_model.move_to_end(key)
                graph, p_static, s_static = hit
                _copy_sampling_tensors(p_static, p)
                s_static.copy_(s)
                return graph, p_static, s_static
        graph = _capture(model, engine, p, s)
        with self._lock:
            per_model[key] = (graph, p, s)
            while len(per_model) > self.MAX_PER_MODEL:
                per_model.popitem(last=False)
        return graph, p, s


def _copy_sampling_tensors(dst, src):
    for f in dataclasses.fields(dst):
        value = getattr(dst, f.name)
        if isinstance(value, torch.Tensor):
            value.copy_(getattr(src, f.name))


def _capture(model, engine, p, s):
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


_GRAPHS = _DecodeGraphs()


def _graphs_supported(device) -> bool:
    return device.type == "cuda"


# ---- generate ---------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    prompts,
    params=None,
    *,
    tokenizer=None,
    stream: Optional[Callable] = None,
    engine: str = "auto",
    sync_every: int = DEFAULT_SYNC_EVERY,
    cuda_graph: Optional[bool] = None,
    eos_token_id: Optional[int] = None,
) -> List[GenerationResult]:
    """Generate continuations of ``prompts`` with ``model`` (a gptfast GPT).

    prompts: a list of token-id lists or strings (strings need ``tokenizer``), or one
    prompt; a (B, T) tensor of ids also works. params: one ``SamplingParams`` for all
    rows, or one per row (rows may differ freely), default ``SamplingParams()``.
    stream: ``stream(row, new_token_ids, new_text)`` is called as tokens arrive (every
    ``sync_every`` tokens; ``new_text`` is None without a tokenizer). engine: "cpp",
    "python" (the twin) or "auto". cuda_graph: capture the decode step on CUDA (default
    True there). eos_token_id: end-of-text token (default: the tokenizer's).
    Returns one ``GenerationResult`` per prompt, in order.
    """
    vocab_size = model.config.vocab_size
    prompts = _normalize_prompts(prompts, tokenizer, vocab_size)
    params = _normalize_params(params, len(prompts))
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if tokenizer is None and any(p.stop for p in params):
        raise ValueError("stop strings need a tokenizer: pass tokenizer= (or use stop_token_ids)")
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    eng = get_engine(engine)

    weight = next(model.parameters())  # a GPT's embedding (an int8 LM head has no float weight)
    device, dtype = weight.device, weight.dtype
    B, longest = len(prompts), max(len(t) for t in prompts)
    max_new = max(p.max_new_tokens for p in params)
    length = longest + max_new
    if length > model.config.block_size:
        raise ValueError(
            f"context overflow: longest prompt ({longest}) + max_new_tokens ({max_new}) exceeds the model's context "
            f"of {model.config.block_size} tokens"
        )
    seeds = resolve_seeds(params)
    p = build_sampling_tensors(params, vocab_size, seeds, device, eos_token_id, token_table=eng.token_table)
    s = new_decode_state(prompts, params, p, vocab_size, device)

    _ensure_cache(model, B, length, device, dtype)
    # On CPU float32 the linear layers run on prepacked weights (gptfast.cpu_linear).
    with cpu_linear.packed_linears(model):
        # Prefill: right padding; each row's logits at its own last prompt token only.
        lens = torch.tensor([len(t) for t in prompts], device=device)
        idx = torch.zeros(B, longest, dtype=torch.long)
        for row, tokens in enumerate(prompts):
            idx[row, : len(tokens)] = torch.tensor(tokens)
        with torch.profiler.record_function("prefill"):  # named ranges for `gptfast profile generate`
            logits = model(idx.to(device), input_pos=torch.arange(longest, device=device), logits_index=lens - 1)
        with torch.profiler.record_function("sample"):
            eng.sample_step(logits[:, 0], p, s)

        use_graph = _graphs_supported(device) if cuda_graph is None else cuda_graph
        if use_graph and not _graphs_supported(device):
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {device}")
        model_step, graph_replay = (lambda tokens, positions: model(tokens, input_pos=positions)), False
        if use_graph and max_new > 1:
            try:
                graph, p, s = _GRAPHS.get(model, eng, p, s)
                model_step, graph_replay = graph.replay, True
            except Exception as e:  # capture is an optimisation: decode eagerly instead
                warnings.warn(f"gptfast: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
        host = _HostRows(prompts, params, seeds, s, tokenizer, stream)
        if not host.on_sync(1) and max_new > 1:
            with torch.profiler.record_function("decode"):
                eng.decode_loop(p, s, model_step, graph_replay, host.on_sync, max_new - 1, sync_every, 1)
        return host.results()


def generate_ids(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k=None, seed=None):
    """``GPT.generate``'s contract on top of ``generate``: a (B, T) tensor (or list) of
    prompts in, (B, T + max_new_tokens) ids out, no stop tokens."""
    device = next(model.parameters()).device
    idx = torch.as_tensor(prompt_ids, dtype=torch.long)
    idx = idx[None] if idx.dim() == 1 else idx
    if idx.dim() != 2:
        raise ValueError(f"prompt_ids must be (T,) or (B, T) token ids, got shape {tuple(idx.shape)}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                            seed=0 if seed is None else seed, ignore_eos=True)
    results = generate(model, idx.tolist(), params)
    new = torch.tensor([r.token_ids for r in results], dtype=torch.long)
    return torch.cat([idx, new], dim=1).to(device)
