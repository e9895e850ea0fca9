"""``fxpp export SAVE_DIR OUT_DIR``: a Hugging Face checkpoint directory from a run's save.

Terms:
    save: one step directory of SAVE_DIR (fxpp/trainer/run_state.py): per-stage, per-dp-rank
        safetensors files holding the model's own state-dict keys.
    output key: a key of the written checkpoint. For most models it is the model's own
        key; a tensor that transformers keeps in another layout than its checkpoints (an
        MoE's experts fused into one tensor) is written as ``save_pretrained`` writes it
        (one tensor per expert), by transformers' own ``revert_weight_conversion``.

Note [export streams]: export never holds the model. It plans the output from the stage
files' headers (``save_reader.saved_tensors``), checks the keys and shapes against the model
built on the meta device, compares the copies that must be equal (dp replicas, a weight two
stages hold, a tied ``lm_head``) chunk by chunk, then writes each output file header first
and each tensor as consecutive row chunks of at most ``save_reader.CHUNK_BYTES`` (32 MiB),
read from the stage files into one kept buffer, cast into a second one where the
checkpoint's dtype differs, and written (``fxpp.runtime.checkpoint.write_safetensors``). So
the peak is a chunk (two when casting), whatever the model's size and its largest tensor.
Only a tensor written in another layout (an MoE's fused experts) is read whole and kept,
with its per-expert pieces, until its last piece is written.
``benchmarks/bench_memory.py --export`` measures the peak.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator

import torch
from huggingface_hub.serialization import split_state_dict_into_shards_factory  # transformers needs it
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from ..errors import CheckpointError
from ..runtime.checkpoint import check_checkpoint, resolve_inside, write_safetensors
from .models import load_config
from .save_reader import SaveReader, SavedTensor, row_chunks, saved_tensors, whole_tensors
from .step_files import MODEL_FILES, TOKENIZER_FILES, read_state, step_dir


def export(save_dir: str, out_dir: str, step: int | None = None, max_shard_size: str = "5GB") -> int:
    """Write a Hugging Face checkpoint directory from a save: weights, config.json, the model folder's files.

    The weights are written tensor by tensor (Note [export streams]); the save's keys are
    checked against the model built on the meta device; dp shards are joined, copies checked
    equal, floating tensors cast to the checkpoint's dtype (config.json's ``dtype``; the save
    holds the training's master dtype). The files are what ``save_pretrained`` writes: its
    output keys, split into files of at most ``max_shard_size``, ``model.safetensors.index.json``
    when there are several, a tied ``lm_head.weight`` left out; config.json with the weights'
    dtype; generation_config.json. Then every file of the model folder that the run copied into
    the save (``step_files.model_folder_files``: tokenizer, chat template, the folder's own
    generation_config.json, ...). ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the
    trained weights. A LoRA run writes a PEFT adapter folder instead (:func:`export_adapter`).

    Returns:
        the step exported.

    Raises:
        CheckpointError: a saved tensor the model does not have, a key of the model the
            save lacks (besides a tied ``lm_head.weight``), a shape the model does not
            have (``fxpp.runtime.checkpoint.check_checkpoint``), copies that differ, stage
            files that do not join (``save_reader.saved_tensors``), a listed model file that is
            not a regular file inside SAVE_DIR.
    """
    state = read_state(save_dir, step)
    directory = step_dir(save_dir, state["step"])
    if state["settings"].get("lora_rank"):
        export_adapter(state, whole_tensors(directory, state), out_dir)
        return state["step"]
    saved = saved_tensors(directory, state)
    model_files = saved_model_files(save_dir)
    config = load_config(save_dir)
    dtype = getattr(config, "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    # Every key of the model, nothing else, right shapes (a tied lm_head.weight may be absent).
    tied = check_checkpoint(model, {k: (t.shape, t.dtype, t.pieces[0].file) for k, t in saved.items()}, save_dir)
    own = {k: torch.empty(saved[k].shape, device="meta",
                          dtype=dtype if isinstance(dtype, torch.dtype) and saved[k].dtype.is_floating_point
                          else saved[k].dtype)
           for k in model.state_dict() if k in saved and k not in tied}
    written, source = _output_keys(model, own)
    # save_pretrained's split of the same tensors: pieces of one tensor (views) share its storage,
    # counted once and kept in one file. Meta tensors have no storage id of their own: their base's.
    split = split_state_dict_into_shards_factory(
        written, max_shard_size=max_shard_size, filename_pattern="model{suffix}.safetensors",
        get_storage_size=lambda t: t.untyped_storage().nbytes(),
        get_storage_id=lambda t: id(t if t._base is None else t._base))
    with SaveReader() as reader:
        for tensor in saved.values():
            reader.check_copies(tensor)
        if tied:  # the last stage's copy of a tied weight must have stayed equal to the first stage's
            embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
            for key in sorted(tied & set(saved)):
                if not reader.equal(saved[key], saved[embedding]):
                    raise CheckpointError(f"{save_dir}: {key} differs from {embedding}, to which the config ties it; "
                                          "the stages' tied copies diverged, the save cannot be exported as tied")
        os.makedirs(out_dir, exist_ok=True)
        _remove_stale_weights(out_dir, set(split.filename_to_tensors))
        pieces = _Pieces(model, reader, saved, own, source)
        for name, keys in split.filename_to_tensors.items():
            layout = {k: (written[k].dtype, tuple(written[k].shape)) for k in keys}
            write_safetensors(os.path.join(out_dir, name), layout, pieces.file(keys), {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # config.json as save_pretrained writes it: the dtype of the first floating parameter, the class.
    first = next((own[n].dtype for n, p in model.named_parameters() if p.is_floating_point() and n in own), None)
    if first is not None:
        model.config.dtype = str(first).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    for path in model_files:  # after fxpp's own: the folder's generation_config.json wins
        shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    return state["step"]


def _output_keys(model: torch.nn.Module, own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The output keys as meta tensors (in save_pretrained's order; the pieces of a converted tensor
    are views of it), and the own key each is made from.

    ``save_pretrained`` reverts transformers' load-time conversions on the whole state dict;
    export does it key by key (a fused tensor is its own group), which gives the same keys for
    every conversion made of one tensor. Where it does not (a conversion that needs several
    tensors at once), the model's own keys are written: transformers loads those as they are.
    """
    whole = revert_weight_conversion(model, dict(own))
    source: dict[str, str] = {}
    shapes: dict[str, tuple] = {}
    for key, tensor in own.items():
        for name, out in revert_weight_conversion(model, {key: tensor}).items():
            source[name], shapes[name] = key, (tuple(out.shape), out.dtype)
    if shapes != {name: (tuple(t.shape), t.dtype) for name, t in whole.items()}:
        return dict(own), {k: k for k in own}
    return whole, source


