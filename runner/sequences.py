"""One sequence of the batch: how it samples (every rank), and what rank 0
makes of its tokens (text, stop strings, logprobs, chunks)."""

import time

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from exod.proto import exod_pb2 as pb

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive seeds over the key space


class SeededSampler:
    """mlx-lm's sampler for one sequence, with a random key that depends only
    on the request's seed and the token's index: the tokens are the same
    whether the sequence runs alone or beside others in a batch, and on every
    rank. mlx-lm's samplers draw from the global key (their compiled
    functions read and write mx.random.state), so the key is set just
    before each call; the serving loop is the only user of that key."""

    def __init__(self, seed: int, temperature: float, top_p: float, min_p: float, top_k: int):
        self.seed = seed
        self.index = 0
        self.sample = make_sampler(temp=temperature, top_p=top_p, min_p=min_p, top_k=top_k)

    def __call__(self, logprobs: mx.array) -> mx.array:
        mx.random.seed((self.seed * _GOLDEN + self.index) & _MASK64)
        self.index += 1
        return self.sample(logprobs)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: each byte is one printable
    character, the printable Latin-1 bytes as themselves and every other
    byte as chr(256 + n), n counting those bytes in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    decoder = {chr(b): b for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in printable):
        decoder[chr(256 + n)] = b
    return decoder


BYTE_LEVEL = _byte_level_decoder()
SPM_SPACE = "\u2581".encode()


def token_bytes(tokenizer, detokenizer, token: int) -> bytes:
    """A token's own bytes, which its text alone may not hold (a token can
    be part of a character). mlx-lm's detokenizers keep the vocabulary's
    pieces: bytes for SentencePiece (byte tokens decoded, U+2581 for a
    space), byte-level characters for BPE. Other tokenizers: the decoded
    text."""
    pieces = getattr(detokenizer, "tokenmap", None)
    piece = pieces[token] if pieces is not None and 0 <= token < len(pieces) else None
    if isinstance(piece, bytes):
        return piece.replace(SPM_SPACE, b" ")
    if isinstance(piece, str) and all(c in BYTE_LEVEL for c in piece):
        return bytes(BYTE_LEVEL[c] for c in piece)
    return tokenizer.decode([token]).encode() if tokenizer is not None else b""


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


class LogitsCapture:
    """A logits processor that keeps the logits of the prompt's last
    position (its first call) and changes nothing."""

    def __init__(self):
        self.logits = None

    def __call__(self, tokens, logits):
        if self.logits is None:
            self.logits = logits
        return logits


