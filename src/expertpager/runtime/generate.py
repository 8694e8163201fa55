"""A plain token loop (gpt-fast style) with a KV cache: greedy or sampled (temperature, top-k, top-p), streaming,
stoppable by its caller, timed per phase."""

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from ..model.plan import PREFILL_CHUNK
from .decode_attention import kv_cache


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which the prefill produced) per second of decoding."""
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds else 0.0


def sample(logits: torch.Tensor, temperature: float, rng: torch.Generator, top_k: int = 0, top_p: float = 1.0) -> int:
    """One token from last-position `logits`: the argmax when temperature is 0, else drawn from the softmax at
    `temperature`, restricted to the `top_k` likeliest tokens (0: all) and to the smallest set whose probability
    reaches `top_p` (1: all)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        before = torch.cumsum(torch.softmax(ordered, -1), -1) - torch.softmax(ordered, -1)  # mass of likelier tokens
        logits = logits.scatter(0, order, ordered.masked_fill(before >= top_p, float("-inf")))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=rng))


@torch.inference_mode()
def generate(model: PreTrainedModel, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, eos_token_id: int | list[int] | None = None,
             on_token: Callable[[int], bool | None] | None = None, top_k: int = 0, top_p: float = 1.0) -> Generation:
    """Generate up to `max_new_tokens` after `prompt` (token ids); greedy when temperature is 0 (see `sample`).
    `on_token(token)` sees each token as it is made; returning True stops the loop there."""
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    rng = torch.Generator().manual_seed(seed)
    result = Generation(prompt_tokens=len(prompt))
    cache = kv_cache(model)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    start = time.perf_counter()
    for i in range(0, len(prompt) - PREFILL_CHUNK, PREFILL_CHUNK):  # a long prompt in chunks: bounded activations
        model(input_ids=torch.tensor([prompt[i:i + PREFILL_CHUNK]]), use_cache=True, logits_to_keep=1, **{cache_arg: cache})
    ids = torch.tensor([prompt[(len(prompt) - 1) // PREFILL_CHUNK * PREFILL_CHUNK:]])
    for step in range(max_new_tokens):
        # only the last position's logits: a long prompt's full [T, vocab] logits would take more memory than the cache
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits[0, -1].float()
        token = sample(logits, temperature, rng, top_k, top_p)
        now = time.perf_counter()
        if step == 0:
            result.prefill_seconds = now - start
        else:
            result.decode_seconds += now - start
        start = now
        result.tokens.append(token)
        if on_token is not None and on_token(token):
            break
        if token in stops:
            break
        ids = torch.tensor([[token]])
    return result
