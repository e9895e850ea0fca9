"""The runtime room: the library over ``torch.distributed.pipelining`` (stages, schedules, ties, meshes, checkpoints).

The only room that imports ``torch.distributed.pipelining``.

``placement``: which rank holds which stage (and each schedule's placement); device and backend.
``stage``: fxpp stages as ``PipelineStage``s (``Pipeline.build_stage``).
``ties``: tied weights and their gradient exchange (Note [tied-weight sync]).
``schedule``: ``PipelineSchedule`` (``fxpp.schedule``), stepping on pre-split microbatches.
``microbatch``: splitting multimodal batches into microbatches.
``parallel``: pipeline x data (x tensor) parallel meshes ("pp", "dp"[, "tp"]); FSDP2 or replication over dp.
``tensor_parallel``: the model's own tensor-parallel plan applied to a stage on the "tp" mesh.
``loss``: losses that reproduce transformers' whole-batch loss.
``checkpoint``: per-stage safetensors checkpoints. ``torch_ir``: torch's own splitter.
``durable``: files written whole or not at all (temporary name, fsync, rename), their
checksums, and ranks agreeing on a save's or load's outcome before anything waits on them.
``protocols``: what the runtime reads from a ``Pipeline``, without importing it back.

No training loop and no command line: the ``fxpp run`` application lives in ``fxpp.trainer``,
which imports this room (never the other way round).
"""
