"""The host side of the decode loop: what each row has produced, streaming, stop strings.

The device keeps the loop state (gptfast.generation.decode_state.DecodeState); the host reads it only
at a sync (``HostRows.on_sync``: finished flags and new tokens in one transfer), then
streams the new tokens and text, and searches the text for stop strings, telling the
device which rows those stopped.
"""
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from gptfast.generation.decode_state import FINISH_LENGTH, FINISH_RUNNING, FINISH_STOP_STRING, FINISH_STOP_TOKEN


class InvalidLogitsError(RuntimeError):
    """The model produced NaN logits, or every token of a row was masked to -inf."""


@dataclass
class GenerationResult:
    """One row's output.

    ``token_ids`` are the generated tokens: a stop token that ended the row is included;
    tokens after a stop string are dropped. ``text`` (with a tokenizer) is their decoding
    without the stop token and cut before the stop string. ``finish_reason`` is "stop"
    (stop token or string; ``stop_reason`` says which) or "length". With a draft model,
    ``draft_tokens`` and ``accepted_draft_tokens`` count its proposals and the accepted ones.
    """

    prompt_token_ids: List[int]
    token_ids: List[int]
    finish_reason: str
    stop_reason: Union[int, str, None]
    seed: int
    text: Optional[str] = None
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[tuple]]] = None
    draft_tokens: Optional[int] = None  # speculative decoding: draft tokens proposed for this row
    accepted_draft_tokens: Optional[int] = None  # ... and accepted by the target


class HostRows:
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
        self.synced = [0] * B  # output columns already read, per row

    def on_sync(self, generated: int) -> bool:
        """Read each row's new tokens (no row has more than ``generated``: rows may differ,
        as in speculative decoding); return True when all rows are done."""
        s, B = self.state, len(self.tokens)
        start = min(self.synced)
        flags = torch.stack([s.finish_reason, s.bad_step, s.generated], dim=1)
        packed = torch.cat([flags, s.out_tokens[:, start:generated]], dim=1).cpu()  # the one sync
        if (packed[:, 1] >= 0).any():
            row = int((packed[:, 1] >= 0).nonzero()[0])
            raise InvalidLogitsError(
                f"row {row}: logits are NaN or all -inf at generated token {int(packed[row, 1])} (after penalties, "
                "logit bias and min_new_tokens masking); check the model's weights and dtype (fp16 overflow?) and "
                "that logit_bias does not ban every token"
            )
        stop_string_rows = []
        for row in range(B):
            if self.done[row]:
                continue
            self.checked[row] = len(self.tokens[row])
            end = int(packed[row, 2])
            self.tokens[row].extend(packed[row, 3 + self.synced[row] - start:3 + end - start].tolist())
            self.synced[row] = end
            device_reason = int(packed[row, 0])
            if device_reason == FINISH_STOP_TOKEN:
                self._finish(row, "stop", self.tokens[row][-1])
            elif device_reason == FINISH_LENGTH:
                self._finish(row, "length", None)
            if self.tokenizer is not None and self._update_text(row) and device_reason == FINISH_RUNNING:
                stop_string_rows.append(row)
            self._emit(row)
        if stop_string_rows:  # tell the device: these rows stop generating
            index = torch.tensor(stop_string_rows, device=s.finished.device)
            s.finished[index] = True
            s.finish_reason[index] = FINISH_STOP_STRING
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
