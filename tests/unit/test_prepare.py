"""`tgi_server prepare`: PyTorch .bin checkpoints become safetensors once, and hub ids resolve through a
local fake of the Hub's HTTP API or a hand-made offline cache; never the network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tgi_server import prepare as prepare_module
from tgi_server.prepare import PrepareError, ensure_safetensors, prepare
from tgi_server.weights import SafetensorsWeights

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)


def save_bin_checkpoint(directory: Path, tie_word_embeddings: bool = False, num_files: int = 1) -> dict:
    """A tiny random Llama saved as TGI-era PyTorch weights (transformers 5 only writes safetensors, so
    the .bin files are written here); returns its state dict."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie_word_embeddings)
    config.architectures = ["LlamaForCausalLM"]
    state_dict = LlamaForCausalLM(config).state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    (directory / "tokenizer.json").write_text("{}")  # the launcher refuses a model without one
    if num_files == 1:
        torch.save(state_dict, directory / "pytorch_model.bin")
        return state_dict
    names = sorted(state_dict)
    weight_map = {}
    for index in range(num_files):
        file = f"pytorch_model-{index + 1:05d}-of-{num_files:05d}.bin"
        part = {name: state_dict[name] for name in names[index::num_files]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state_dict


def read_all(directory: Path) -> dict:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


# ---------------------------------------------------------------- .bin -> safetensors


def test_bin_checkpoint_is_converted_next_to_it_and_loads_the_same_tensors(tmp_path):
    state_dict = save_bin_checkpoint(tmp_path / "m")
    prepared = prepare(str(tmp_path / "m"))
    assert prepared.model_path == prepared.tokenizer_path == str(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    converted = read_all(tmp_path / "m")
    assert converted.keys() == state_dict.keys()
    assert all(torch.equal(converted[name], tensor) for name, tensor in state_dict.items())
    weights = SafetensorsWeights(prepared.model_path, torch.float32)  # what a shard reads
    expected = state_dict["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(weights.get("model.layers.1.mlp.up_proj.weight", tuple(expected.shape)), expected)


def test_second_prepare_does_not_convert_again(tmp_path, monkeypatch):
    save_bin_checkpoint(tmp_path / "m")
    prepare(str(tmp_path / "m"))
    written = (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns

    def fail(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(prepare_module, "convert_file", fail)
    prepare(str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").stat().st_mtime_ns == written


def test_sharded_bin_checkpoint_converts_each_file_and_its_index(tmp_path):
    state_dict = save_bin_checkpoint(tmp_path / "m", num_files=2)
    prepare(str(tmp_path / "m"))
    names = sorted(path.name for path in (tmp_path / "m").glob("*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names) and index["weight_map"].keys() == state_dict.keys()
    converted = read_all(tmp_path / "m")
    assert all(torch.equal(converted[name], tensor) for name, tensor in state_dict.items())


def test_tied_embeddings_are_saved_once_under_the_embedding_name(tmp_path):
    state_dict = save_bin_checkpoint(tmp_path / "m", tie_word_embeddings=True)
    assert state_dict["lm_head.weight"].data_ptr() == state_dict["model.embed_tokens.weight"].data_ptr()
    prepare(str(tmp_path / "m"))
    converted = read_all(tmp_path / "m")
    assert "lm_head.weight" not in converted  # the model ties it back from config.tie_word_embeddings
    assert converted.keys() == state_dict.keys() - {"lm_head.weight"}
    assert torch.equal(converted["model.embed_tokens.weight"], state_dict["lm_head.weight"])
    with safe_open(tmp_path / "m" / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "lm_head.weight": "model.embed_tokens.weight"}


def test_distinct_tensors_sharing_one_storage_are_saved_separately(tmp_path):
    fused = torch.arange(12.0).reshape(4, 3)
    torch.save({"a": fused[:2], "b": fused[2:]}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    ensure_safetensors(tmp_path)
    converted = read_all(tmp_path)
    assert torch.equal(converted["a"], fused[:2]) and torch.equal(converted["b"], fused[2:])


def test_read_only_directory_is_converted_into_the_cache_with_its_other_files(tmp_path, monkeypatch):
    state_dict = save_bin_checkpoint(tmp_path / "ro")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    prepared = prepare(str(tmp_path / "ro"), cache_dir=str(tmp_path / "cache"))
    model_path = Path(prepared.model_path)
    assert model_path.parent == tmp_path / "cache" / "tgi-converted"
    assert prepared.tokenizer_path == str(tmp_path / "ro")
    assert not list((tmp_path / "ro").glob("*.safetensors"))
    assert (model_path / "config.json").resolve() == (tmp_path / "ro" / "config.json").resolve()
    assert read_all(model_path).keys() == state_dict.keys()
    assert prepare(str(tmp_path / "ro"), cache_dir=str(tmp_path / "cache")).model_path == str(model_path)


def test_safetensors_directory_with_bin_files_too_is_left_as_is(tmp_path, monkeypatch):
    save_bin_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "other.safetensors").write_bytes(b"")
    monkeypatch.setattr(prepare_module, "convert_file", lambda *args: pytest.fail("converted"))
    assert ensure_safetensors(tmp_path / "m") == tmp_path / "m"


def test_directory_without_config_is_a_prepare_error(tmp_path):
    with pytest.raises(PrepareError, match="has no config.json"):
        prepare(str(tmp_path))


# ---------------------------------------------------------------- the Hub, faked on localhost


class FakeHub:
    """The few Hub endpoints snapshot_download uses: repo info, tree listing and file resolution.

    `repos[repo_id][revision] = (commit sha, {filename: bytes})`; a commit sha is a revision too.
    """

    def __init__(self):
        self.repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.handle(self, send_body=True)

            def do_HEAD(self):
                hub.handle(self, send_body=False)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        sha = hashlib.sha1(repr((repo_id, revision, sorted(files.items()))).encode()).hexdigest()
        self.repos.setdefault(repo_id, {})[revision] = (sha, files)
        self.repos[repo_id][sha] = (sha, files)
        return sha

    def fetched(self) -> list[str]:
        """The files downloaded (GET on a resolve URL), by name."""
        return sorted({path.rsplit("/", 1)[1] for path in self.requests if path.startswith("GET ") and "/resolve/" in path})

    def handle(self, request: BaseHTTPRequestHandler, send_body: bool) -> None:
        # /api/models/{org}/{name}[/revision/{rev} | /tree/{rev}] or /{org}/{name}/resolve/{rev}/{file}
        raw = urllib.parse.urlsplit(request.path).path.strip("/").split("/")
        segments = [urllib.parse.unquote(segment) for segment in raw]
        self.requests.append(f"{request.command} /{'/'.join(segments)}")
        if segments[:2] == ["api", "models"]:
            segments = segments[2:]
        repo_id = "/".join(segments[:2])
        kind = segments[2] if len(segments) > 2 else "revision"
        revision = segments[3] if len(segments) > 3 else "main"
        filename = "/".join(segments[4:])
        revisions = self.repos.get(repo_id)
        if revisions is None:
            return self.reply(request, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if revision not in revisions:
            return self.reply(request, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
        sha, files = revisions[revision]
        if kind == "revision":
            return self.reply(request, 200, {"id": repo_id, "sha": sha, "siblings": [{"rfilename": f} for f in files]})
        if kind == "tree":
            tree = [{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for f, data in files.items()]
            return self.reply(request, 200, tree)
        if kind == "resolve" and filename in files:
            data = files[filename]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self.reply(request, 200, data if send_body else b"", headers, len(data))
        self.reply(request, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

    @staticmethod
    def reply(request, status: int, body, headers: dict | None = None, length: int | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.send_response(status)
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(length if length is not None else len(data)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)


@pytest.fixture
def hub():
    hub = FakeHub()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}


def run_prepare(env: dict, model_id: str, *args: str) -> subprocess.CompletedProcess:
    """`tgi_server prepare` as the launcher runs it (a process of its own, so HF_* env vars apply)."""
    return subprocess.run([sys.executable, "-m", "tgi_server", "prepare", model_id, *args],
                          env=env, capture_output=True, text=True, timeout=120)


def prepared_paths(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def checkpoint_files(directory: Path, **kwargs) -> dict[str, bytes]:
    save_bin_checkpoint(directory, **kwargs)
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def test_hub_model_is_fetched_into_the_cache_dir_with_safetensors_only(tmp_path, hub):
    files = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}', "tokenizer.json": b"{}",
             "model.safetensors": b"weights", "pytorch_model.bin": b"old weights", "training_args.bin": b"x"}
    sha = hub.add("org/tiny", files)
    cache = tmp_path / "cache"
    paths = prepared_paths(run_prepare(hub_env(tmp_path, hub.url), "org/tiny", "--cache-dir", str(cache)))
    assert paths["model_path"] == paths["tokenizer_path"] == str(cache / "models--org--tiny" / "snapshots" / sha)
    assert hub.fetched() == ["config.json", "model.safetensors", "tokenizer.json"]


def test_hub_revision_is_honoured(tmp_path, hub):
    hub.add("org/tiny", {"config.json": b'{"v": 1}', "model.safetensors": b"1", "tokenizer.json": b"{}"})
    sha = hub.add("org/tiny", {"config.json": b'{"v": 2}', "model.safetensors": b"2", "tokenizer.json": b"{}"}, revision="v2")
    paths = prepared_paths(run_prepare(hub_env(tmp_path, hub.url), "org/tiny", "--revision", "v2"))
    assert Path(paths["model_path"]).name == sha
    assert json.loads((Path(paths["model_path"]) / "config.json").read_text()) == {"v": 2}
    refs = tmp_path / "hf_home" / "hub" / "models--org--tiny" / "refs" / "v2"
    assert refs.read_text() == sha


def test_hub_cache_dir_comes_from_huggingface_hub_cache_too(tmp_path, hub):
    hub.add("org/tiny", {"config.json": b"{}", "model.safetensors": b"1", "tokenizer.json": b"{}"})
    cache = tmp_path / "from-env"
    env = hub_env(tmp_path, hub.url, HUGGINGFACE_HUB_CACHE=str(cache))
    assert prepared_paths(run_prepare(env, "org/tiny"))["model_path"].startswith(str(cache / "models--org--tiny"))


def test_hub_repo_with_only_bin_weights_is_fetched_and_converted_once(tmp_path, hub):
    sha = hub.add("org/old", checkpoint_files(tmp_path / "src"))
    env = hub_env(tmp_path, hub.url)
    model_path = Path(prepared_paths(run_prepare(env, "org/old"))["model_path"])
    assert model_path.name == sha and "pytorch_model.bin" in hub.fetched()
    converted = model_path / "model.safetensors"
    assert read_all(model_path).keys() == torch.load(tmp_path / "src" / "pytorch_model.bin").keys()
    written = converted.stat().st_mtime_ns
    result = run_prepare(env, "org/old")
    assert prepared_paths(result)["model_path"] == str(model_path)
    assert "Converting" not in result.stdout and converted.stat().st_mtime_ns == written


def test_hf_hub_offline_uses_the_cache_without_any_request(tmp_path, hub):
    """A cache laid out by hand (refs/<revision> -> snapshots/<sha>/...), as a pre-populated volume."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "cache" / "models--org--cached" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "tokenizer.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(sha)
    env = hub_env(tmp_path, hub.url, HF_HUB_OFFLINE="1")
    paths = prepared_paths(run_prepare(env, "org/cached", "--cache-dir", str(tmp_path / "cache")))
    assert paths["model_path"] == str(snapshot)
    assert hub.requests == []


@pytest.mark.parametrize("model_id, args, extra_env, message", [
    ("org/missing", (), {}, "model org/missing not found on the Hub"),
    ("org/tiny", ("--revision", "nope"), {}, "revision nope of org/tiny not found on the Hub"),
    ("org/tiny", (), {"HF_HUB_OFFLINE": "1"}, "is not in the Hub cache"),
    ("/no/such/dir", (), {}, "/no/such/dir is neither a local directory nor a valid Hub model id"),
    ("org/mqa", ("--num-shard", "2"), {}, "num_key_value_heads is 1, fewer than the 2 shards asked for"),
    ("org/opt", ("--num-shard", "2"), {}, "OPTForCausalLM runs on the transformers fallback and transformers has no tensor-parallel plan"),
])
def test_unpreparable_model_is_one_prepare_error_line(tmp_path, hub, model_id, args, extra_env, message):
    hub.add("org/tiny", {"config.json": b"{}"})
    hub.add("org/mqa", {"config.json": b'{"num_key_value_heads": 1}', "tokenizer.json": b"{}", "model.safetensors": b""})
    hub.add("org/opt", {"config.json": b'{"architectures": ["OPTForCausalLM"], "num_attention_heads": 4}',
                         "tokenizer.json": b"{}", "model.safetensors": b""})
    result = run_prepare(hub_env(tmp_path, hub.url, **extra_env), model_id, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("PrepareError: ") and message in result.stderr


def test_launcher_reports_a_missing_model_in_one_line_without_traceback(tmp_path, hub):
    env = hub_env(tmp_path, hub.url, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "tgi_launcher", "--model-id", "org/missing"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "Could not prepare org/missing: model org/missing not found on the Hub (a private or gated model needs HF_TOKEN)"
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_hub_download_progress_is_printed_as_plain_lines_once_per_file_set(tmp_path, hub):
    """huggingface_hub's bars (files fetched, bytes written) become lines on stdout, which the launcher
    forwards; a second prepare finds everything cached and prints no byte counts."""
    weights = os.urandom(3_000_000)
    hub.add("org/tiny", {"config.json": b"{}", "tokenizer.json": b"{}", "model.safetensors": weights})
    env = hub_env(tmp_path, hub.url)
    del env["HF_HUB_DISABLE_PROGRESS_BARS"]
    result = run_prepare(env, "org/tiny")
    prepared_paths(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("Downloading org/tiny: ")]
    assert "Downloading org/tiny: 3 of 3 files done" in lines
    size = len(weights) + 4
    assert any(line.startswith(f"Downloading org/tiny: {size / 1e6:.1f} MB of {size / 1e6:.1f} MB (100%) in ")
               for line in lines), lines
    again = run_prepare(env, "org/tiny")
    assert " MB" not in again.stdout and "3 of 3 files done" in again.stdout
    silenced = run_prepare({**env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, "org/tiny")
    assert "Downloading" not in silenced.stdout


def test_launcher_json_output_carries_download_progress_as_prepare_records(tmp_path, hub):
    hub.add("org/mqa", {"config.json": b'{"num_key_value_heads": 1}', "tokenizer.json": b"{}",
                         "model.safetensors": os.urandom(100_000)})
    env = hub_env(tmp_path, hub.url, CUDA_VISIBLE_DEVICES="")
    del env["HF_HUB_DISABLE_PROGRESS_BARS"]
    result = subprocess.run([sys.executable, "-m", "tgi_launcher", "--model-id", "org/mqa", "--num-shard", "2",
                             "--json-output"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stderr.splitlines()]  # fails on any non-JSON line
    progress = [(record["target"], record["level"], record["message"]) for record in records
                if record["message"].startswith("Downloading org/mqa: ")]
    assert progress[0] == ("prepare", "INFO", "Downloading org/mqa: 3 of 3 files done")
    assert progress[1][2].startswith("Downloading org/mqa: 100.0 kB of 100.0 kB (100%) in ") and len(progress) == 2
    assert records[-1]["level"] == "ERROR" and "num_key_value_heads is 1" in records[-1]["message"]
