"""Memory-aware cuts (issue 25): the memory model of ``fxpp.analysis.stage_memory`` and
``fxpp.pipeline(..., memory_limit=)``. Fast cases only; the predicted-against-measured
comparison is ``benchmarks/bench_memory_plan.py``."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import fxpp
from fxpp.analysis.memory import block_memory
from fxpp.analysis.schedule_order import peak_held
from fxpp.errors import MemoryLimitError, RunConfigError, StageSpecError
from fxpp.presets import COMMON
from fxpp.trainer.cli import parse_size


def _qwen(vocab: int, layers: int = 8, hidden: int = 64, meta: bool = True):
    cfg = tf.Qwen2Config(**{**COMMON, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden},
                         num_hidden_layers=layers, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    if meta:
        with torch.device("meta"):
            return tf.AutoModelForCausalLM.from_config(cfg).train()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).train()


def _last_layers(vocab: int) -> int:
    from fxpp.analysis.memory_plan import _lowest_peak

    model = _qwen(vocab)
    pipe = fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(2, 32), num_microbatches=4, device="cpu")
    limit = _lowest_peak(pipe.memory, 2) * 1.001  # within the search's 0.1 % bisection precision
    pipe = fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(2, 32), num_microbatches=4, device="cpu",
                         memory_limit=limit)
    assert all(r.peak <= limit for r in pipe.memory_plan())
    return len(pipe.layer_ranges[-1])


@pytest.mark.heavy  # six traced pipelines and a bisection over limits: ~15 s on a shared 2-core machine
def test_the_last_stage_gets_fewer_layers_as_the_vocabulary_grows():
    counts = [_last_layers(v) for v in (128, 8192, 65536)]
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0], counts


@pytest.mark.heavy  # five traced pipelines: ~5 s on a shared 2-core machine
def test_an_infeasible_limit_names_the_smallest_stage_count_that_fits():
    model = _qwen(128, hidden=128)
    fit4 = fxpp.pipeline(model, 4, schedule="1F1B", microbatch=(1, 16), num_microbatches=4, device="cpu")
    limit = max(r.peak for r in fit4.memory_plan())
    with pytest.raises(MemoryLimitError, match=r"the smallest stage count that fits is (\d)") as e:
        fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(1, 16), num_microbatches=4, device="cpu",
                      memory_limit=limit)
    smallest = int(str(e.value).split("the smallest stage count that fits is ")[1][0])
    assert 2 < smallest <= 4
    fxpp.pipeline(model, smallest, schedule="1F1B", microbatch=(1, 16), num_microbatches=4, device="cpu",
                  memory_limit=limit)
    with pytest.raises(MemoryLimitError, match="no stage count"):
        fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(1, 16), num_microbatches=4, device="cpu",
                      memory_limit=1000)


def test_predicted_layer_activations_equal_the_saved_tensors_of_a_real_backward():
    model = _qwen(128, layers=2, meta=False)
    pipe = fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(2, 16), num_microbatches=2, device="cpu")
    blocks = block_memory(pipe.model_graph, 2, torch.device("cpu"))
    layer = model.model.layers[1]
    hidden = torch.randn(2, 16, 64, requires_grad=True)
    pos = torch.arange(16)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(hidden, pos)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()  # the saved tensors serve a real backward
    predicted = blocks[2].own_saved + sum(v[0] for v in blocks[2].inherited.values())
    assert predicted == sum(seen.values())  # exact: the same kernels on the same shapes


@pytest.mark.parametrize("world,m", [(2, 4), (4, 4), (4, 8)])
def test_in_flight_counts_follow_torchs_single_stage_schedules(world, m):
    assert peak_held("GPipe", world, m) == [m] * world
    assert peak_held("1F1B", world, m) == [min(m, world - r) for r in range(world)]


@pytest.mark.parametrize("name", ["Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"])
def test_multi_stage_counts_come_from_torchs_order_and_saturate(name):
    counts = peak_held(name, 4, 8)
    assert counts == peak_held(name, 4, 16)  # steady state: more microbatches hold no more
    assert all(1 <= c <= 8 for c in counts) and counts[0] == max(counts)


def test_a_fast_infeasible_limit_is_refused():
    model = _qwen(128, layers=2)
    with pytest.raises(MemoryLimitError, match="no stage count fits: every layer has a stage already"):
        fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(1, 8), num_microbatches=2, device="cpu",
                      memory_limit=1000)


def test_memory_arguments_are_validated():
    model = _qwen(128, layers=2)
    with pytest.raises(StageSpecError, match="memory_limit needs schedule"):
        fxpp.pipeline(model, 2, memory_limit=10 ** 9)
    with pytest.raises(StageSpecError, match="microbatch="):
        fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(2,), memory_limit=10 ** 9)
    with pytest.raises(StageSpecError, match="memory_limit=-1"):
        fxpp.pipeline(model, 2, schedule="1F1B", microbatch=(2, 8), memory_limit=-1)
    with pytest.raises(StageSpecError, match="not a schedule"):
        fxpp.pipeline(model, 2, schedule="Nope", microbatch=(2, 8))
    with pytest.raises(StageSpecError, match="odd"):
        fxpp.pipeline(_qwen(128, layers=4), 3, schedule="ZBVZeroBubble", microbatch=(2, 8))
    with pytest.raises(StageSpecError, match="has no memory model"):
        fxpp.pipeline(model, 2).memory_plan()


def test_sizes_on_the_command_line():
    assert parse_size("80GB") == 80 * 10 ** 9
    assert parse_size("512MiB") == 512 * 2 ** 20
    assert parse_size("1024") == 1024
    with pytest.raises(RunConfigError, match="80XB"):
        parse_size("80XB")


def test_adamw_temporaries_are_two_of_the_largest_parameter_at_the_allocators_own_times():
    """The optimizer-step term (``MemoryModel.optimizer_temporaries``) against the allocator's reports
    of a real AdamW step (single-tensor loop, the CPU default): its ``sqrt`` and ``div`` of one parameter
    live together and are freed before the next parameter's, so the peak is two of the largest
    parameter, exactly, where folding the reports into profiled events summed them (Note
    [allocator timeline] in ``fxpp.testing.memory``)."""
    from torch.profiler import ProfilerActivity, profile

    from fxpp.analysis.memory import BlockMemory
    from fxpp.analysis.stage_memory import MemoryModel, MemorySettings
    from fxpp.testing.memory import allocator_peak

    params = [torch.nn.Parameter(torch.randn(n)) for n in (1 << 16, 1 << 15, 1 << 15)]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step allocates the moments
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    measured, _ = allocator_peak(prof)
    blocks = [BlockMemory(f"b{i}", param_bytes=4 * p.numel(), trainable_bytes=4 * p.numel(), largest_param=4 * p.numel())
              for i, p in enumerate(params)]
    model = MemoryModel(blocks, {}, (0, 0), MemorySettings(foreach=False), torch.device("cpu"))
    predicted = model.optimizer_temporaries(blocks)
    assert predicted == 2 * 4 * (1 << 16)
    # Above it only the 0-dim scalar operands of the loop's in-place ops (12 bytes with torch 2.13,
    # whatever the parameter count): under 64 bytes, against 512 KiB summed temporaries would add.
    assert 0 <= measured - predicted < 64


def test_steps_without_returned_outputs_keep_no_logits_after_the_pipeline():
    """``keep_outputs=False`` (``schedule.step(return_outputs=False)``, as ``fxpp run`` steps): the last
    rank keeps no microbatch's logits past its backward, so the end-of-step concatenation and the kept
    logits at the optimizer step are gone; the other ranks are unchanged."""
    import dataclasses

    from fxpp.analysis.stage_memory import MemoryModel

    pipe = fxpp.pipeline(_qwen(8192, layers=2), 2, schedule="1F1B", microbatch=(2, 64), num_microbatches=4,
                         device="cpu")
    m = pipe.memory
    plans = {keep: MemoryModel(m.blocks, m.cuts, (m.logits_bytes, m.logits_numel),
                               dataclasses.replace(m.settings, keep_outputs=keep), m.device).split_memory(pipe.layer_ranges)
             for keep in (True, False)}
    logits = 2 * 64 * 8192 * 4  # one microbatch's fp32 logits
    kept, dropped = plans[True][1], plans[False][1]
    assert kept.phase == "end of step" and kept.stages[0].logits == 2 * 4 * logits  # the kept and their concatenation
    assert dropped.phase != "end of step" and dropped.peak < kept.peak
    assert plans[True][0] == plans[False][0]


def test_the_input_backward_frees_the_logits_and_the_log_softmax():
    """Note [logits after the input backward] in ``fxpp.analysis.stage_memory``, on torch's own split
    backward of a last stage (head and loss): after ``stage_backward_input`` the allocator holds exactly
    the head's output gradient kept for ``W`` and the input's gradient; the logits (the forward cache's,
    popped) and the fp32 log-softmax the cross entropy saved are freed."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
    from torch.profiler import ProfilerActivity, profile

    from fxpp.testing.memory import allocator_reports

    vocab, batch, seq, hidden = 4096, 2, 16, 32
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(0, vocab, (batch, seq))
    loss_fn = fxpp.causal_lm_loss(labels, 1)
    h = torch.randn(batch, seq, hidden, requires_grad=True)
    logits_bytes = batch * seq * vocab * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cache = [head(h)]  # torch's forward cache holds the stage output until the backward
        loss = loss_fn(cache[0], labels)
        after_forward = torch.empty(7, dtype=torch.int8)  # 7 bytes: a mark in the allocator's reports
        output = cache.pop()
        _, groups = stage_backward_input([loss], None, [h], head.parameters())
        del output, loss
        after_input_backward = torch.empty(13, dtype=torch.int8)  # 13 bytes: the second mark
        stage_backward_weight(head.parameters(), groups)
    sizes = [nbytes for _, nbytes in allocator_reports(prof)]
    at_f, at_i = sizes.index(7), sizes.index(13)
    assert sum(sizes[:at_f]) >= 2 * logits_bytes  # the logits and the log-softmax
    assert sum(sizes[:at_i]) - 7 == logits_bytes + h.numel() * 4  # W's gradient and the input's, nothing else
    assert head.weight.grad is not None and after_forward.numel() + after_input_backward.numel() == 20