class _Pieces:
    """``write_safetensors``'s pieces of the output keys: call :meth:`file` before each file.

    A key that is an own key, unconverted, is read in row chunks into the reader's scratch
    buffer 0 and cast into buffer 1 (each piece is written before the next is read). The
    output keys made from one converted tensor are cut from it, read whole once and kept
    until the last of them in this file is written.
    """

    def __init__(self, model, reader: SaveReader, saved: dict[str, SavedTensor], own: dict[str, torch.Tensor],
                 source: dict[str, str]):
        self.model, self.reader, self.saved, self.own, self.source = model, reader, saved, own, source
        self.left: Counter = Counter()
        self.converted: dict[str, dict[str, torch.Tensor]] = {}

    def file(self, keys: list[str]) -> _Pieces:
        self.left, self.converted = Counter(self.source[k] for k in keys), {}
        return self

    def __call__(self, name: str) -> Iterator[torch.Tensor]:
        key = self.source[name]
        tensor, dtype = self.saved[key], self.own[key].dtype
        if name == key:
            for start, stop in row_chunks(tensor):
                chunk = self.reader.rows(tensor, start, stop, slot=0)
                if dtype != chunk.dtype:
                    chunk = self.reader.scratch(1, dtype, tuple(chunk.shape)).copy_(chunk)
                yield chunk
            return
        if key not in self.converted:
            whole = self.reader.rows(tensor, 0, tensor.rows).to(dtype)
            self.converted[key] = revert_weight_conversion(self.model, {key: whole})
        yield self.converted[key][name]
        self.left[key] -= 1
        if not self.left[key]:
            del self.converted[key]


def saved_model_files(save_dir: str) -> list[str]:
    """The paths of the model folder's files a save holds: those its ``model_files.json`` lists (a
    save made before that file: the tokenizer files of ``step_files.TOKENIZER_FILES`` it has).

    Raises:
        CheckpointError: ``model_files.json`` is no list of names, or names a file that is not a
            regular file inside ``save_dir``.
    """
    listing = os.path.join(save_dir, MODEL_FILES)
    if not os.path.isfile(listing):
        return [os.path.join(save_dir, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(save_dir, n))]
    try:
        with open(listing) as f:
            names = json.load(f)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("not a list of file names")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{listing}: cannot read the list of model files ({e})") from e
    return [resolve_inside(save_dir, name, listing) for name in names]


_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")


def _remove_stale_weights(out_dir: str, names: set[str]) -> None:
    """An earlier export's weight files that this one does not rewrite (``save_pretrained`` removes
    its stale shards too): a leftover index or shard would be loaded in place of the new weights."""
    keep = names | ({"model.safetensors.index.json"} if len(names) > 1 else set())
    for name in os.listdir(out_dir):
        if _WEIGHT_FILE.match(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def export_adapter(state: dict, tensors: dict[str, torch.Tensor], out_dir: str) -> None:
    """A LoRA run's adapters as a PEFT adapter folder (``PeftModel.from_pretrained(base, out_dir)``).

    The stage tensors carry PEFT's module names (``...q_proj.lora_A.default.weight``); an
    adapter file names them without the adapter (``...q_proj.lora_A.weight``), as
    ``peft.get_peft_model_state_dict`` writes them. The target modules are the ones the
    saved adapters sit on.
    """
    from peft import LoraConfig  # optional extra: only a LoRA run's export needs it

    settings = state["settings"]
    adapter = {k.replace(".default.", "."): v.contiguous() for k, v in tensors.items() if ".lora_" in k}
    if not adapter:
        raise CheckpointError(f"the save of step {state['step']} holds no LoRA adapter tensors (lora_A / lora_B)")
    targets = sorted({k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in adapter if ".lora_A" in k})
    kwargs = {"lora_alpha": settings["lora_alpha"]} if settings.get("lora_alpha") is not None else {}
    config = LoraConfig(r=settings["lora_rank"], target_modules=targets, task_type="CAUSAL_LM", **kwargs)
    config.base_model_name_or_path = settings["model"]
    os.makedirs(out_dir, exist_ok=True)
    save_file(adapter, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
