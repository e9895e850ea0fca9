"""Tensor parallelism inside pipeline stages: the model's own tensor-parallel plan on the ``"tp"`` mesh.

Terms
-----
tp plan
    transformers' map from module names with ``*`` for layer numbers
    (``model.layers.*.self_attn.q_proj``) to style names (``"colwise"``, ``"rowwise"``,
    ``"embedding_rowwise"``, ``"colwise_gather_output"``, ...): the model's ``tp_plan``,
    which transformers assembles when it builds the model from the class's ``_tp_plan``
    (``lm_head``), the config's ``base_model_tp_plan`` (the decoder layers' linears) and
    the input embedding (``embedding_rowwise``).
style
    A ``transformers.distributed.tensor_parallel.TensorParallelLayer`` of
    ``ALL_PARALLEL_STYLES``: ``shard_param`` turns one parameter into a ``DTensor`` on the
    tp mesh, ``install_forward`` replaces the module's ``forward`` (an instance attribute)
    by one that lays out its input and output (a replicated input DTensor for a colwise
    linear, a sharded one for a rowwise linear, the ``Partial`` sum of a rowwise output
    reduced to a replicated one).
stage plan
    The tp plan expanded over one stage's own modules (:func:`stage_plan`): each module of
    the stage the plan names, its parameters' styles and its own style, in module order.

Note [tensor parallel stages]
    ``build_stage(i, device, mesh=fxpp.pp_dp_tp_mesh(pp, dp, tp))`` applies the model's
    own plan to this rank's copy of the stage's modules (never the user's model), after
    they hold their weights (copied, or read from ``checkpoint=``), before FSDP2 over dp
    (Note [pipeline x data parallel] in ``fxpp.runtime.parallel``):

    * each named parameter keeps the rows (colwise, embedding_rowwise) or columns
      (rowwise) of tp coordinate ``t``: a ``DTensor`` with ``Shard`` on the tp mesh, cut
      locally from the rank's whole weight (``distribute_tensor(src_data_rank=None)``:
      no communication; every rank holds the same weights, as for data parallelism);
    * each named module's ``forward`` becomes the style's: transformers' own classes, no
      per-family plans in fxpp. Attention modules compute their shapes as
      ``view(*input_shape, -1, head_dim)``, so with ``q_proj``/``k_proj``/``v_proj``
      colwise they run on their local heads (``num_attention_heads / tp`` query heads,
      ``num_key_value_heads / tp`` key/value heads: the grouping ratio is unchanged),
      and ``o_proj`` rowwise sums the heads' partial outputs over tp;
    * what the stage graph passes between leaf modules, and what crosses every cut,
      stays whole: embeddings sum their vocabulary shards, rowwise outputs are
      all-reduced, and the head's ``colwise_gather_output`` gathers the logits over the
      vocabulary. The stage's static shapes and the sender's shape check
      (``check_sent_shapes``) are unchanged. The one exception is the last stage's
      logits under a head style that shards its output (Note [loss parallel]).
    * parameters the plan does not name (norms, rotary buffers, the routers and routed
      experts of a mixture of experts) stay whole and plain on every tp rank; their
      gradients are the same on every tp rank, since what reaches them (the residual
      stream and its gradient) is replicated. The model's expert-parallel plan
      (``ep_plan``: ``grouped_gemm``, ``ep_dispatch_experts``) is not applied: the
      routed experts run whole on every tp rank (each computes the same tokens' experts:
      tp saves none of their memory or time), while shared experts and dense MLPs follow
      the tp plan where it names them (``mlp.shared_experts.gate_proj`` colwise, ...). A
      tp plan that names routed experts (Llama 4's ``moe_tp_experts``, a style
      transformers deprecates) is refused as a style fxpp does not apply.
      The router's logits, and so the load-balancing loss, are the same on every tp rank
      (Note [auxiliary loss] in ``fxpp.runtime.loss``).

    One style is replaced: ``"replicated_with_grad_allreduce"`` (Qwen3's per-head
    ``q_norm`` / ``k_norm``, which see only their rank's heads) all-reduces ``param.grad``
    in a post-accumulate-grad hook, which sums again what earlier microbatches already
    summed: with microbatches (a pipeline has several per step) the gradient of
    microbatch 1 is counted ``tp`` times by microbatch 2's all-reduce.
    :class:`SummedGradReplicated` sums each use's gradient contribution over tp in the
    backward instead (identity forward), before it is accumulated: exact for any number
    of microbatches, under FSDP2's deferred reduction and zero-bubble schedules alike.

    Refused at build, on every rank, before any communication (``TensorParallelError``):
    a model without a plan, parameters that are already ``DTensor``s, a style fxpp has not
    checked, a stage the plan names nothing of, tp not dividing the heads of a sharded
    attention projection (naming the projection, ``num_attention_heads`` or
    ``num_key_value_heads``, and tp) or any other dimension the plan shards, a cut that
    a layer's shared key/value states cross (:func:`check_crossings`).

Note [loss parallel]
    The head's style decides whether the last stage's logits arrive whole or sharded.
    ``colwise_gather_output`` (every model's ``_tp_plan``) gathers them: each tp rank
    holds the whole ``[batch, seq, vocab]`` logits of a microbatch. A plan whose head
    style shards the output over the vocabulary (``"colwise"``: ``Shard(-1)``), e.g.
    ``model.tp_plan = {**model.tp_plan, "lm_head": "colwise"}``, keeps them sharded:
    fxpp installs that style with ``use_local_output=False``, so the stage returns a
    ``DTensor`` with ``Shard(-1)`` on the tp mesh (transformers' own ``use_local_output=True``
    would hand the loss a plain tensor of ``vocab / tp`` columns, a wrong cross entropy).
    Elementwise steps after the head (Gemma's final-logit softcapping) keep the sharding.
    :func:`sharded_cross_entropy` (``fxpp.causal_lm_loss``) computes the summed cross
    entropy of such logits under torch's ``loss_parallel()``: the log-softmax reduces the
    row maximum and the sum of exponentials over tp, the target logit is picked on the
    rank that holds it and summed over tp; no rank gathers the logits. The backward must
    run under the same context (its log-softmax backward is the identity, the whole
    gradient coming from the loss's backward), and a schedule runs the last stage's
    backward outside the loss function: :class:`_LossParallelCrossEntropy` runs the
    forward on a detached copy of the logits and its backward under ``loss_parallel()``
    again, so the context covers exactly these ops and no other ``DTensor``
    log-softmax. The value is the unsharded loss up to float32 reassociation of the sum
    of exponentials (two partial sums). Refused (``TensorParallelError``): sharded
    logits on a mesh of more than one dimension or sharded other than over the
    vocabulary. Any other loss function gets a ``DTensor`` and DTensor's own rules:
    right, but the log-softmax gathers the vocabulary.

Note [unplanned parameters]
    A parameter the plan does not name stays whole on every tp rank, which is exact only
    where what reaches it is replicated. A module between a colwise and a rowwise
    projection sees only the rank's part of the activations: Apertus's xIELU activation
    (``mlp.act_fn.alpha_p``) between ``up_proj`` and ``down_proj``, per-head norms a plan
    leaves out. Its gradient is then the rank's partial sum, different on every tp rank,
    and the unpatched model's is their sum: a silent wrong gradient. fxpp cannot tell
    from the module tree which side of the projections a module runs on (the query
    low-rank projection and norms of MLA attention sit beside the head projections and
    see replicated states), so it checks the gradients: once, at the very end of the
    first step that computed them (after the step's last collective), every unplanned
    parameter's gradient is compared over the tp group by a fingerprint (its sum, sum of
    magnitudes and largest magnitude: two all-reduces of 3 numbers a parameter).
    Gradients that differ refuse the run (``TensorParallelError`` on every rank of the
    tp group, naming the parameters) and tell the user to name the module in the plan
    as ``"replicated_with_grad_allreduce"`` (fxpp's :class:`SummedGradReplicated`: the
    rank's partial gradients summed over tp, exact).

Note [gradient placement]
    DTensor's sharding rules may return a gradient laid out otherwise than its parameter:
    the vocabulary-sharded embedding (``embedding_rowwise``: ids and the output's
    gradient replicated) gets its weight's gradient as a whole, ``Replicate`` tensor,
    computed locally without communication. The tied head's gradient is sharded like
    its weight, and the tied-weight exchange sends local shards, so each sharded
    parameter gets a post-accumulate-grad hook that lays its gradient out as the
    parameter (``Replicate`` to ``Shard`` is this rank's slice: no communication, the
    same values). Under FSDP2 the hook is gone with the parameter FSDP2 replaces, and
    FSDP2 does the same itself before it reduces over dp
    (``FSDPParam._get_grad_inner_tensor``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES, replace_layer_number_by_wildcard
from transformers.distributed.tensor_parallel import (ColwiseParallel, EmbeddingParallel, RowwiseParallel,
                                                      TensorParallelLayer)

from ..errors import TensorParallelError

# The styles fxpp applies (transformers' own instances) and what each shards; anything else is refused by name.
CHECKED_STYLES = ("colwise", "colwise_rep", "colwise_gather_output", "rowwise", "rowwise_rep", "rowwise_split_input",
                  "embedding_rowwise", "embedding_colwise", "replicated_with_grad_allreduce")
# Attribute names of a text config's head counts, to name the one a projection's heads are.
HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads")


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the tp group (one all-reduce per use)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SummedGradReplicated(TensorParallelLayer):
    """Whole parameters on every tp rank whose use sees only the rank's part (Note [tensor parallel stages]).

    The module's forward reads each parameter through :class:`_SumGradOverTP`: the
    parameter gets, per use (per microbatch), the sum of that use's gradient over tp.
    """

    def install_forward(self, module, mesh, *, config=None, mesh_manager=None):
        original, group = module.forward, mesh.get_group()

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            # The parameters registered now (FSDP2's unsharded ones under data parallelism).
            saved = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
            try:
                for name, p in saved.items():
                    module._parameters[name] = _SumGradOverTP.apply(p, group)
                return original(*args, **kwargs)
            finally:
                module._parameters.update(saved)

        module.forward = forward
        return module


_REPLACED = {"replicated_with_grad_allreduce": SummedGradReplicated()}


def style(name: str) -> TensorParallelLayer:
    """The style object fxpp applies for a plan's style name."""
    return _REPLACED.get(name) or ALL_PARALLEL_STYLES[name]


