"""A plain token loop (gpt-fast style) with a KV cache: greedy or sampled, streaming, timed per phase."""

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel


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


@torch.inference_mode()
def generate(model: PreTrainedModel, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, eos_token_id: int | list[int] | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Generate up to `max_new_tokens` after `prompt` (token ids); greedy when temperature is 0."""
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    rng = torch.Generator().manual_seed(seed)
    result = Generation(prompt_tokens=len(prompt))
    cache = DynamicCache(config=model.config)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    for step in range(max_new_tokens):
        # only the last position's logits: a long prompt's full [T, vocab] logits would take more memory than the cache
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits[0, -1].float()
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=rng))
        else:
            token = int(logits.argmax())
        now = time.perf_counter()
        if step == 0:
            result.prefill_seconds = now - start
        else:
            result.decode_seconds += now - start
        start = now
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in stops:
            break
        ids = torch.tensor([[token]])
    return result
