"""No input the caller gives may vanish from the graph.

A traced forward can drop an input without any error: the input reaches a parameter
the forward never reads (an old argument name whose renaming decorator was lost), a
branch the trace did not take, or ``**kwargs`` that nothing consumes. The stages would
then compute the model *without* that input, and the only symptom is wrong numbers.
So after tracing, every input the caller gave (not ``None``) must be *consumed*: its
placeholder must have a path to the graph output.

Inputs that do nothing for one particular call still count as consumed as long as they
flow into the computation: an all-ones ``attention_mask`` is read by the mask builder
node, which feeds every decoder layer, whatever it returns at run time. An input read
only for its shape (a mask builder's ``inputs_embeds``) is consumed too: a guard or a
size computed from it reaches the output. Inputs whose only use is a ``check_guard``
node that nothing reads are not: the guard asserts the shape the graph was built
for, it does not feed the computation.

Both functions are pure: they read the graph and raise, nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx

from .errors import StageInputError


def consumed_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Every node some path from which reaches the output node (the output included)."""
    outputs = [n for n in graph.nodes if n.op == "output"]
    seen: set[torch.fx.Node] = set(outputs)
    stack = list(outputs)
    while stack:
        node = stack.pop()
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def unconsumed_inputs(gm: torch.fx.GraphModule, given: Iterable[str]) -> list[str]:
    """The names in ``given`` whose placeholder does not reach ``gm``'s output, sorted.

    A name in ``given`` without a placeholder counts as unconsumed too: the trace did
    not even make it a graph input. ``given`` is the set of inputs the caller passed
    as tensors or values (``None`` already left out).
    """
    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    reached = consumed_nodes(graph)
    return sorted(name for name in set(given) if placeholders.get(name) not in reached)


def reject_unconsumed_inputs(model_class_name: str, gm: torch.fx.GraphModule, given: Iterable[str]) -> None:
    """Raise :class:`~fxpp.errors.StageInputError` if an input in ``given`` vanished from ``gm``.

    Call it right after tracing with the names of the inputs the caller gave.
    """
    missing = unconsumed_inputs(gm, given)
    if not missing:
        return
    names = ", ".join(repr(n) for n in missing)
    plural = len(missing) > 1
    raise StageInputError(
        f"{model_class_name}: input{'s' if plural else ''} {names} {'are' if plural else 'is'} given but the "
        f"model's traced forward does not use {'them' if plural else 'it'}: no result depends on "
        f"{'them' if plural else 'it'}, so fxpp would silently ignore {'them' if plural else 'it'}. "
        f"Check the name{'s' if plural else ''} against {model_class_name}.forward (an argument the forward "
        "accepts but never reads, or one that only reaches **kwargs) and leave out inputs this model does not "
        "take; if the model itself does use it, this is a tracing bug in fxpp, please report it"
    )
