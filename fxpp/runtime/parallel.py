"""Pipeline x data (x tensor) parallel: fxpp stages on the ``"dp"`` and ``"tp"`` dimensions of a device mesh.

Terms
-----
mesh
    A 2-D ``DeviceMesh`` with dimensions ``("pp", "dp")``, dp innermost (as torchtitan
    lays it out): global rank ``p * dp + d`` holds pipeline rank ``p`` of data-parallel
    replica ``d``. :func:`pp_dp_mesh` builds it; :func:`pp_dp_tp_mesh` the 3-D one of
    Note [3-D mesh].
tp mesh
    ``mesh["tp"]``: the ranks that hold the same stage of the same replica, each a shard
    of it by the model's tensor-parallel plan (``fxpp.runtime.tensor_parallel``).
pipeline group
    ``mesh["pp"].get_group()``: the ``pp`` ranks of one dp index. A schedule, its
    activation and gradient messages, the shape agreement of ``fxpp.schedule`` and the
    tied-weight exchange all run on it.
dp mesh
    ``mesh["dp"]``: the ``dp`` ranks that hold the same stages. Gradients are reduced
    over it (FSDP2's reduce-scatter, or an all-reduce when replicated), nothing else.
data_parallel
    How a stage is replicated over the dp mesh: ``"fsdp"`` (FSDP2's ``fully_shard``
    on every decoder layer and on the stage; parameters, gradients and optimizer state
    are sharded over dp) or ``"replicate"`` (the same structure with
    ``torch.distributed._composable.replicate_with_fsdp.replicate``: full parameters on
    every dp rank, gradients all-reduced, DDP's semantics).

Note [pipeline x data parallel]
    Nothing here is a data-parallel engine: the stage's ``GraphModule`` (the model's
    own modules, own copies on this rank) is wrapped with torch's FSDP2 before the
    ``PipelineStage`` is built, and ``torch.distributed.pipelining`` drives it. For an
    ``FSDPModule`` stage torch (2.13, ``pipelining/stage.py``) turns gradient sync off
    for every backward of a step (``backward_maybe_with_nosync``:
    ``set_requires_gradient_sync(False)``, ``set_reshard_after_backward(False)``) and
    reduces once after the step's last backward (``perform_reduce_grad``: the
    parameter groups' ``post_backward``, then ``scale_grads``). So within one step:

    * forward and backward of every microbatch: no dp communication but FSDP's
      all-gather of the parameters before a stage first computes; they stay unsharded
      for the step (``reshard_after_forward=False``, torchtitan's choice under PP:
      resharding after each forward would all-gather again for every backward);
    * after the stage's last backward: one reduce-scatter (``"fsdp"``) or all-reduce
      (``"replicate"``) per wrapped module over the dp mesh, averaging over dp (FSDP's
      default), then the division by the number of microbatches;
    * after torch's ``step`` returns (``fxpp.schedule``): the tied-weight exchange of
      Note [tied-weight sync] over the pipeline group between the first and the last
      stage of the *same* dp index. Both hold the reduced gradient's shard of the same
      shape over the same dp size, so the local shards line up; the first exchange
      checks that (shapes, dp size) and refuses loudly otherwise.

    The loss of each dp rank must be normalised so that the dp average is the global
    batch's loss: ``fxpp.causal_lm_loss(local_labels, M, dp_mesh=mesh)`` counts the
    target tokens of the whole global batch (one all-reduce over dp) and scales each
    microbatch's loss by ``M * dp``, so gradients equal the unpatched model's on the
    global batch whatever the padding.

Note [3-D mesh]
    ``pp_dp_tp_mesh(pp, dp, tp)`` lays ranks out as ``(pp, dp, tp)``, tp innermost
    (torchtitan's order: tp talks inside every layer, so its ranks are neighbours, on one
    host where there are several): global rank ``(p * dp + d) * tp + t``. For a stage
    built with it (:func:`resolve_meshes`):

    * the pipeline group is ``mesh["pp"]``: the ranks of one (dp, tp) coordinate. Every
      tp coordinate runs its own copy of the schedule, point to point, and the tie
      exchange pairs the first and last stage of the same (dp, tp) coordinate, so shard
      ``t`` of the embedding with shard ``t`` of the head;
    * the tp mesh splits the stage's planned parameters (Note [tensor parallel stages]
      in ``fxpp.runtime.tensor_parallel``); the ranks of one stage's tp mesh run the same
      microbatches in the same order, so the collectives inside the layers match up;
    * the dp mesh, when dp > 1, wraps the tp-sharded stage with FSDP2 (the parameters
      the plan shards become 2-D DTensors over ``("dp", "tp")``); the loss's token count
      is summed over dp only (the tp ranks of a replica hold the same labels).

Note [mixed precision]
    ``mixed_precision="bf16"`` is FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)`` on every wrapped module of the stage (torchtitan's default): the
    parameters and the optimizer state stay fp32 (the sharded masters), FSDP2 casts them
    to bf16 when it all-gathers them for compute, each backward's bf16 gradients are
    upcast and accumulated in fp32 over the step's microbatches
    (``unsharded_accumulated_grad``), and reduced over dp in fp32. Without a dp mesh the
    stage is wrapped over a mesh of its own rank alone (:func:`single_rank_mesh`), as
    torchtitan does, so the same policy applies; nothing is cast by hand. Buffers keep
    their dtype (rotary ``inv_freq`` stays fp32, as in the model). What crosses a cut is
    computed in bf16, so its floating slots are bf16 (``_example_args``): half the
    bytes per message. A value the model computes in another dtype than its parameters'
    would not fit its slot; the sender names it (``check_sent_shapes``), and the
    schedule's first step refuses stages built with different compute dtypes on every
    rank (``fxpp.runtime.schedule``).

Note [activation checkpointing]
    ``activation_checkpointing=True`` makes each decoder layer of the stage recompute
    its activations in the backward: the layer instance's ``forward`` is replaced by
    ``torch.utils.checkpoint.checkpoint(<its forward>, ..., use_reentrant=False)``
    (:func:`checkpoint_layer`). The module tree is untouched, so parameter names, the
    stage graph and every variant traced later stay as they are, and module hooks
    (FSDP2's unshard/reshard) stay outside the checkpointed region, so a recompute
    never runs them again (transformers' own ``GradientCheckpointingLayer`` checkpoints
    ``forward`` for the same reason). Non-reentrant checkpointing with the RNG state
    preserved replays the same float32 program: gradients are bitwise those without
    it. Not ``checkpoint_wrapper`` (it inserts ``_checkpoint_wrapped_module`` into every
    parameter name), and not torch's composable ``torch.distributed._composable.checkpoint``:
    its recompute context (``_no_hook``, a generator context manager) is made once per
    forward and can be entered once, but zero-bubble schedules recompute a layer twice
    (its input gradients and its weight gradients are separate ``autograd.grad``
    calls, so separate graph tasks), and the second fails in
    ``torch/utils/checkpoint.py`` (``recompute_fn``'s ``with (...recompute_context...)``)
    with ``AttributeError: '_GeneratorContextManager' object has no attribute 'args'``
    (torch 2.13). ``torch.utils.checkpoint``'s default contexts are fresh each time.
    The cost under zero-bubble schedules is two recomputations of a layer per
    microbatch (one per ``autograd.grad`` call), against one under 1F1B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ..analysis.annotate import is_decoder_layer
from ..errors import StageSpecError
from .compiled import compile_layers, compiled_forward, prepare_compile
from .placement import default_device

DATA_PARALLEL_MODES = ("fsdp", "replicate")
MESH_DIMS = ("pp", "dp")
MESH_DIMS_3D = ("pp", "dp", "tp")  # every dimension a stage's mesh may have, outermost first


def _checked_world(fn: str, sizes: dict[str, int]) -> None:
    """``fn``'s sizes are positive integers whose product is the world size (local: every rank raises)."""
    if not dist.is_initialized():
        raise StageSpecError(f"{fn} needs torch.distributed to be initialised (dist.init_process_group)")
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StageSpecError(f"{fn}: {name}={value!r} must be a positive integer")
    world, product = dist.get_world_size(), 1
    for value in sizes.values():
        product *= value
    if product != world:
        args = ", ".join(f"{k}={v}" for k, v in sizes.items())
        names = " * ".join(sizes)
        raise StageSpecError(
            f"{fn}({args}): {names} = {product}, but the world has {world} ranks; "
            f"choose {', '.join(list(sizes)[:-1])} and {list(sizes)[-1]} whose product is the world size"
        )


