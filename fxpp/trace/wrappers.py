"""The keywords a traced forward nested in another receives, once its plumbing decorators
are peeled (``fxpp.model_facts.unwrap_forward`` decides which decorators are peeled).
"""

from __future__ import annotations

import inspect
from typing import Callable


def nested_forward_kwargs(inner: Callable, args: tuple, kwargs: dict) -> dict:
    """The keyword arguments for a traced forward nested in another (``model.language_model``).

    * ``return_dict`` is dropped where the peeled ``can_return_tuple`` would have
      consumed it. A VLM's outer forward calls ``self.model(..., return_dict=True,
      **kwargs)``; the inner forward has no such parameter, so without its wrapper the
      keyword would travel on in ``**kwargs`` and collide with the next explicit
      ``return_dict=True``.
    * ``use_cache`` is False where the forward takes it and its caller left it out or
      None (LLaVA calls its language model without it). The trace is of a forward
      without a KV cache: ``merge_with_config_defaults`` would otherwise fill in the
      config's ``use_cache=True`` and the forward would build a cache object.
    """
    params = inspect.signature(inner).parameters
    if "return_dict" in kwargs and "return_dict" not in params:
        kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
    if "use_cache" in params and kwargs.get("use_cache") is None:
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "use_cache" not in positional[1:len(args) + 1]:  # not passed positionally (after self)
            kwargs = {**kwargs, "use_cache": False}
    return kwargs
