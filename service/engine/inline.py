"""Inline expressions: ``POST /v1/activations/expr`` (v2 model ``expr``) computes the
request's own ``expr`` (no declared params). Each distinct expression, keyed by its
normalized form, becomes a custom activation named ``expr:<normalized>`` (so requests of
the same expression batch together), probed and self-tested in the compute threads before
its first request is queued. A bounded LRU keeps the most recent ``MAX_ENTRIES``.

Loop side only: ``resolve`` parses (cheap, bounded text) and ``prepare`` awaits the checks,
which run in the compute threads like every start-up check.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from service.engine import custom, expressions
from service.engine.activations import Activation
from service.engine.capabilities import INLINE_PREFIX
from service.errors import InvalidRequest

MAX_ENTRIES = 256
PREFIX = INLINE_PREFIX


class ExpressionCache:
    def __init__(self, test: Callable[[Activation], Awaitable[str | None]],
                 max_entries: int = MAX_ENTRIES,
                 on_evict: Callable[[str], None] | None = None) -> None:
        self._test = test  # runs probe + self-test; a problem, or None
        # called with an evicted expression's activation name: what the checks recorded
        # of it (capability rows) goes with it, so nothing grows with the expressions seen
        self._on_evict = on_evict
        self.max_entries = max_entries
        self._by_text: OrderedDict[str, Activation] = OrderedDict()
        self._by_form: OrderedDict[str, Activation] = OrderedDict()
        self._checks: dict[str, asyncio.Future] = {}  # normalized form -> problem or None
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._by_form)

    def resolve(self, text: object) -> Activation:
        """The activation for ``text`` (InvalidRequest when it is not a valid expression)."""
        if isinstance(text, str):
            act = self._by_text.get(text)
            if act is not None:
                self._by_text.move_to_end(text)
                self._by_form.move_to_end(act.formula)
                self.hits += 1
                return act
        expr = expressions.parse(text, (), "expr")
        act = self._by_form.get(expr.normalized)
        if act is None:
            self.misses += 1
            act = custom.from_expression(PREFIX + expr.normalized, expr)
            self._by_form[expr.normalized] = act
            self._trim()
        else:
            self.hits += 1
            self._by_form.move_to_end(expr.normalized)
        self._by_text[text] = act
        while len(self._by_text) > 2 * self.max_entries:
            self._by_text.popitem(last=False)
        return act

    def _trim(self) -> None:
        while len(self._by_form) > self.max_entries:
            form, act = self._by_form.popitem(last=False)
            self._checks.pop(form, None)
            if self._on_evict is not None:
                self._on_evict(act.name)
            for text in [t for t, a in self._by_text.items() if a.formula == form]:
                del self._by_text[text]

    def settle(self, act: Activation) -> None:
        """After a request of ``act`` was checked: if the expression left the cache while it
        was (a flood of others), what its checks recorded goes now."""
        if act.formula not in self._by_form and self._on_evict is not None:
            self._on_evict(act.name)

    def is_inline(self, act: Activation) -> bool:
        return act.name.startswith(PREFIX)

    async def prepare(self, act: Activation) -> None:
        """Probe and self-test ``act`` once (concurrent first requests share the check);
        InvalidRequest naming the problem if it failed."""
        check = self._checks.get(act.formula)
        if check is None:
            check = self._checks[act.formula] = asyncio.ensure_future(self._test(act))
        try:
            problem = await asyncio.shield(check)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._checks.get(act.formula) is check:
                del self._checks[act.formula]  # not a verdict (an executor died): try again
            raise
        if problem:
            raise InvalidRequest(f"expr {act.formula} failed its self-test: {problem}")
