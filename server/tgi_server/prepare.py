"""Resolves a model id to local files before any shard starts (TGI's `download-weights` step).

- a local directory with `config.json` is used in place;
- a `.gguf` file (or a directory holding exactly one) is used in place for the weights, and its
  tokenizer and config are exported once to a cache directory, so the router can read a plain
  `tokenizer.json` without transformers;
- anything else is a hub id, fetched with huggingface_hub (revision, HF_TOKEN, HF_HUB_OFFLINE and the
  cache directory are honoured by huggingface_hub itself): config, tokenizer and safetensors weights,
  or the `pytorch_model*.bin` weights when the repository has no safetensors.

A directory whose only weights are `pytorch_model*.bin` files (sharded or not) gets them converted to
`model*.safetensors` once, as TGI's download step does: in the directory itself when it is writable,
else in a cache directory that links the other files. Shared tensors (tied embeddings) are saved once,
the dropped names recorded in the safetensors metadata.

Failures the user can fix (a missing model, revision or cache entry) raise `PrepareError`, whose
message is one line. Progress goes to stdout as plain lines (downloads' too: `hub_progress`);
`tgi_server prepare` prints its JSON last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tgi_server.gguf_file import metadata_dir
from tgi_server.models.architectures import IN_PROJECT_ARCHITECTURES

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
# Fetched only from a repository without safetensors weights (TGI skips training files like these too).
BIN_PATTERNS = ["pytorch_model*.bin"]
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Output layers commonly tied to the input embedding: the embedding's name is the one kept.
TIED_OUTPUT_NAMES = {"lm_head.weight"}


class PrepareError(RuntimeError):
    """A model that cannot be prepared for a reason the user can fix; the message is one line."""


@dataclass(frozen=True)
class PreparedModel:
    # What shards load: a directory with config.json and safetensors, or a .gguf file.
    model_path: str
    # A directory with tokenizer.json (and tokenizer_config.json, generation_config.json).
    tokenizer_path: str


def prepare(
    model_id: str, revision: str | None = None, cache_dir: str | None = None, num_shard: int = 1
) -> PreparedModel:
    """Local files for `model_id`; `cache_dir` is the hub cache (None: huggingface_hub's default), also
    the root for GGUF exports and conversions that cannot be written next to the model. `num_shard`
    is checked against the model's KV heads, which tensor parallelism splits whole."""
    path = Path(model_id).expanduser()
    gguf = _gguf_file(path)
    if gguf is not None:
        return PreparedModel(str(gguf), str(metadata_dir(gguf, cache_dir)))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PrepareError(f"{path} has no config.json and no .gguf file")
        directory = path
    else:
        directory = _download(model_id, revision, cache_dir)
    _check_servable(directory, num_shard)
    return PreparedModel(str(ensure_safetensors(directory, cache_dir)), str(directory))


def prepare_adapter(adapter_id: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The local directory of the PEFT LoRA adapter `adapter_id` (a directory, or a Hub repository
    fetched into the cache), with adapter_config.json and adapter_model.safetensors."""
    path = Path(adapter_id).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        from tgi_server.hub_progress import download_progress

        _report(f"Fetching adapter {adapter_id} (revision {revision or 'main'}) from the Hub or its cache")
        try:
            with download_progress(adapter_id) as progress:
                path = Path(snapshot_download(adapter_id, revision=revision, cache_dir=cache_dir, tqdm_class=progress,
                                              allow_patterns=["adapter_config.json", "adapter_model.safetensors"]))
        except (OSError, ValueError) as error:
            raise PrepareError(_hub_error_message(error, adapter_id, revision, cache_dir)) from error
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise PrepareError(f"{adapter_id}: no {name} (a PEFT LoRA adapter has adapter_config.json and "
                               "adapter_model.safetensors)")
    return str(path)


def _check_servable(directory: Path, num_shard: int) -> None:
    """What would otherwise fail only in the shards or the router, found before they start."""
    if not (directory / "tokenizer.json").exists():
        raise PrepareError(f"{directory} has no tokenizer.json (the router tokenizes with it)")
    config = json.loads((directory / "config.json").read_text())
    text_config = config.get("text_config") or config  # multimodal checkpoints nest the language model's
    num_heads = text_config.get("num_attention_heads")
    num_kv_heads = text_config.get("num_key_value_heads") or num_heads
    if isinstance(num_kv_heads, int) and not can_split_heads(num_heads, num_kv_heads, num_shard):
        raise PrepareError(
            f"{directory / 'config.json'}: num_key_value_heads is {num_kv_heads}, fewer than the {num_shard} "
            f"shards asked for and not dividing them (each shard holds whole KV heads, or a copy of one whose query "
            f"heads it shares); use --num-shard {num_kv_heads} or fewer"
        )
    architectures = config.get("architectures") or []
    if architectures and architectures[0] not in IN_PROJECT_ARCHITECTURES:  # else nothing to check (and no torch to import)
        from tgi_server.models.registry import UnsupportedModelError, check_architecture

        try:
            check_architecture(architectures[0], num_shard)
        except UnsupportedModelError as error:
            raise PrepareError(f"{directory / 'config.json'}: {error}") from None


def can_split_heads(num_heads: int | None, num_kv_heads: int, num_shard: int) -> bool:
    """Whether attention splits over `num_shard` ranks (`TPGroup.head_partition`): whole KV heads on each,
    or each KV head copied on a whole number of ranks that split its query heads evenly."""
    if num_kv_heads >= num_shard:
        return True
    return num_shard % num_kv_heads == 0 and isinstance(num_heads, int) and num_heads % num_shard == 0


def _gguf_file(path: Path) -> Path | None:
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PrepareError(f"GGUF file {path} does not exist")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        candidates = sorted(path.glob("*.gguf"))
        if len(candidates) > 1:
            raise PrepareError(f"{path} holds several .gguf files; pass one of them: {[c.name for c in candidates]}")
        return candidates[0] if candidates else None
    return None


def _download(model_id: str, revision: str | None, cache_dir: str | None) -> Path:
    """The hub snapshot with config, tokenizer and safetensors weights, or with the .bin weights when
    there are no safetensors (a second call, which only fetches what the first did not)."""
    from huggingface_hub import snapshot_download

    from tgi_server.hub_progress import download_progress

    _report(f"Fetching {model_id} (revision {revision or 'main'}) from the Hub or its cache")
    try:
        with download_progress(model_id) as progress:
            local = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir,
                                           allow_patterns=HUB_PATTERNS, tqdm_class=progress))
        if not _safetensors_files(local):
            with download_progress(model_id) as progress:
                local = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir,
                                               allow_patterns=HUB_PATTERNS + BIN_PATTERNS, tqdm_class=progress))
    except (OSError, ValueError) as error:  # what huggingface_hub raises, HTTP errors included
        raise PrepareError(_hub_error_message(error, model_id, revision, cache_dir)) from error
    return local


def _hub_error_message(error: Exception, model_id: str, revision: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    if isinstance(error, HFValidationError):
        return f"{model_id} is neither a local directory nor a valid Hub model id"
    if isinstance(error, GatedRepoError):
        return f"{model_id} is gated on the Hub: accept its conditions there and set HF_TOKEN"
    if isinstance(error, RepositoryNotFoundError):
        return f"model {model_id} not found on the Hub (a private or gated model needs HF_TOKEN)"
    if isinstance(error, RevisionNotFoundError):
        return f"revision {revision} of {model_id} not found on the Hub"
    if isinstance(error, LocalEntryNotFoundError):
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return (f"{model_id} (revision {revision or 'main'}) is not in the Hub cache "
                f"{cache_dir or constants.HF_HUB_CACHE} and {reason}")
    lines = str(error).strip().splitlines()
    return f"could not fetch {model_id} from the Hub: {type(error).__name__}: {lines[0] if lines else ''}"


def ensure_safetensors(directory: Path, cache_dir: str | None = None) -> Path:
    """`directory` itself unless its only weights are `pytorch_model*.bin`; then the directory holding
    their conversion to safetensors, done once: `directory` when writable, else under `cache_dir`."""
    bin_files = sorted(directory.glob(BIN_PATTERNS[0]))
    existing = set(_safetensors_files(directory))
    if not bin_files or not existing <= {directory / _safetensors_name(path) for path in bin_files}:
        return directory  # no .bin weights, or safetensors weights of its own
    target = directory if os.access(directory, os.W_OK) else _conversion_dir(directory, bin_files, cache_dir)
    missing = [path for path in bin_files if not (target / _safetensors_name(path)).exists()]
    if missing:
        _report(f"Converting {len(missing)} PyTorch .bin weight file(s) of {directory} to safetensors in {target}")
        discard_names = TIED_OUTPUT_NAMES | _tied_weight_names(directory)
        for path in missing:
            convert_file(path, target / _safetensors_name(path), discard_names)
    if (directory / BIN_INDEX).exists() and not (target / SAFETENSORS_INDEX).exists():
        _convert_index(directory / BIN_INDEX, target / SAFETENSORS_INDEX)
    return target


def convert_file(source: Path, dest: Path, discard_names: set[str]) -> None:
    """Writes the tensors of a PyTorch checkpoint as safetensors (atomically) and checks that they read
    back equal. A name that views the same data as another is dropped, recorded in the metadata as
    `{alias: kept name}`."""
    import torch
    from safetensors.torch import load_file, save_file

    state_dict = torch.load(source, map_location="cpu", weights_only=True)
    if "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    metadata = {"format": "pt"}
    for alias, kept in _aliases(state_dict, discard_names).items():
        del state_dict[alias]
        metadata[alias] = kept
    tensors = _unshared(state_dict)
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    save_file(tensors, str(staging), metadata=metadata)
    reloaded = load_file(str(staging))
    for name, tensor in tensors.items():
        if not torch.equal(tensor, reloaded[name]):
            staging.unlink()
            raise PrepareError(f"converting {source} to safetensors changed tensor {name}")
    os.replace(staging, dest)


def _aliases(state_dict: dict, discard_names: set[str]) -> dict[str, str]:
    """{alias: kept name} for names that view exactly the same data as another name. The kept name
    is the first in sorted order, preferring names not in `discard_names` (e.g. a tied lm_head)."""
    groups = defaultdict(list)
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype,
               tuple(tensor.shape), tuple(tensor.stride()))
        groups[key].append(name)
    aliases = {}
    for names in groups.values():
        kept = sorted(names, key=lambda name: (name in discard_names, name))[0]
        aliases.update({name: kept for name in names if name != kept})
    return aliases


def _unshared(state_dict: dict) -> dict:
    """Contiguous tensors, cloning those that still share storage (safetensors refuses shared memory)."""
    storage_to_names = defaultdict(list)
    for name, tensor in state_dict.items():
        storage_to_names[(tensor.device, tensor.untyped_storage().data_ptr())].append(name)
    shared = {name for names in storage_to_names.values() if len(names) > 1 for name in names}
    return {name: tensor.clone().contiguous() if name in shared else tensor.contiguous()
            for name, tensor in state_dict.items()}


def _convert_index(source: Path, dest: Path) -> None:
    """`pytorch_model.bin.index.json` renamed for the converted files, without the dropped aliases."""
    from safetensors import safe_open

    removed = set()
    for path in _safetensors_files(dest.parent):
        with safe_open(str(path), framework="pt") as handle:
            removed |= set(handle.metadata() or {}) - {"format"}
    index = json.loads(source.read_text())
    index["weight_map"] = {
        name: _safetensors_name(Path(file)) for name, file in index["weight_map"].items() if name not in removed
    }
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(index, indent=2))
    os.replace(staging, dest)


def _conversion_dir(directory: Path, bin_files: list[Path], cache_dir: str | None) -> Path:
    """A writable directory for the conversion of a read-only `directory`, keyed by its path and
    weights, that links every other file of `directory` (config, tokenizer)."""
    from huggingface_hub import constants

    fingerprint = [str(directory.resolve())]
    fingerprint += [f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in bin_files]
    key = hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()[:16]
    target = Path(cache_dir or constants.HF_HOME) / "tgi-converted" / f"{directory.name}-{key}"
    target.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        link = target / path.name
        if path.is_file() and path.suffix != ".bin" and path.name != BIN_INDEX and not link.exists():
            link.symlink_to(path.resolve())
    return target


def _tied_weight_names(directory: Path) -> set[str]:
    """The tensor names transformers ties to another for this architecture (e.g. lm_head.weight)."""
    try:
        architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
        import transformers

        tied = getattr(getattr(transformers, architectures[0], None), "_tied_weights_keys", None) or ()
    except (OSError, ValueError, IndexError, ImportError):
        return set()
    return {name for name in tied if isinstance(name, str)}


def _safetensors_name(bin_file: Path) -> str:
    """`pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`, as TGI names them."""
    return bin_file.stem.removeprefix("pytorch_") + ".safetensors"


def _safetensors_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _report(message: str) -> None:
    print(message, flush=True)
