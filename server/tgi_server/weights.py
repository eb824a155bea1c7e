"""Checkpoint readers: tensors, or one rank's slice of them, by their Hugging Face names.

Layers load themselves from a `WeightSource`, so they never see file formats; a safetensors
directory is read lazily (each rank reads only its slice), a GGUF file tensor by tensor.
"""

import logging
import os
import time
from glob import glob
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from tgi_server.gguf_file import metadata_dir, read_tensor_index

log = logging.getLogger(__name__)


class WeightShapeError(ValueError):
    """A checkpoint tensor whose shape is not the one the model's config implies."""


class WeightSource(Protocol):
    """Named checkpoint tensors, cast to the model dtype. `shape` is the whole tensor's shape as the
    model's config implies it: a tensor of another shape raises WeightShapeError naming it (a config
    that disagrees with its weights fails at load, not at the first request)."""

    # how many tensors the checkpoint holds (loading progress is counted against it)
    num_tensors: int

    def get(self, name: str, shape: tuple[int, ...], keep_dtype: bool = False) -> torch.Tensor:
        """The whole tensor `name`; KeyError if the checkpoint lacks it. `keep_dtype`: as stored, not cast
        (quantized values and their scales)."""
        ...

    def get_range(
        self, name: str, dim: int, start: int, stop: int, shape: tuple[int, ...], keep_dtype: bool = False
    ) -> torch.Tensor:
        """Elements [start, stop) of `name` along `dim`, read without the rest where the format allows."""
        ...

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of `name`, None if the checkpoint lacks it."""
        ...


def _check_shape(name: str, actual, expected: tuple[int, ...]) -> None:
    if tuple(actual) != tuple(expected):
        raise WeightShapeError(f"tensor {name!r} has shape {list(actual)}, but the model's config implies {list(expected)}")


def load_config(model_path: str) -> PretrainedConfig:
    """The HF config of a model directory (config.json) or of a `.gguf` file (its metadata)."""
    if model_path.endswith(".gguf"):  # as `prepare` exported it, under the launcher's hub cache
        return AutoConfig.from_pretrained(metadata_dir(Path(model_path), os.environ.get("HUGGINGFACE_HUB_CACHE")))
    return AutoConfig.from_pretrained(model_path)


def open_weights(model_path: str, config: PretrainedConfig, dtype: torch.dtype) -> WeightSource:
    """The weight source for a model directory of *.safetensors, or for a `.gguf` file."""
    if model_path.endswith(".gguf"):
        return GGUFWeights(model_path, config, dtype)
    return SafetensorsWeights(model_path, dtype)


class LoadProgress:
    """A weight source that logs how far loading is: a line at every tenth of the checkpoint's tensors
    read (a progress bar that reads the same in plain and JSON logs), and `done()` the total."""

    def __init__(self, source: WeightSource, label: str = "loading weights"):
        self.source, self.num_tensors, self.label = source, source.num_tensors, label
        self.read: set[str] = set()
        self.started = time.monotonic()
        self._next_tenth = 1

    def _count(self, name: str) -> None:
        self.read.add(name)
        if self.num_tensors and len(self.read) * 10 >= self._next_tenth * self.num_tensors:
            self._next_tenth = len(self.read) * 10 // self.num_tensors + 1
            log.info("%s: %3d%% (%d of %d tensors, %.1f s)", self.label, 100 * len(self.read) // self.num_tensors,
                     len(self.read), self.num_tensors, time.monotonic() - self.started)

    def get(self, name: str, shape: tuple[int, ...], keep_dtype: bool = False) -> torch.Tensor:
        tensor = self.source.get(name, shape, keep_dtype)
        self._count(name)
        return tensor

    def get_range(
        self, name: str, dim: int, start: int, stop: int, shape: tuple[int, ...], keep_dtype: bool = False
    ) -> torch.Tensor:
        tensor = self.source.get_range(name, dim, start, stop, shape, keep_dtype)
        self._count(name)
        return tensor

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self.source.shape(name)

    def done(self) -> None:
        log.info("%s: done, %d tensors in %.1f s", self.label, len(self.read), time.monotonic() - self.started)


class UnsetWeights:
    """Every tensor a model asks for, of the shape it asks for, its values unset (`--load-format
    dummy`): the model's own loading path runs, so whatever a layer learns from it (the checkpoint
    names its LoRA adapters address) is as with real weights; the values are filled afterwards."""

    num_tensors = 0  # no checkpoint behind it

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device

    def get(self, name: str, shape: tuple[int, ...], keep_dtype: bool = False) -> torch.Tensor:
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def get_range(
        self, name: str, dim: int, start: int, stop: int, shape: tuple[int, ...], keep_dtype: bool = False
    ) -> torch.Tensor:
        return self.get(name, (*shape[:dim], stop - start, *shape[dim + 1 :]))

    def shape(self, name: str) -> tuple[int, ...] | None:
        return None


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class SafetensorsWeights:
    """All *.safetensors files of a directory, routed by tensor name; slices are read without the rest."""

    def __init__(self, directory: str, dtype: torch.dtype):
        self.directory = directory
        self.dtype = dtype
        self.name_to_file = _route_tensor_names(directory)
        self.num_tensors = len(self.name_to_file)
        self._file_to_handle = {}

    def get(self, name: str, shape: tuple[int, ...], keep_dtype: bool = False) -> torch.Tensor:
        _check_shape(name, self._handle(name).get_slice(name).get_shape(), shape)
        tensor = self._handle(name).get_tensor(name)
        return tensor if keep_dtype else _cast(tensor, self.dtype)

    def get_range(
        self, name: str, dim: int, start: int, stop: int, shape: tuple[int, ...], keep_dtype: bool = False
    ) -> torch.Tensor:
        tensor_slice = self._handle(name).get_slice(name)
        _check_shape(name, tensor_slice.get_shape(), shape)
        index = (slice(None),) * dim + (slice(start, stop),)
        return tensor_slice[index] if keep_dtype else _cast(tensor_slice[index], self.dtype)

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(self._handle(name).get_slice(name).get_shape()) if name in self.name_to_file else None

    def _handle(self, name: str):
        path = self.name_to_file.get(name)
        if path is None:
            raise KeyError(
                f"tensor {name!r} is not in any of the {len(set(self.name_to_file.values()))} "
                f"safetensors files of {self.directory}"
            )
        if path not in self._file_to_handle:
            self._file_to_handle[path] = safe_open(path, framework="pt")
        return self._file_to_handle[path]


def _route_tensor_names(directory: str) -> dict[str, str]:
    """Map every tensor name to the file holding it; a name in two files is an error."""
    paths = sorted(glob(os.path.join(directory, "*.safetensors")))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    name_to_file = {}
    for path in paths:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if name in name_to_file:
                    raise ValueError(f"tensor {name!r} is in both {name_to_file[name]} and {path}")
                name_to_file[name] = path
    return name_to_file


class GGUFWeights:
    """A GGUF file's tensors under HF names, each dequantized by gguf-py when a layer reads it.

    Names map through gguf-py's tensor-name table of the file's architecture, and each tensor goes
    through transformers' fix-up for that architecture (llama.cpp permutes llama's q/k rows and
    stores Gemma's norms plus one). An architecture whose fix-up splits or merges tensors (MoE
    experts) is dequantized whole by transformers' own loader instead.
    """

    def __init__(self, path: str, config: PretrainedConfig, dtype: torch.dtype):
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path, self.dtype = path, dtype
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        architecture, self.tensors = read_tensor_index(self.data)
        self.num_tensors = len(self.tensors)
        processor_cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        self.whole: dict[str, torch.Tensor] | None = None
        if processor_cls.__name__ not in _PER_TENSOR_PROCESSORS:
            self.whole = _load_whole_gguf(path, config, dtype)
            return
        self.processor = processor_cls(config=config.to_dict())
        text_config = config.get_text_config()
        arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == architecture)
        self.name_map = get_tensor_name_map(arch, text_config.num_hidden_layers)

    def _info(self, name: str):
        gguf_name = self.name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        return self.tensors.get(gguf_name) if gguf_name is not None else None

    def get(self, name: str, shape: tuple[int, ...], keep_dtype: bool = False) -> torch.Tensor:
        from gguf import dequantize
        from gguf.quants import quant_shape_to_byte_shape

        if self.whole is not None:
            tensor = self.whole.get(name)
        else:
            info = self._info(name)
            if info is not None:
                byte_shape = quant_shape_to_byte_shape(info.shape, info.qtype)
                raw = self.data[info.offset:info.offset + int(np.prod(byte_shape))].reshape(byte_shape)
                values = self.processor.process(weights=dequantize(raw, info.qtype), name=info.name).weights
                tensor = torch.from_numpy(np.array(values, dtype=np.float32)).to(self.dtype)
            else:
                tensor = None
        if tensor is None:
            raise KeyError(f"tensor {name!r} is not in GGUF file {self.path}")
        _check_shape(name, tensor.shape, shape)
        return tensor

    def get_range(
        self, name: str, dim: int, start: int, stop: int, shape: tuple[int, ...], keep_dtype: bool = False
    ) -> torch.Tensor:
        return self.get(name, shape).narrow(dim, start, stop - start)

    def shape(self, name: str) -> tuple[int, ...] | None:
        if self.whole is not None:
            return tuple(self.whole[name].shape) if name in self.whole else None
        info = self._info(name)
        return info.shape if info is not None else None


# transformers' GGUF fix-ups that map one tensor to one tensor of the same name.
_PER_TENSOR_PROCESSORS = {"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor"}


def _load_whole_gguf(path: str, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of `path`, dequantized at once by transformers (which maps names through a
    weightless model of `config`)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton, torch_dtype=dtype)["tensors"]
