"""Models larger than memory, scored one layer at a time: the weights stay in their safetensors files.

:func:`streamed_model` builds a model's modules on the ``meta`` device (shapes, no storage) and attaches a
:class:`WeightSource` that reads each parameter from the checkpoint's files (memory-mapped, one file or a sharded
``model.safetensors.index.json``). Calibration that runs layer by layer
(:func:`structprune.methods.channel_stats.layer_by_layer`) loads each module for its turn and drops it after, so
the process holds one layer and the activations (and, while the inputs are embedded, the rows of the embedding
table they use), never the whole model. The forward-only methods
(``flap``, ``expert``, ``block_influence``) score such a model, and
:func:`structprune.compaction.compact_to_folder` cuts it into its compact folder a tensor at a time.

Both structprune folders (:func:`structprune.compaction.save`) and Hugging Face folders of the supported
architectures stream; a Hugging Face checkpoint's parameter names come from the adapter's own mapping, read off a
``meta`` instance of the Hugging Face model.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from structprune.modeling_structprune import SECTION, StructprunePreTrainedModel

INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""safetensors' names of the float types :meth:`WeightSource.rows` reads."""


class WeightSource:
    """structprune parameter name -> its tensor in a checkpoint folder's safetensors files, read on demand."""

    def __init__(self, folder: str | os.PathLike, names: Mapping[str, str] | None = None):
        """``names``: structprune name -> the checkpoint's key (``None``: the same names, a structprune folder)."""
        self.folder, self.names = Path(folder), dict(names) if names is not None else None
        index = self.folder / INDEX_FILE
        if index.is_file():
            self.files = {key: self.folder / file for key, file in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with self._reading(), safe_open(str(self.folder / SINGLE_FILE), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), self.folder / SINGLE_FILE)
        else:
            raise FileNotFoundError(f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}: only safetensors "
                                    "checkpoints stream; save the model with safetensors")

    def __contains__(self, name: str) -> bool:
        key = name if self.names is None else self.names.get(name)
        return key is not None and key in self.files

    def key(self, name: str) -> str:
        key = name if self.names is None else self.names.get(name)
        if name not in self:
            raise KeyError(f"{self.folder} has no weight for {name!r} (looked for {key!r}); the checkpoint does not "
                           "match its config")
        return key

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except (SafetensorError, OSError) as err:
            raise OSError(f"cannot read {self.folder}'s weights ({err}); the file is corrupt or truncated") from err

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of ``names``, each file opened once."""
        keys = {name: self.key(name) for name in names}
        out = {}
        with self._reading(), ExitStack() as stack:
            opened = {}
            for name, key in keys.items():
                path = self.files[key]
                if path not in opened:
                    opened[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                out[name] = opened[path].get_tensor(key)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors([name])[name]

    __getitem__ = tensor

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (sorted, unique) of the matrix ``name``, read as contiguous runs straight into the result.

        Plain reads, not the memory map: a row shorter than a page would map the pages around it, and mapped pages
        count as the process's memory until the file is closed (for a vocabulary's table, many times the rows)."""
        key, ids = self.key(name), ids.tolist()
        path = self.files[key]
        with self._reading(), path.open("rb", buffering=0) as f:
            (size,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(size))[key]
            if entry["dtype"] not in DTYPES or len(entry["shape"]) != 2:
                raise OSError(f"{key} is a {entry['dtype']} tensor of shape {entry['shape']}, not a float matrix")
            out = torch.empty(len(ids), entry["shape"][1], dtype=DTYPES[entry["dtype"]])
            buffer = memoryview(out.view(torch.uint8).numpy().reshape(-1))
            row, data, start = out.shape[1] * out.element_size(), 8 + size + entry["data_offsets"][0], 0
            for j in range(1, len(ids) + 1):
                if j == len(ids) or ids[j] != ids[j - 1] + 1:
                    f.seek(data + ids[start] * row)
                    _read_exactly(f, buffer[start * row:j * row])
                    start = j
        return out


