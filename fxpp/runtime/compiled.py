"""Compiled stages: every decoder layer of a stage compiled in place (Note [compiled stages]).

Terms
-----
regional compilation
    ``torch.compile`` applied to the block a model repeats (here each decoder layer),
    not to the whole model: the layers share one compiled program per distinct layer
    signature, so a stage of 30 layers costs the compile time of one.
compile backend
    What ``torch.compile`` lowers the captured graph with: ``"inductor"`` (the default,
    generated C++ on CPU, Triton on CUDA), or ``"aot_eager"`` / ``"eager"`` (capture only;
    for debugging and fast tests).
compile event
    One compilation torch runs for a frame (dynamo's capture, AOTAutograd and the
    backend's code generation), or for a backward graph the first time it runs (compiled
    lazily); counted by :func:`compile_stats` from torch's own compilation callbacks.

Note [compiled stages]
    ``build_stage(i, device, compile=True)`` calls ``layer.compile(backend="inductor")``
    on each decoder layer that the stage's graph calls. ``nn.Module.compile`` sets the
    instance's ``_compiled_call_impl`` to ``torch.compile(layer._call_impl)``; the
    module, its class, its parameters and their names stay as they are. So the stage
    handed to ``PipelineStage`` is the same plain ``GraphModule`` and no module in it is
    an ``OptimizedModule``: torch 2.13's zero-bubble schedules (InterleavedZeroBubble,
    ZBVZeroBubble, DualPipeV), which refuse a stage holding one
    (``schedules._check_torch_compile_compatibility``), take it like the other four.

    What is compiled: the decoder layers, where nearly all the work is. What is not: the
    stage graph itself (it checks and routes the values that cross the cuts, builds masks
    and reads the fxpp header, host-side work a compiled graph would break on), the
    embeddings (a lookup), the final norm and the head (one matmul each, which inductor
    would not fuse further).

    The user's model is untouched. A stage with other wrapping (data parallelism, mixed
    precision, activation checkpointing, tensor parallelism) already holds its own copy of
    every module. A stage with ``compile`` alone shares the user's modules that are on
    ``device`` already, as an uncompiled stage does; each such decoder layer is replaced
    in the stage by a *shell* (:func:`own_layer_shells`): a new instance of the layer's
    class whose parameter, buffer, child-module and hook dicts are copies of the layer's,
    holding the same parameters and children. The parameters stay shared (gradients land
    where an uncompiled stage puts them), and ``_compiled_call_impl`` is set on the shell
    alone.

    Order, as torchtitan's ``parallelize`` (tensor parallel, then activation
    checkpointing, then per-block compile, then ``fully_shard``): the tp plan splits the
    layer's parameters first; activation checkpointing replaces the layer's ``forward``
    (Note [activation checkpointing] in ``fxpp.runtime.parallel``) with an eager
    ``torch.utils.checkpoint`` around the layer's compiled forward (:func:`compiled_forward`:
    compiling the checkpoint itself made dynamo drop the whole layer to eager on a graph
    break, see there); ``fully_shard`` comes last, and its hooks (which torch marks
    ``_dynamo_disable``) run outside the compiled graph.

    Split backward: zero-bubble schedules compute a stage's input gradients and its weight
    gradients in two ``torch.autograd.grad`` calls (``pipelining/_backward.py``). A compiled
    layer is one autograd node (AOTAutograd's ``CompiledFunction``) whose backward yields
    its input's and its parameters' gradients together; the first call runs it with
    ``retain_graph=True`` and keeps the gradients flowing into it, the second runs it again
    from them for the weights. AOTAutograd's donated buffers (the backward writing over
    its saved activations) refuse ``retain_graph=True``, so fxpp turns them off
    (``torch._functorch.config.donated_buffer = False``, for the whole process: a
    little more peak memory in the backward). Both halves are right
    (``tests/test_compile.py``); the cost is a layer's whole backward twice per
    microbatch under those schedules, where an eager layer splits its matmuls' backward
    between the two calls.

    Recompilation is bounded: torch compiles once per distinct layer signature (code,
    argument shapes and dtypes, training flag, grad mode), not once per layer: layers of
    one class share the compiled program (their parameters are graph inputs; transformers
    keeps ``layer_idx`` out of the forward's control flow). Shapes are static
    (``dynamic=False``): each new microbatch shape (sequence length, batch) costs one more
    compile, a shape seen before none. Not torch's automatic dynamic shapes: its symbolic
    recompile (at the second shape) gives wrong weight gradients under ZBVZeroBubble with
    CPU inductor in torch 2.13 (measured: layer weight gradients off by their own size,
    loss and input gradients right; static graphs of the same shapes are right, and so is
    the symbolic graph under 1F1B), so fxpp does not use it. ``fxpp run`` has one shape
    per run (``--seq-len``, packed data), so one compile in all; validation (``no_grad``,
    ``eval()``) is one more signature. The per-code recompile limit is raised to
    :data:`RECOMPILES_PER_LAYER` per layer of the rank, so a model of many layer kinds or a
    loop over lengths does not fall back to eager early.
"""

