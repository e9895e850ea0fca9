"""Layers whose tuple output holds ``None`` items (the tracer's ``_constant_items``).

RWKV's blocks return ``(hidden, None, None)`` without a cache and pass the ``None``
state on to the next block; XLNet's layers return ``(output_h, None)`` and the forward
tests ``output_g is not None``. As proxies the ``None`` had to cross a cut (a
``CutError``: a tuple is not a tensor) or the test was always true (``dropout(None)``).
"""

from __future__ import annotations

from fxpp.testing.sweep_causal import format_table, sweep_causal_lm


def test_layers_returning_none_items_rwkv_and_xlnet_pass():
    results = sweep_causal_lm(["rwkv", "xlnet"])
    failed = [r for r in results if r.status != "pass"]
    assert not failed, "\n" + format_table(failed)
