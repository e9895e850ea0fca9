"""The testing room: tiny models and the checks that prove fxpp against transformers.

``zoo``: hand-written tiny presets (tests, the docs); the text ones come from ``fxpp.presets``.
``tiny``: tiny configs of any transformers family (the sweeps' shrinking rules).
``check``: inputs, the unpatched reference, the comparison of logits and every gradient.
``report``: tables, summaries and docs/supported_models.md.
``sweep_causal`` / ``sweep_vlm``: the auto-mapping sweeps; ``sweep``: their command.
``memory``: the CPU allocator's reports at their own times (what the memory model is checked against).
``saves``: saves written as ``fxpp run`` writes them, and the whole-model export (export's reference).

Nothing outside this room imports it; the text presets it shares with ``fxpp run`` live in ``fxpp.presets``.
"""