from __future__ import annotations

import copy
import threading
import time

import torch
import torch._dynamo
import torch._dynamo.utils
import torch._functorch.config

from ..errors import CompileError

DEFAULT_BACKEND = "inductor"
# Signatures one layer may need before torch stops compiling it (and runs it eagerly):
# training and evaluation (grad mode, training flag), each at up to 8 microbatch shapes.
RECOMPILES_PER_LAYER = 16


def compile_backend(compile) -> str | None:
    """The backend ``compile=`` names: ``True`` is inductor, a string a backend name, ``False``/``None`` none.

    Raises:
        CompileError: neither a bool nor a string, or a name torch does not know as a backend.
    """
    if compile is None or compile is False:
        return None
    if compile is True:
        return DEFAULT_BACKEND
    if not isinstance(compile, str):
        raise CompileError(f"compile={compile!r} must be True, False or a torch.compile backend name "
                           f"(e.g. 'inductor', 'aot_eager')")
    known = torch._dynamo.list_backends(exclude_tags=())
    if compile not in known:
        raise CompileError(f"compile={compile!r} is not a torch.compile backend; torch {torch.__version__} knows "
                           f"{sorted(known)}")
    return compile


def check_compile(backend: str, device: torch.device) -> None:
    """Refuse, at build time, a compiled stage that could only fail later, deep in its first step.

    Raises:
        CompileError: dynamo unsupported on this Python; inductor on CPU without a C++
            compiler, or on CUDA without Triton.
    """
    if not torch._dynamo.is_dynamo_supported():
        raise CompileError(f"compile={backend!r}: torch.compile does not support this Python or platform; "
                           "build the stage without compile")
    if backend != "inductor":
        return
    if device.type == "cpu":
        # start-up time: torch._inductor is imported only when a stage is compiled
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor's own "no compiler" error, whatever its class
            raise CompileError(f"compile='inductor' on {device}: inductor generates C++ for CPU stages and finds no "
                               f"C++ compiler ({type(e).__name__}: {e}). Install g++ (or set CXX), or build the "
                               "stage with compile='aot_eager' or without compile") from e
    elif device.type == "cuda":
        # start-up time: as above
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileError(f"compile='inductor' on {device}: inductor generates Triton kernels for CUDA stages "
                               "and Triton is not installed (pip install triton), or build the stage without compile")


def own_layer_shells(submodule: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]],
                     users: set[int]) -> list[tuple[str, torch.nn.Module]]:
    """Replace each layer that is the user's (``id`` in ``users``) by a shell of it (Note [compiled stages]).

    Returns:
        the stage's layers after the swap, as ``(qualified name, module)``.
    """
    out = []
    for name, layer in layers:
        if id(layer) in users:
            layer = _shell(layer)
            submodule.set_submodule(name, layer)
        out.append((name, layer))
    return out


def _shell(layer: torch.nn.Module) -> torch.nn.Module:
    """A new instance of ``layer``'s class over the same parameters, buffers and children."""
    shell = copy.copy(layer)  # nn.Module's __getstate__: a fresh __dict__ with the same values
    for key, value in list(shell.__dict__.items()):
        if isinstance(value, (dict, set)):  # _parameters, _buffers, _modules, hooks: the shell's own containers
            shell.__dict__[key] = copy.copy(value)
    shell.__dict__.pop("_compiled_call_impl", None)
    return shell