def _mesh(sizes: dict[str, int], device_type: str | None) -> DeviceMesh:
    device = default_device(dist.get_rank())
    device_type = device_type or device.type
    if device_type == "cuda" and device.type == "cuda":
        # FSDP2 places a mesh's parameters on the *current* CUDA device: the rank's own.
        torch.cuda.set_device(device)
    return init_device_mesh(device_type, tuple(sizes.values()), mesh_dim_names=tuple(sizes))


def pp_dp_mesh(pp: int, dp: int, device_type: str | None = None) -> "DeviceMesh":
    """The 2-D ``("pp", "dp")`` device mesh over every rank, dp innermost.

    Args:
        pp: pipeline ranks (each holds one or more stages).
        dp: data-parallel replicas of every stage.
        device_type: ``"cuda"`` or ``"cpu"``; default: the device type of the default
            backend (``fxpp.runtime.placement.default_device``).

    Returns:
        ``DeviceMesh`` with ``mesh["pp"].get_group()`` the pipeline group of this rank
        and ``mesh["dp"]`` its data-parallel mesh.

    Raises:
        StageSpecError: torch.distributed is not initialised, or ``pp * dp`` is not the
            world size. The check is local, so every rank raises it; nothing waits.
    """
    _checked_world("pp_dp_mesh", {"pp": pp, "dp": dp})
    return _mesh({"pp": pp, "dp": dp}, device_type)