def _read_exactly(f, buffer: memoryview) -> None:
    while buffer.nbytes:
        n = f.readinto(buffer)
        if not n:
            raise OSError("the file ends before the tensor does")
        buffer = buffer[n:]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries lack it


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold in the heap, and the small tensors a layer's forward
    frees are interleaved there with ones that live on, so without this the resident memory of a layer-by-layer
    pass creeps and varies from run to run by tens of MB."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def source_of(model: nn.Module) -> WeightSource | None:
    """The :class:`WeightSource` a streamed model reads from (``None``: its weights are in memory)."""
    return getattr(model, "weight_source", None)


@contextmanager
def resident(model: StructprunePreTrainedModel, prefix: str, module: nn.Module,
             device: torch.device) -> Iterator[nn.Module]:
    """``module`` (named ``prefix`` in ``model``) on ``device`` for the block: loaded from a streamed model's files
    and dropped after, or moved there and back."""
    source = source_of(model)
    if source is None:
        home = next(module.parameters(), torch.empty(0)).device
        module.to(device)
        try:
            yield module
        finally:
            module.to(home)
        return
    dtypes = {name: p.dtype for name, p in module.named_parameters()}
    state = source.tensors([f"{prefix}.{name}" for name in dtypes])
    # the file's tensors become the parameters (no second copy), in the skeleton's dtype whatever the file's;
    # structprune's modules hold parameters only, so there are no buffers to restore
    module.load_state_dict({name: state.pop(f"{prefix}.{name}").to(device, dtype) for name, dtype in dtypes.items()},
                           assign=True)
    try:
        yield module
    finally:
        module.to("meta")


@contextmanager
def embedded(model: StructprunePreTrainedModel, ids: torch.Tensor,
             device: torch.device) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The embeddings on ``device`` for the token ids among ``ids``, and the map from token ids to the ids the loaded
    embeddings answer. A streamed decoder loads only the rows of its word table that ``ids`` use (a large vocabulary's
    table can outweigh a layer); otherwise the whole module comes (:func:`resident`) and the map is the identity."""
    source = source_of(model)
    if source is None or model.spec["family"] != "llama":  # BERT's positions read the ids themselves
        with resident(model, "embeddings", model.embeddings, device):
            yield lambda x: x
        return
    used, word = ids.unique(), model.embeddings.word
    skeleton = word.weight
    word.weight = nn.Parameter(source.rows("embeddings.word.weight", used).to(device, skeleton.dtype),
                               requires_grad=False)
    try:
        yield lambda x: torch.searchsorted(used.to(x.device), x)
    finally:
        word.weight = skeleton


def _hf_skeleton(folder: Path, causal: bool) -> tuple[StructprunePreTrainedModel, dict[str, str]]:
    """structprune's model on ``meta`` for a Hugging Face folder, and the checkpoint key of each parameter."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from structprune.arch import adapter_for, from_hf

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    with torch.device("meta"):
        hf = auto.from_config(config, trust_remote_code=False)
    rotary = getattr(getattr(hf, "model", None), "rotary_emb", None)
    if rotary is not None:  # its inverse frequencies are computed, not stored: the spec reads them
        hf.model.rotary_emb = type(rotary)(config=config)
    theirs = {id(p): name for name, p in hf.named_parameters()}
    names = {ours: theirs[id(t)] for ours, t in adapter_for(config).state_dict(hf).items()}
    with torch.device("meta"):
        model = from_hf(hf)
    return model, names


def streamed_model(folder: str | os.PathLike, causal: bool = True) -> StructprunePreTrainedModel:
    """The full-size model of a checkpoint folder with every weight left in its files (see the module doc).

    Raises:
        ValueError: the folder holds no config or no safetensors weights, or an architecture structprune lacks.
    """
    from structprune.compaction import read_config
    from structprune.modeling_structprune import model_class

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder} has no config.json: streaming reads a local model folder (a structprune folder or "
                         "a Hugging Face one with safetensors weights)")
    raw = json.loads(config_path.read_text())
    if SECTION in raw:
        config = read_config(folder, in_memory=False)
        with torch.device("meta"):
            model = model_class(config)(config)
        names = None
    else:
        model, names = _hf_skeleton(folder, causal)
    try:
        model.weight_source = WeightSource(folder, names)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    missing = [name for name, _ in model.named_parameters() if name not in model.weight_source]
    if missing:
        raise ValueError(f"{folder}'s safetensors lack {len(missing)} weights its config needs (e.g. {missing[:3]}); "
                         "the checkpoint is incomplete")
    return model.eval()