def compile_layers(layers: list[tuple[str, torch.nn.Module]], backend: str) -> None:
    """``layer.compile(backend=backend)`` on each layer, in place; the recompile limit covers them all.

    ``dynamic=False``: one compile per signature and microbatch shape (Note [compiled stages]).
    """
    prepare_compile(len(layers))
    for _, layer in layers:
        layer.compile(backend=backend, dynamic=False)
        layer._fxpp_compiled = backend


def compiled_forward(layer: torch.nn.Module, backend: str):
    """``layer``'s bound ``forward``, compiled (activation checkpointing calls it inside the checkpoint).

    Note [compiled stages], order: torch.compile of a layer whose ``forward`` is
    checkpointed traces the checkpoint as a higher-order op, and a side effect inside the
    layer (transformers' hub-kernel attention, with the ``kernels`` package installed, sets
    a global) makes dynamo give up on the whole layer with a graph break: it would run
    eagerly under a "compiled" label. So a checkpointed layer has its forward compiled and
    the checkpoint around it runs eagerly: the recomputation calls the same compiled code.
    """
    compiled = torch.compile(layer.forward, backend=backend, dynamic=False)
    layer._fxpp_compiled = backend
    return compiled


def prepare_compile(num_layers: int) -> None:
    """Process-wide settings compiled layers need (Note [compiled stages]), and the compile log."""
    needed = RECOMPILES_PER_LAYER * num_layers
    if torch._dynamo.config.recompile_limit < needed:
        torch._dynamo.config.recompile_limit = needed
    # Note [compiled stages], split backward: the first half runs with retain_graph=True,
    # which AOTAutograd's donated buffers (a backward reusing its saved activations'
    # memory) refuse; a process-wide setting, read when a graph is compiled.
    torch._functorch.config.donated_buffer = False
    _LOG.install()


class _CompileLog:
    """Counts torch's compile events in this process and their wall time, from its compilation callbacks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._installed = False
        self._started: float | None = None
        self.forward = 0  # dynamo frame compilations (a forward graph each, with its backward planned)
        self.backward = 0  # backward graphs compiled the first time they ran
        self.seconds = 0.0
        self._base = (0, 0)  # dynamo's graph and graph-break counters when the log was installed

    @property
    def base(self) -> tuple[int, int]:
        return self._base

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            self._installed = True
            stats = torch._dynamo.utils.counters
            self._base = (stats["stats"]["unique_graphs"], sum(stats["graph_break"].values()))
        torch._dynamo.callback_handler.register_start_callback(self._start)
        torch._dynamo.callback_handler.register_end_callback(self._end)

    def _start(self, args) -> None:
        self._started = time.perf_counter()

    def _end(self, args) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None
        if getattr(args.callback_trigger, "name", "") == "LAZY_BACKWARD":
            self.backward += 1
        else:
            self.forward += 1


_LOG = _CompileLog()


def compile_stats() -> dict:
    """This process's compile events since fxpp first compiled a stage in it.

    Returns:
        ``{"compiles": frame compilations (each yields a graph unless a graph break left
        nothing to compile), "graphs": graphs captured, "graph_breaks": places dynamo could
        not trace (a layer that breaks runs partly eagerly; ``fxpp run --compile`` prints
        the count), "backward_compiles": backward graphs torch compiled apart, at their first run
        (0 where it compiles them with the forward, as CPU inductor in torch 2.13 did for
        fxpp's layers), "compile_s": wall seconds spent in both}``; zeros before any stage
        was compiled.
    """
    stats = torch._dynamo.utils.counters
    graphs, breaks = _LOG.base
    return {"compiles": _LOG.forward, "graphs": stats["stats"]["unique_graphs"] - graphs,
            "graph_breaks": sum(stats["graph_break"].values()) - breaks, "backward_compiles": _LOG.backward,
            "compile_s": _LOG.seconds}