def pp_dp_tp_mesh(pp: int, dp: int, tp: int, device_type: str | None = None) -> "DeviceMesh":
    """The 3-D ``("pp", "dp", "tp")`` device mesh over every rank, tp innermost (Note [3-D mesh]).

    Global rank ``(p * dp + d) * tp + t`` holds tensor-parallel shard ``t`` of pipeline
    rank ``p`` of data-parallel replica ``d`` (torchtitan's order: the tp ranks, which talk
    inside every layer, are neighbours, on one host where there are several).

    Args:
        pp: pipeline ranks. dp: data-parallel replicas of every stage. tp: the ranks
            that share each stage's layers by the model's tensor-parallel plan
            (``fxpp.runtime.tensor_parallel``).
        device_type: ``"cuda"`` or ``"cpu"``; default: the device type of the default backend.

    Returns:
        ``DeviceMesh`` with dimensions ``("pp", "dp", "tp")``: ``mesh["pp"].get_group()``
        is the pipeline group of this rank (the ranks of its dp and tp coordinates).

    Raises:
        StageSpecError: torch.distributed is not initialised, a size that is not a
            positive integer, or ``pp * dp * tp`` is not the world size; checked on
            every rank before any communication.
    """
    _checked_world("pp_dp_tp_mesh", {"pp": pp, "dp": dp, "tp": tp})
    return _mesh({"pp": pp, "dp": dp, "tp": tp}, device_type)


@dataclass(frozen=True)
class StageMeshes:
    """What ``build_stage(..., mesh=)`` means for this rank (:func:`resolve_meshes`).

    ``dp``: the 1-D mesh to reduce gradients over with FSDP2 (None: no data
    parallelism); ``tp``: the 1-D mesh the model's tensor-parallel plan shards over
    (None: tp 1); ``group``: the pipeline's process group.
    """

    dp: DeviceMesh | None
    tp: DeviceMesh | None
    group: object


def _ranks(mesh_or_group) -> set[int]:
    if isinstance(mesh_or_group, DeviceMesh):
        return set(mesh_or_group.mesh.flatten().tolist())
    return set(dist.get_process_group_ranks(mesh_or_group))