class Sequence:
    """Rank 0's view of one request in the batch: detokenizing, stop strings,
    logprobs, limits, and its chunks."""

    def __init__(self, server, admitted, capture: LogitsCapture | None, cached_tokens: int):
        self.server = server
        self.request = admitted.request
        self.request_id = admitted.request.request_id
        self.prompt_tokens = len(admitted.tokens)
        self.max_tokens = admitted.max_tokens
        self.cached_tokens = cached_tokens
        self.capture = capture
        self.generated = 0
        self.text = ""
        self.emitted = 0
        self.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        self.error = ""
        self.stopped_by_string = False
        self.stop_sequence = ""
        self.finished = False
        self.joined_at = time.perf_counter()
        self.first_token_at = None
        tokenizer = server.tokenizer
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        self.eos = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
        self.stops = [s for s in self.request.sampling.stop if s]

    def accept(self, token: int, logprobs, engine_finished: bool) -> bool:
        """Handle one sampled token; True once the sequence is finished here.
        `engine_finished`: the batch itself ended it (max_tokens or a stop
        token), on every rank."""
        if self.finished:
            return True
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._judge(token, logprobs)
        if not self.finish_reason and engine_finished:
            self.finish_reason = pb.FINISH_LENGTH if self.generated >= self.max_tokens else pb.FINISH_STOP
        if self.finish_reason:
            self.finish()
            return True
        return False

    def _judge(self, token: int, logprobs) -> None:
        if self.server.inbox.is_cancelled(self.request_id):
            self.finish_reason = pb.FINISH_CANCELLED
            return
        if token in self.eos and not self.request.sampling.ignore_eos:
            self.finish_reason = pb.FINISH_STOP
            return
        self.generated += 1
        out = pb.GeneratedToken(token=token)
        sampling = self.request.sampling
        if sampling.logprobs:
            out.logprob = float(logprobs[token].item())
            out.raw = self._bytes_of(token)
        if sampling.top_logprobs:
            k = min(sampling.top_logprobs, 20)
            top = mx.argpartition(-logprobs, k - 1)[:k]
            ids, values = top.tolist(), logprobs[top].tolist()
            for tid, value in sorted(zip(ids, values), key=lambda p: -p[1]):
                out.top_logprobs.append(pb.TokenLogprob(token=tid, text=self._text_of(tid), logprob=value,
                                                        raw=self._bytes_of(tid)))
        self.text += self._piece(token)
        cut = self._stop_at()
        if cut is not None:
            out.text = self.text[self.emitted:cut]
            self.emitted = cut
            self.finish_reason = pb.FINISH_STOP
            self.stopped_by_string = True
        else:
            safe = len(self.text) - self._held_back()
            out.text = self.text[self.emitted:safe]
            self.emitted = safe
            if self.generated >= self.max_tokens:
                self.finish_reason = pb.FINISH_LENGTH
        chunk = pb.GenerationChunk(request_id=self.request_id, tokens=[out])
        if self.generated == 1:
            # The prompt's split into computed and cached tokens is known from
            # here on (Anthropic's message_start reports it before any text).
            chunk.prompt_tokens, chunk.cached_tokens = self.prompt_tokens, self.cached_tokens
        self.server.emit(chunk)

    def _piece(self, token: int) -> str:
        if self.detokenizer is None:
            return ""
        self.detokenizer.add_token(token)
        return self.detokenizer.last_segment

    def _bytes_of(self, token: int) -> bytes:
        return token_bytes(self.server.tokenizer, self.detokenizer, token)

    def _text_of(self, token: int) -> str:
        return self.server.tokenizer.decode([token]) if self.server.tokenizer is not None else ""

    def _stop_at(self):
        found = [(self.text.find(s, max(0, self.emitted - len(s))), s) for s in self.stops]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return None
        at, self.stop_sequence = min(found)
        return at

    def _held_back(self) -> int:
        """Characters at the end that may be the start of a stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def fail(self, reason: int, error: str = "") -> None:
        """End it from outside: cancelled, shutting down, failed."""
        if not self.finished:
            self.finish_reason = reason
            self.error = error
            self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.detokenizer is not None and not self.stopped_by_string:
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
        now = time.perf_counter()
        prompt_s = (self.first_token_at or now) - self.joined_at
        decode_s = now - (self.first_token_at or now)
        computed = self.prompt_tokens - self.cached_tokens
        chunk = pb.GenerationChunk(
            request_id=self.request_id,
            finish_reason=self.finish_reason or pb.FINISH_STOP,
            error=self.error,
            error_kind=pb.ERROR_INTERNAL if self.finish_reason == pb.FINISH_ERROR else pb.ERROR_KIND_UNSPECIFIED,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generated,
            cached_tokens=self.cached_tokens,
            stop_sequence=self.stop_sequence if self.stopped_by_string else "",
            prompt_tokens_per_s=computed / prompt_s if self.first_token_at and prompt_s > 0 else 0.0,
            generation_tokens_per_s=(self.generated - 1) / decode_s if self.generated > 1 and decode_s > 0 else 0.0,
        )
        tail = "" if self.stopped_by_string else self.text[self.emitted:]
        if tail:
            chunk.tokens.append(pb.GeneratedToken(text=tail))
        if self.capture is not None and self.capture.logits is not None:
            chunk.prompt_logits.extend(self.capture.logits[0].astype(mx.float32).tolist())
        self.server.inbox.done(self.request_id)
        self.server.emit(chunk)