def tp_plan_of(model: torch.nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan (``model.tp_plan``), refused where fxpp cannot apply it.

    Raises:
        TensorParallelError: no plan, or parameters that are already ``DTensor``s.
    """
    name = type(model).__name__
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan:
        raise TensorParallelError(
            f"fxpp.runtime.tensor_parallel: {name} has no tensor-parallel plan (its tp_plan is empty: neither "
            f"{name}._tp_plan nor its config's base_model_tp_plan names a module), so tp > 1 cannot split it. "
            "Build the stages with tp 1, or set model.tp_plan = {...} (transformers' style names) first")
    # The expert-parallel plan (``model.ep_plan``) is not applied: routed experts the tp plan
    # does not name stay whole on every tp rank (Note [tensor parallel stages]).
    for pname, p in model.named_parameters():
        if isinstance(p, DTensor):
            raise TensorParallelError(
                f"fxpp.runtime.tensor_parallel: {name} is already parallelized ({pname} is a DTensor on mesh "
                f"{p.device_mesh.mesh_dim_names}); pass the model with whole parameters (as built or loaded "
                "without tp_plan / distributed_config): fxpp shards each stage's own copy")
    return plan


def stage_plan(plan: dict[str, str], submodule: torch.nn.Module) -> list[tuple[str, dict[str, str], str | None]]:
    """The plan over a stage's modules: ``[(module name, {param: style}, module style or None)]``, in module order.

    The matching is transformers' (``replace_layer_number_by_wildcard``): a parameter
    takes its own rule or its module's; a module its own rule.
    """
    out = []
    for module_name, module in submodule.named_modules():
        own = plan.get(replace_layer_number_by_wildcard(module_name)) if module_name else None
        params = {}
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            found = plan.get(replace_layer_number_by_wildcard(full)) or own
            if found is not None:
                params[pname] = found
        if own is not None or params:
            out.append((module_name, params, own))
    return out


def _sharded_dim(layer: TensorParallelLayer, param: torch.Tensor, pname: str) -> int | None:
    """The dimension of ``param`` that ``layer.shard_param`` splits over tp, or None (replicated)."""
    if isinstance(layer, ColwiseParallel):
        return 0  # Shard(ndim - 2): the output features of a weight, the only dim of a bias
    if isinstance(layer, RowwiseParallel):
        return None if pname == "bias" else param.ndim - 1
    if isinstance(layer, EmbeddingParallel):
        return layer.shard_dim
    return None


def check_stage_plan(index: int | None, model: torch.nn.Module, submodule: torch.nn.Module,
                     entries: list[tuple[str, dict[str, str], str | None]], tp: int) -> None:
    """Refuse a stage plan that would not split the stage exactly over ``tp`` ranks (local: every rank raises).

    ``index`` None: ``submodule`` is the whole model (``fxpp run`` checks it before any rank starts).

    Raises:
        TensorParallelError: a style fxpp has not checked, a stage the plan names nothing
            of, tp not dividing the heads of a sharded attention projection or another
            sharded dimension.
    """
    where = "fxpp.runtime.tensor_parallel: " + (f"stage {index}" if index is not None else type(model).__name__)
    if not entries:
        raise TensorParallelError(
            f"{where}: the tp plan of {type(model).__name__} names none of its modules (plan keys e.g. "
            f"{sorted(model.tp_plan)[:3]}), so tp={tp} would only replicate it; build the stages with tp 1")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # Styles and heads first (the likelier mistake, and the one to name), then every other sharded dimension.
    for module_name, params, own in entries:
        for name in sorted({*params.values(), *([own] if own else [])}):
            if name not in CHECKED_STYLES:
                raise TensorParallelError(
                    f"{where}: {module_name} has the tp style {name!r}, which fxpp does not apply yet (it applies "
                    f"{', '.join(CHECKED_STYLES)}); build the stages with tp 1")
        heads = _sharded_heads(submodule, module_name, own)
        if heads is not None and heads[0] % tp:
            counts = [f"{c}={getattr(text, c)}" for c in HEAD_COUNTS if getattr(text, c, None) == heads[0]]
            raise TensorParallelError(
                f"{where}: tp={tp} does not divide the {heads[0]} heads of {module_name} "
                f"({counts[0] if counts else f'{heads[1]} features of head_dim {heads[2]}'}); each tp rank must "
                f"hold whole heads: choose a tp that divides {heads[0]}")
    for module_name, params, _ in entries:
        module = submodule.get_submodule(module_name)
        for pname, pstyle in params.items():
            p = module.get_parameter(pname)
            dim = _sharded_dim(style(pstyle), p, pname)
            if dim is not None and p.shape[dim] % tp:
                raise TensorParallelError(
                    f"{where}: tp={tp} does not divide dimension {dim} of {module_name}.{pname} ({p.shape[dim]}, "
                    f"shape {list(p.shape)}), which the tp plan shards ({pstyle!r}); choose a tp that divides "
                    f"{p.shape[dim]}")


def _sharded_heads(submodule: torch.nn.Module, module_name: str, own: str | None) -> tuple[int, int, int] | None:
    """``(heads, out_features, head_dim)`` of an attention projection whose output the plan shards, else None.

    An attention module carries ``head_dim``; a colwise child with a sharded output
    (not ``colwise_gather_output``) hands each tp rank ``out_features / tp`` features,
    which must be whole heads.
    """
    if own is None or "." not in module_name:
        return None
    layer, module = style(own), submodule.get_submodule(module_name)
    head_dim = getattr(submodule.get_submodule(module_name.rpartition(".")[0]), "head_dim", None)
    layout = getattr(layer, "output_layouts", None)
    if not (isinstance(layer, ColwiseParallel) and isinstance(head_dim, int) and hasattr(module, "out_features")
            and layout is not None and layout.is_shard()):
        return None
    return module.out_features // head_dim, module.out_features, head_dim


def check_crossings(index: int, stage, tp: int) -> None:
    """Refuse a stage whose cuts carry a layer's shared state (local: every rank raises).

    Under tensor parallelism what a layer hands a later layer besides the hidden states
    (Gemma 4's shared key/value states) holds only the rank's heads; across a cut it
    would not fit its slot, traced whole. Hidden states, inputs and per-layer inputs
    stay whole.

    Raises:
        TensorParallelError: naming the value and the cut.
    """
    for layout in (stage.in_layout, stage.out_layout):
        for identity in () if layout is None else layout.identities:
            if identity.startswith("shared state"):
                raise TensorParallelError(
                    f"fxpp.runtime.tensor_parallel: stage {index}: {identity} crosses cut {layout.cut}; with tp={tp} "
                    "a layer's shared key/value states hold only the rank's heads, and sending them across a cut is "
                    "not built yet: cut where no shared state crosses (fxpp.pipeline(..., cuts=[...])) or build with "
                    "tp 1")


def check_model(model: torch.nn.Module, tp: int) -> list[tuple[str, dict[str, str], str | None]]:
    """The whole model's plan, checked for ``tp`` ranks as each stage's will be (before any rank starts).

    Raises:
        TensorParallelError: as :func:`tp_plan_of` and :func:`check_stage_plan`.
    """
    entries = stage_plan(tp_plan_of(model), model)
    check_stage_plan(None, model, model, entries, tp)
    return entries


def parameter_share(submodule: torch.nn.Module, entries: list[tuple[str, dict[str, str], str | None]],
                    tp: int) -> tuple[int, int]:
    """``(parameters one tp rank holds, parameters of the stage)``: sharded ones count ``1 / tp`` each."""
    sharded = {}
    for module_name, params, _ in entries:
        module = submodule.get_submodule(module_name)
        for pname, pstyle in params.items():
            p = module.get_parameter(pname)
            if _sharded_dim(style(pstyle), p, pname) is not None:
                sharded[id(p)] = p.numel()
    whole = {id(p): p.numel() for p in submodule.parameters()}
    return sum(n // tp if i in sharded else n for i, n in whole.items()), sum(whole.values())


def head_name(model: torch.nn.Module) -> str | None:
    """The module name of the model's output head (``get_output_embeddings``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((name for name, m in model.named_modules() if head is not None and m is head), None)


def shards_logits(entries: list[tuple[str, dict[str, str], str | None]], head: str | None) -> bool:
    """Whether the stage plan's head style keeps the logits sharded over the vocabulary (Note [loss parallel])."""
    own = next((own for name, _, own in entries if name == head and head is not None), None)
    layer = None if own is None else style(own)
    layout = getattr(layer, "output_layouts", None)
    return isinstance(layer, ColwiseParallel) and layout is not None and layout.is_shard()


def apply_tensor_parallel(submodule: torch.nn.Module, entries: list[tuple[str, dict[str, str], str | None]],
                          tp_mesh, config, *, head: str | None = None) -> None:
    """Shard the stage's planned parameters over ``tp_mesh`` and install the styles' forwards (in place).

    ``submodule`` is this rank's own copy of the stage, holding whole weights, or on the meta
    device (to be allocated, then read from a checkpoint: ``fxpp.runtime.tp_checkpoint``; its
    gradient hooks are then installed after allocation, :func:`hook_grads`, since
    ``to_empty`` swaps each parameter's contents and drops them).
    Parameters first, then the module's forward, as transformers' ``apply_tensor_parallelism``.
    Each local shard is copied out of the whole weight, so the whole weight is freed.
    ``head``: the output head's module name; a head style that shards the logits keeps
    them a ``DTensor`` (Note [loss parallel]).
    """
    for module_name, params, own in entries:
        module = submodule.get_submodule(module_name)
        for pname, pstyle in params.items():
            style(pstyle).shard_param(module, pname, tp_mesh, config=config)
            p = module._parameters[pname]
            if isinstance(p, DTensor):
                p = module._parameters[pname] = torch.nn.Parameter(_own_storage(p), requires_grad=p.requires_grad)
                if p.requires_grad and not p.is_meta:
                    p.register_post_accumulate_grad_hook(_grad_as_param)
        if own is None:
            continue
        layer = style(own)
        if module_name == head and shards_logits(entries, head):
            layer = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
        layer.install_forward(module, tp_mesh, config=config)


class _LossParallelCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of vocabulary-sharded logits, forward and backward under ``loss_parallel()``.

    Note [loss parallel]: the forward computes on a detached copy and keeps that small
    graph; the backward replays its gradient under the context.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        with torch.enable_grad():
            x = logits.detach().requires_grad_(logits.requires_grad)
            with loss_parallel():
                ce = F.cross_entropy(x.float().reshape(-1, x.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                                     reduction="sum")
        ctx.graph = (x, ce)
        return ce.to_local().detach()

    @staticmethod
    def backward(ctx, grad):
        x, ce = ctx.graph
        del ctx.graph
        with loss_parallel():
            (dx,) = torch.autograd.grad(ce, x, DTensor.from_local(grad.contiguous(), ce.device_mesh, ce.placements))
        return dx, None, None


def sharded_cross_entropy(logits: DTensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The summed cross entropy of logits sharded over the vocabulary, as a plain scalar (Note [loss parallel]).

    Raises:
        TensorParallelError: logits on a mesh of several dimensions, or not sharded over
            their last dimension only.
    """
    vocab_dim = logits.ndim - 1
    if logits.device_mesh.ndim != 1 or tuple(logits.placements) != (Shard(vocab_dim),):
        raise TensorParallelError(
            f"fxpp.runtime.loss: the logits are a DTensor with placements {tuple(logits.placements)} on mesh "
            f"{logits.device_mesh.mesh_dim_names}; fxpp's loss-parallel cross entropy takes logits sharded over the "
            "vocabulary (their last dimension) on the tp mesh alone, as the head's 'colwise' style leaves them. Give "
            "the head 'colwise_gather_output' to gather them, or shard them so")
    return _LossParallelCrossEntropy.apply(logits, labels.to(logits.device), ignore_index)


# Relative difference over tp above which an unplanned parameter's gradient is a rank's
# partial sum (Note [unplanned parameters]), on its fingerprint (sum, sum of magnitudes,
# largest magnitude), against the sum of magnitudes (the largest magnitude for itself):
# replicated computations give the same gradient on every tp rank up to the order of an
# all-reduce's sum (bitwise at tp 2: a two-term sum commutes; ulps, ~1e-7 relative,
# beyond), while a partial sum misses the other ranks' terms, of the order of the
# gradient itself.
UNPLANNED_RTOL = 1e-3


def unplanned_parameters(submodule: torch.nn.Module, entries: list[tuple[str, dict[str, str], str | None]]
                         ) -> list[str]:
    """The trainable parameters of the stage that the stage plan does not name, by name, sorted."""
    named = {f"{module}.{p}" if module else p for module, params, _ in entries for p in params}
    return sorted(n for n, p in submodule.named_parameters() if p.requires_grad and n not in named)


def check_unplanned_grads(index: int, submodule: torch.nn.Module, names: list[str], tp_mesh) -> bool:
    """Refuse unplanned parameters whose gradients differ over tp (Note [unplanned parameters]).

    Returns False where no gradient has been computed yet (check again after the next step).

    Raises:
        TensorParallelError: naming the parameters and the relative difference.
    """
    grads = [submodule.get_parameter(n).grad for n in names]
    if not names or all(g is None for g in grads):
        return not names
    device = next(g for g in grads if g is not None).device
    # One fingerprint per parameter (3 float64 numbers): the check costs two all-reduces of
    # 3 numbers a parameter, whatever the parameters' size (routed experts are unplanned).
    prints = torch.zeros(len(names), 3, dtype=torch.float64, device=device)
    for i, g in enumerate(grads):
        if g is not None:
            g = (g.to_local() if isinstance(g, DTensor) else g).detach().double()
            prints[i] = torch.stack([g.sum(), g.abs().sum(), g.abs().max() if g.numel() else g.new_zeros(())])
    high, low = prints.clone(), prints.clone()
    group = tp_mesh.get_group()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    spread = (high - low).abs()
    scale = torch.maximum(high.abs(), low.abs())
    bad = []
    for i, name in enumerate(names):
        magnitude, largest = float(scale[i, 1]), float(scale[i, 2])
        worst = max(float(spread[i, 0]) / magnitude if magnitude else 0.0,
                    float(spread[i, 1]) / magnitude if magnitude else 0.0,
                    float(spread[i, 2]) / largest if largest else 0.0)
        if worst > UNPLANNED_RTOL:
            bad.append((name, worst))
    if bad:
        modules = sorted({replace_layer_number_by_wildcard(name.rpartition(".")[0]) for name, _ in bad})
        raise TensorParallelError(
            f"fxpp.runtime.tensor_parallel: stage {index}: the gradients of {len(bad)} parameter(s) the tp plan does "
            f"not name differ over the tp ranks (e.g. {bad[0][0]}, by {bad[0][1]:.3g} relative): they "
            "see a rank's part of the activations (between a colwise and a rowwise projection), so each rank has a "
            "partial gradient. Name their modules in the plan as 'replicated_with_grad_allreduce' (summed over tp), "
            f"e.g. model.tp_plan = {{**model.tp_plan, {modules[0]!r}: 'replicated_with_grad_allreduce'}}, or build "
            "with tp 1")
    return True


def hook_grads(submodule: torch.nn.Module) -> None:
    """Install :func:`_grad_as_param` on every DTensor parameter of a stage allocated after it was sharded on meta."""
    for p in submodule.parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            p.register_post_accumulate_grad_hook(_grad_as_param)


def _grad_as_param(p: torch.nn.Parameter) -> None:
    """Keep ``p.grad`` laid out as ``p`` (Note [gradient placement]); a local slice, no communication."""
    grad = p.grad
    if isinstance(grad, DTensor) and grad.placements != p.placements:
        p.grad = grad.redistribute(placements=p.placements)


def _own_storage(p: DTensor) -> DTensor:
    """``p`` with a local shard that owns its memory (a slice would keep the whole weight alive)."""
    local = p.to_local()
    if local.untyped_storage().nbytes() == local.numel() * local.element_size():
        return p.detach()
    return DTensor.from_local(local.detach().clone(), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def check_tp_args(tp: int, dp_mesh, data_parallel: str, policy) -> None:
    """Refuse what is not built with tensor parallelism yet (local: every rank raises).

    Raises:
        TensorParallelError: ``data_parallel="replicate"`` over dp > 1, or mixed precision.
    """
    if dp_mesh is not None and data_parallel != "fsdp":
        raise TensorParallelError(
            f"fxpp.runtime.tensor_parallel: data_parallel={data_parallel!r} with tp={tp} over dp={dp_mesh.size()} is "
            "not built yet; use data_parallel='fsdp' (FSDP2 over dp on the tp-sharded parameters)")
    if policy is not None:
        raise TensorParallelError(
            f"fxpp.runtime.tensor_parallel: mixed precision ({policy}) with tp={tp} is not built yet; build the "
            "stages in fp32 (mixed_precision=None)")