def resolve_meshes(mesh, group) -> StageMeshes:
    """The dp mesh, tp mesh and pipeline group that ``build_stage(..., mesh=, group=)`` mean.

    ``mesh`` has dimensions among ``("pp", "dp", "tp")``, in that order
    (:func:`pp_dp_mesh`, :func:`pp_dp_tp_mesh`, or a slice such as ``mesh["dp"]``). Its
    ``"pp"`` group is the pipeline group unless ``group`` is given; a mesh without a
    ``"pp"`` dimension needs ``group``. A ``"tp"`` dimension of size 1 is no tensor
    parallelism; with a ``"tp"`` dimension, a ``"dp"`` dimension of size 1 is no data
    parallelism (a 2-D ``("pp", "dp")`` mesh wraps with FSDP2 at any dp size, as it
    always did). Every check is local: a bad mesh raises on every rank, before any
    communication.

    Raises:
        StageSpecError: a mesh with other dimensions, or in another order, a mesh
            without ``"pp"`` and no pipeline group, or a pipeline group that meets the
            dp or tp mesh in more than this rank.
    """
    if not isinstance(mesh, DeviceMesh):
        raise StageSpecError(f"mesh={mesh!r} is not a DeviceMesh; build one with fxpp.pp_dp_mesh(pp, dp) or "
                             "fxpp.pp_dp_tp_mesh(pp, dp, tp)")
    names = tuple(mesh.mesh_dim_names or ())
    if not names or names != tuple(n for n in MESH_DIMS_3D if n in names):
        raise StageSpecError(
            f"mesh has dimensions {names or '(unnamed)'}; fxpp needs a mesh with dimensions named among "
            f"{MESH_DIMS_3D}, in that order (tp innermost), e.g. fxpp.pp_dp_mesh(pp, dp) or "
            "fxpp.pp_dp_tp_mesh(pp, dp, tp)"
        )
    if "pp" in names:
        pp_group = mesh["pp"].get_group()
        if group is None:
            group = pp_group
        elif _ranks(group) != _ranks(pp_group):
            raise StageSpecError(
                f"group has ranks {sorted(_ranks(group))}, but the mesh's 'pp' dimension gives this rank "
                f"{sorted(_ranks(pp_group))}; pass group=mesh['pp'].get_group() or leave it out"
            )
    elif group is None:
        raise StageSpecError(f"a mesh without a 'pp' dimension (here {names}) needs the pipeline group too: "
                             "group=mesh['pp'].get_group(); or pass the whole mesh")
    dp = mesh["dp"] if "dp" in names and mesh.ndim > 1 else (mesh if names == ("dp",) else None)
    tp = mesh["tp"] if "tp" in names and mesh.ndim > 1 else (mesh if names == ("tp",) else None)
    if tp is not None and tp.size() == 1:
        tp = None
    if "tp" in names and dp is not None and dp.size() == 1:
        dp = None
    me = dist.get_rank()
    pp_ranks = _ranks(group) if group is not None else set(range(dist.get_world_size()))
    for name, other in (("dp", dp), ("tp", tp)):
        if other is not None and pp_ranks & _ranks(other) != {me}:
            raise StageSpecError(
                f"rank {me}: the pipeline group {sorted(pp_ranks)} and the {name} mesh {sorted(_ranks(other))} must "
                f"share exactly this rank (each pipeline rank its own {name} coordinate); build both from one "
                "fxpp.pp_dp_mesh or fxpp.pp_dp_tp_mesh"
            )
    return StageMeshes(dp, tp, group)


def decoder_layer_modules(submodule: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The decoder layers a stage ``GraphModule`` calls, as ``(qualified name, module)``, in order."""
    seen, layers = set(), []
    for node in submodule.graph.nodes:
        if node.op == "call_module" and "fxpp" in node.meta and is_decoder_layer(node) and node.target not in seen:
            seen.add(node.target)
            layers.append((node.target, submodule.get_submodule(node.target)))
    return layers


MIXED_PRECISION = ("fp32", "bf16")


def mixed_precision_policy(mixed_precision: str | None, mp_policy: MixedPrecisionPolicy | None = None):
    """FSDP2's ``MixedPrecisionPolicy`` for ``mixed_precision`` (Note [mixed precision]), or None for fp32.

    Raises:
        StageSpecError: an unknown name, or both a name and a policy.
    """
    if mp_policy is not None:
        if mixed_precision is not None:
            raise StageSpecError("pass mixed_precision= or mp_policy=, not both")
        if not isinstance(mp_policy, MixedPrecisionPolicy):
            raise StageSpecError(f"mp_policy={mp_policy!r} must be a torch.distributed.fsdp.MixedPrecisionPolicy")
        return mp_policy
    if mixed_precision not in (None, *MIXED_PRECISION):
        raise StageSpecError(f"mixed_precision={mixed_precision!r} must be one of {MIXED_PRECISION} (or None: fp32)")
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


_SINGLE_RANK_MESHES: dict = {}


def single_rank_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D ``("dp",)`` mesh of this rank alone: FSDP2 then applies a mixed-precision policy without data parallelism.

    Made once per process and device type, with a process group only this rank joins
    (``use_local_synchronization``: no other rank takes part in creating it).
    """
    key = (dist.get_rank(), device.type)
    if key not in _SINGLE_RANK_MESHES:
        group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        _SINGLE_RANK_MESHES[key] = DeviceMesh.from_group(group, device.type, mesh_dim_names=("dp",))
    return _SINGLE_RANK_MESHES[key]


def parallelize_stage(submodule: torch.nn.Module, *, dp_mesh=None, data_parallel: str = "fsdp",
                      activation_checkpointing: bool = False, mp_policy: MixedPrecisionPolicy | None = None,
                      compile_backend: str | None = None) -> None:
    """Wrap a stage's ``GraphModule`` in place, once (Note [pipeline x data parallel]).

    Order matters and is torchtitan's: activation checkpointing on each decoder layer,
    then ``layer.compile()`` on each (Note [compiled stages] in ``fxpp.runtime.compiled``),
    then ``fully_shard`` (or ``replicate``) on each decoder layer, then on the stage
    itself (the root: its embeddings, norm, head and anything outside the layers).
    The stage's parameter names do not change.

    Args:
        submodule: the stage's runtime ``GraphModule``, whose modules are this rank's
            own (not the user's model's).
        dp_mesh: the 1-D dp mesh, or None for no data parallelism.
        data_parallel: ``"fsdp"`` or ``"replicate"``.
        activation_checkpointing: Note [activation checkpointing].
        compile_backend: compile each decoder layer in place with this backend (None: eager).
    """
    layers = decoder_layer_modules(submodule)
    if activation_checkpointing:
        if compile_backend is not None:
            prepare_compile(len(layers))
        for _, layer in layers:  # with compile: the checkpoint around the compiled forward
            checkpoint_layer(layer, compile_backend)
    elif compile_backend is not None:
        compile_layers(layers, compile_backend)
    if dp_mesh is None:
        return
    if data_parallel == "fsdp":
        # reshard_after_forward=False: under PP a stage runs several microbatches'
        # forwards before their backwards; resharding would all-gather the layer again
        # for each backward (torchtitan turns it off when pipeline parallelism is on).
        # The runtime schedules (Interleaved1F1B, ZBV, ...) unshard and reshard stages
        # explicitly around their compute anyway.
        policy = {} if mp_policy is None else {"mp_policy": mp_policy}
        for _, layer in layers:
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=False, **policy)
        fully_shard(submodule, mesh=dp_mesh, reshard_after_forward=False, **policy)
    else:
        # One all-reduce per decoder layer and one for the rest, like DDP's buckets.
        policy = {} if mp_policy is None else {"mp_policy": mp_policy}
        for _, layer in layers:
            replicate(layer, mesh=dp_mesh, **policy)
        replicate(submodule, mesh=dp_mesh, **policy)


