"""HF-aware torch.fx tracer at module granularity.

Files
-----
``targets``: what the tracer recognises by identity (mask builders, shape checks).
``wrappers``: the keywords a nested traced forward receives once its decorators are
peeled (which are peeled, which kept: ``fxpp.model_facts``, below this room).
``layers``: finding the decoder layers and the trace path.
``tracer``: ``HFTracer``, which builds the graph and hands each concern to a collaborator
that receives it:

    ``proxies``: the proxies, each carrying its node's meta value;
    ``meta_eval``: meta (fake) evaluation of each new node, the leaf cache;
    ``real_values``: the second interpreter, the graph so far on the real example inputs;
    ``recording``: outputs that capturing forwards collect (router logits);
    ``standins``: shape-keeping stand-ins for MoE expert blocks and data-dependent layers on meta;
    ``state``: state containers and own caches given to leaf calls, as graph nodes;
    ``helpers``: modeling-file helpers, traced or called as one opaque node;
    ``guards``: concrete answers to Python control flow, recorded as guards;
    ``constants``: objects the graph holds by reference.

``caches``: key/value caches a forward creates itself, one empty copy per layer call.
``values``, ``source_lines``: small functions on traced values and source lines.
``patching``: helpers, constructors and opaque functions patched while tracing.
``driver``: ``trace_model``, the entry point.

transformers 5 dropped ``transformers.utils.fx``; this is fxpp's replacement. It
traces a model's forward (and the forward of every module on the path from the root
to the decoder-layer list) into one ``torch.fx.Graph`` in which decoder layers,
embeddings, rotary embeddings, norms, heads and vision towers stay single
``call_module`` nodes with their original qualified names.

Terms
-----
trace path
    The root module and every ancestor of the text decoder-layer ``ModuleList``
    (``""``, ``"model"``, ``"model.language_model"``). Their forwards are traced
    through; every other module is a leaf.
meta value
    ``node.meta["val"]``: a FakeTensor (or a Python structure of them, or a plain
    Python value) that the node produces for the example inputs. The tracer computes
    it for every node as it is created, so Python control flow on shapes
    (``x.shape[1] == 1``, ``*x.shape``, ``len(x)``) can be answered.
guard
    Such an answer, recorded in the graph as a ``check_guard`` node (see ``fxpp.ops``).
    The graph stays shape-generic everywhere else.
opaque function
    A function called as one ``call_function`` node without tracing into it: the mask
    builders of ``transformers.masking_utils`` (they branch on data and on the
    attention implementation, and only use ``inputs_embeds`` for its shape).

How transformers 5 forwards are handled
    * decorators: output-plumbing wrappers (``can_return_tuple``, ``capture_outputs``,
      ``auto_docstring``) are unwrapped; every other wrapper is kept, rebuilt around the
      unwrapped function: ``merge_with_config_defaults`` (it fills config defaults and
      sees ``use_cache=False`` and ``return_dict=True``) and ``deprecate_kwarg`` (it
      renames an old argument such as ``image_patches`` to ``pixel_values``; without it
      the old name would reach an unused parameter and the input would be ignored);
    * ``**kwargs`` and ``ModelOutput`` construction are plain Python over proxies;
    * config objects become graph constants (``get_attr`` of ``_fxpp_const_N``),
      never rebuilt from nodes;
    * in-place writes ``h[mask] = v`` become ``fxpp.ops.setitem`` nodes, and in-place
      methods (``mask.masked_fill_(c, 0)``) stay ``call_method`` nodes; the written proxy
      stands for the write afterwards, so every later read depends on it;
    * attributes a forward sets on a module (Qwen-VL's ``self.rope_deltas``) are undone
      after the trace: the graph records no side channel between calls.

Note [data-dependent values]
    Vision-language forwards compute Python values from tensor *data*: split sizes
    (``grid.prod(-1).tolist()``), boolean-mask gathers, vision towers that loop over
    image sizes, and helpers that type-check or loop (``unpad_image``,
    ``get_rope_index``). FakeTensors cannot answer these. fxpp keeps them as graph
    nodes (so every call recomputes them from its own inputs) and takes their meta
    value from running the graph so far on the real example inputs
    (``HFTracer.real_value``). A plain function of a modeling file, or a public helper
    method of a traced module, that fails to trace is removed again and called as one
    opaque node; a helper method must not use parameters (the stage would not own
    them). Python *control flow* on data is still refused. On the meta device there
    are no real values, and these models get a TraceError that says so.

    A leaf whose recorded submodules (routers, see ``fxpp.trace.recording``) need
    tensor data during the meta evaluation (JetMoE's gating) is evaluated on the real
    inputs as a whole, with the recording hooks on, instead of getting the
    shape-keeping stand-in of expert blocks: a stand-in would record nothing. The real
    replay of the graph reads the values those hooks kept for the ``take_recorded``
    nodes (Qwen4-Exp: a later layer's data-dependent indexer replays the earlier
    layers' router logits).

Note [mask closures]
    ``blockwise_overlay(ids)`` returns a closure over ``ids``. Traced through, the
    closure would capture a Proxy and become a graph constant; as a node of its own it
    is rebuilt from the stage's real tensors on every call.
    * mutable containers that layers write into (``KVSharingDict``) become explicit
      ``make_state`` / ``state_entry`` nodes, so cross-layer dataflow is visible.
    * a key/value cache the forward creates itself even without ``use_cache`` (XLM) is
      given to each layer call as an empty copy (``fresh_cache`` nodes), once the trace
      shows no cache slot is used by two calls; else a TraceError naming the nodes
      (Note [own caches] in ``caches``).
"""

from __future__ import annotations

from .driver import module_tree, trace_model
from .layers import find_decoder_layers, trace_path
from .targets import MASK_SHAPE_ONLY_KWARGS, is_check_function, is_inplace_method, is_mask_builder
from .tracer import HFTracer, UntraceableCode

__all__ = [
    "HFTracer",
    "MASK_SHAPE_ONLY_KWARGS",
    "UntraceableCode",
    "find_decoder_layers",
    "is_check_function",
    "is_inplace_method",
    "is_mask_builder",
    "module_tree",
    "trace_model",
    "trace_path",
]
