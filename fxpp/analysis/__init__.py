"""Graph analysis: what each node is and what crosses a cut; nothing here rewrites a graph.

``annotate``: ``node.meta["fxpp"]`` (role, position, layer type, rematerialized).
``cuts``: the values that cross cut ``k`` and their identities.
``costs``: the per-block cost model the splitter balances.
``verify``: composed stages against the model, node by node.
"""