def checkpoint_layer(layer: torch.nn.Module, compile_backend: str | None = None) -> None:
    """Recompute ``layer``'s activations in the backward (Note [activation checkpointing]); names unchanged.

    With ``compile_backend`` the checkpointed function is the layer's compiled forward
    (``fxpp.runtime.compiled.compiled_forward``).
    """
    # the bound method the module's __call__ would run
    forward = layer.forward if compile_backend is None else compiled_forward(layer, compile_backend)

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed_forward


def check_parallel_args(dp_mesh, data_parallel: str, activation_checkpointing: bool) -> None:
    if data_parallel not in DATA_PARALLEL_MODES:
        raise StageSpecError(f"data_parallel={data_parallel!r} must be one of {DATA_PARALLEL_MODES}")
    if not isinstance(activation_checkpointing, bool):
        raise StageSpecError(f"activation_checkpointing={activation_checkpointing!r} must be True or False")


def dp_dimension(mesh) -> "DeviceMesh | None":
    """The 1-D ``"dp"`` mesh of a mesh with dimensions among ``("pp", "dp", "tp")`` (None: it has none).

    A 1-D mesh without a name counts as a dp mesh (the spelling before meshes had names).
    """
    if mesh is None:
        return None
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim == 1:
        return mesh if names in ((), ("dp",)) else None
    return mesh["dp"] if "dp" in names else None


def dp_size(dp_mesh) -> int:
    """The number of data-parallel replicas of a mesh (its ``"dp"`` dimension's size; 1 for None or no dp)."""
    mesh = dp_dimension(dp_mesh)
    return 1 if mesh is None else mesh.size()


def global_target_tokens(count: int, dp_mesh) -> int:
    """The sum over the dp mesh of each replica's target-token count (one all-reduce over dp).

    The tp ranks of one replica hold the same labels and count the same tokens; they
    take part in the all-reduce of their own tp coordinate, not in each other's.
    """
    mesh = dp_dimension(dp_mesh)
    if mesh is None:
        return count
    # The backend's device: NCCL reduces CUDA tensors only.
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=mesh.get_group())
    return int(total.item())


def local_batch(batch: dict, dp_mesh) -> dict:
    """This dp replica's part of a global batch: every tensor split along dim 0 into dp parts, part ``d``.

    The same ``torch.tensor_split`` a schedule uses for microbatches, so replica ``d``'s
    microbatches are microbatches ``d * M ... (d + 1) * M - 1`` of the global batch split
    into ``dp * M`` (when dp * M divides the batch). Every tp rank of a replica gets the
    replica's whole part (tensor parallelism splits weights, not the batch).
    """
    mesh = dp_dimension(dp_mesh)
    if mesh is None:
        return dict(batch)
    d, n = mesh.get_local_rank(), mesh.size()
    return {k: torch.tensor_split(v, n, dim=0)[d] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
