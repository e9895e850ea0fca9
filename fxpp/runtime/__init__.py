"""The runtime room: everything that touches process groups or schedules.

The only room that imports ``torch.distributed.pipelining``.

``placement``: which rank holds which stage; device and backend.
``stage``: fxpp stages as ``PipelineStage``s (``Pipeline.build_stage``).
``ties``: tied weights and their gradient exchange (Note [tied-weight sync]).
``schedule``: ``PipelineSchedule`` (``fxpp.schedule``), stepping on pre-split microbatches.
``microbatch``: splitting multimodal batches into microbatches.
``parallel``: pipeline x data parallel on a ("pp", "dp") mesh (FSDP2 or replication).
``loss``: losses that reproduce transformers' whole-batch loss.
``checkpoint``: per-stage safetensors checkpoints. ``models``: building models for the CLI.
``launch``: local ranks. ``train``: the ``fxpp run`` job. ``torch_ir``: torch's own splitter.
``protocols``: what the runtime reads from a ``Pipeline``, without importing it back.
"""
