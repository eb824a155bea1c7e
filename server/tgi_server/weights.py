"""Checkpoint readers: tensors, or one rank's slice of them, by their Hugging Face names.

Layers load themselves from a `WeightSource`, so they never see file formats; a safetensors
directory is read lazily (each rank reads only its slice), a GGUF file is dequantized whole.
"""

import logging
import os
from glob import glob
from typing import Protocol

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint


class WeightShapeError(ValueError):
    """A checkpoint tensor whose shape is not the one the model's config implies."""


class WeightSource(Protocol):
    """Named checkpoint tensors, cast to the model dtype. `shape` is the whole tensor's shape as the
    model's config implies it: a tensor of another shape raises WeightShapeError naming it (a config
    that disagrees with its weights fails at load, not at the first request)."""

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
    if model_path.endswith(".gguf"):
        directory, filename = os.path.split(os.path.abspath(model_path))
        return AutoConfig.from_pretrained(directory, gguf_file=filename)
    return AutoConfig.from_pretrained(model_path)


def open_weights(model_path: str, config: PretrainedConfig, dtype: torch.dtype) -> WeightSource:
    """The weight source for a model directory of *.safetensors, or for a `.gguf` file."""
    if model_path.endswith(".gguf"):
        return GGUFWeights(model_path, config, dtype)
    return SafetensorsWeights(model_path, dtype)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class SafetensorsWeights:
    """All *.safetensors files of a directory, routed by tensor name; slices are read without the rest."""

    def __init__(self, directory: str, dtype: torch.dtype):
        self.directory = directory
        self.dtype = dtype
        self.name_to_file = _route_tensor_names(directory)
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
    """A GGUF file, dequantized in memory under HF names by transformers' GGUF reader.

    transformers maps GGUF names to HF ones through a model instance, so a weightless (meta
    device) HF model of the same config is built for it; it also undoes llama.cpp's q/k row
    permutation.
    """

    def __init__(self, path: str, config: PretrainedConfig, dtype: torch.dtype):
        logging.getLogger("tgi_server").info("dequantizing the tensors of %s", path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(
            path, return_tensors=True, model_to_load=skeleton, torch_dtype=dtype
        )
        self.path = path
        self.name_to_tensor = parsed["tensors"]

    def get(self, name: str, shape: tuple[int, ...], keep_dtype: bool = False) -> torch.Tensor:
        if name not in self.name_to_tensor:
            raise KeyError(f"tensor {name!r} is not in GGUF file {self.path}")
        _check_shape(name, self.name_to_tensor[name].shape, shape)
        return self.name_to_tensor[name]

    def get_range(
        self, name: str, dim: int, start: int, stop: int, shape: tuple[int, ...], keep_dtype: bool = False
    ) -> torch.Tensor:
        return self.get(name, shape).narrow(dim, start, stop - start)

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(self.name_to_tensor[name].shape) if name in self.name_to_tensor else None
