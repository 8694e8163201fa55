"""Tokens to text deltas for streaming: decoded incrementally, cut at the first stop string, and holding back text
that may still become a stop string or is half of a multi-byte character."""

from collections.abc import Sequence


class TextStream:
    """Feed tokens one by one; each `push` returns the text now safe to send. `stopped` turns True when a stop
    string appears (the text sent ends just before it); `finish` returns what was held back."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.tokens: list[int] = []
        self.sent = 0
        self.stopped = False
        self.text = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._send(min(hits))
        safe = self.text[:len(self.text.rstrip("\ufffd"))]
        held = max((n for stop in self.stops for n in range(1, len(stop)) if safe.endswith(stop[:n])), default=0)
        return self._send(len(safe) - held)

    def finish(self) -> str:
        """Everything not yet sent (nothing after a stop string)."""
        return "" if self.stopped else self._send(len(self.text))

    def _send(self, end: int) -> str:
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent:end], end
        if self.stopped:
            self.text = self.text[:end]
        return delta
