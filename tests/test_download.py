"""scripts/download.py against a pre-filled Hugging Face Hub cache in a temp dir (no network).

The cache mimics huggingface_hub's layout: <HF_HUB_CACHE>/models--<org>--<name>/{blobs/<sha256>,
snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main, [trees/<commit>.json]}. Gated-repo and
no-network errors are produced by a local fake Hub (HF_ENDPOINT=http://127.0.0.1:<port>) and by a
closed local port.
"""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from litmodel.checkpoint import load_model
from litmodel.config_registry import configs
from litmodel.hub import weight_patterns
from tests.helpers import CLI_DRIVER

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def write_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1", "bos_token": None}))


def fill_cache(hub_cache: Path, repo_id: str, files: dict[str, bytes], tree_extra: dict[str, int] | None = None):
    """Put ``files`` into the Hub cache as a snapshot of ``repo_id`` at COMMIT (refs/main -> COMMIT).

    With ``tree_extra``, also write the tree listing huggingface_hub caches (trees/<commit>.json), listing
    the extra (not downloaded) files too, as a repo with more files than were fetched would.
    """
    storage = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snap = storage / "snapshots" / COMMIT
    (storage / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    tree = {}
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / sha).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / sha)
        tree[name] = {"size": len(data), "blob_id": hashlib.sha1(data).hexdigest(), "lfs_sha256": sha,
                      "lfs_size": len(data)}
    if tree_extra is not None:
        for name, size in tree_extra.items():
            tree[name] = {"size": size, "blob_id": "0" * 40}
        (storage / "trees").mkdir()
        (storage / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": tree}))


def hf_files(model, tmp: Path, **save_kwargs) -> dict[str, bytes]:
    d = tmp / f"save{len(list(tmp.iterdir()))}"
    model.save_pretrained(d, **save_kwargs)
    write_tokenizer(d)
    return {p.name: p.read_bytes() for p in d.iterdir()}


def run_download_cases(env: dict, cases: dict[str, list[str]]) -> dict[str, tuple[int, str, str]]:
    """Run `python scripts/download.py <args>` for each case in one child process with ``env``."""
    argvs = {k: ["scripts/download.py", *v] for k, v in cases.items()}
    full_env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": "", **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    p = subprocess.run([sys.executable, "-c", CLI_DRIVER, json.dumps(argvs)], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return {k: tuple(v) for k, v in json.loads(p.stdout.splitlines()[-1]).items()}


class FakeGatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request like the Hub does for a gated repo and no/insufficient token."""

    def _gated(self):
        body = b'{"error":"Access to model org/gated is restricted. You must have access to it and be authenticated."}'
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model org/gated is restricted.")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _gated

    def log_message(self, *args):
        pass


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Fill a Hub cache, run every download case (three child processes, one per environment)."""
    tmp = tmp_path_factory.mktemp("hub")
    hf_home = tmp / "hf_home"
    cache = hf_home / "hub"
    saves = tmp / "saves"
    saves.mkdir()
    models = {"org/tiny-tree": tiny_llama(0), "org/tiny-notree": tiny_llama(1)}
    # repo with a cached tree listing that also names a .bin the cache does not hold (must not be needed)
    files = hf_files(models["org/tiny-tree"], saves)
    fill_cache(cache, "org/tiny-tree", files, tree_extra={"pytorch_model.bin": 123, "README.md": 10})
    # repo without a tree listing: sharded safetensors plus a broken .bin that must be ignored
    files = hf_files(models["org/tiny-notree"], saves, max_shard_size="30KB")
    assert "model.safetensors.index.json" in files
    files["pytorch_model.bin"] = b"not a pickle"
    fill_cache(cache, "org/tiny-notree", files)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ck = tmp / "checkpoints"
    base = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(cache)}
    offline = {**base, "HF_HUB_OFFLINE": "1"}
    unreachable = {**base, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    gated = {"HF_HOME": str(tmp / "empty_home"), "HF_HUB_CACHE": str(tmp / "empty_home" / "hub"),
             "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    runs = {
        "offline": (offline, {
            "tree": ["--repo_id", "org/tiny-tree", "--checkpoint_dir", str(ck / "a")],
            "notree": ["--repo_id", "org/tiny-notree", "--checkpoint_dir", str(ck / "a"), "--dtype", "bfloat16"],
            "tokenizer_only": ["--repo_id", "org/tiny-tree", "--checkpoint_dir", str(ck / "tok"),
                               "--tokenizer_only", "true"],
            "list": ["--repo_id", "list"],
            "absent": ["--repo_id", "org/absent", "--checkpoint_dir", str(ck / "absent")],
        }),
        "unreachable": (unreachable, {
            "cached": ["--repo_id", "org/tiny-tree", "--checkpoint_dir", str(ck / "b")],
            "absent": ["--repo_id", "org/absent", "--checkpoint_dir", str(ck / "absent2")],
        }),
        "gated": (gated, {
            "no_token": ["--repo_id", "org/gated", "--checkpoint_dir", str(ck / "gated")],
            "bad_token": ["--repo_id", "org/gated", "--checkpoint_dir", str(ck / "gated"), "--access_token",
                          "hf_invalid"],
        }),
    }
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = {k: pool.submit(run_download_cases, env, cases) for k, (env, cases) in runs.items()}
            results = {k: f.result() for k, f in futures.items()}
    finally:
        server.shutdown()
    return {"models": models, "ck": ck, "results": results, "saves": saves}


@torch.no_grad()
@pytest.mark.parametrize("run, case, repo, root", [("offline", "tree", "org/tiny-tree", "a"),
                                                   ("offline", "notree", "org/tiny-notree", "a"),
                                                   ("unreachable", "cached", "org/tiny-tree", "b")])
def test_download_from_cache_gives_a_working_checkpoint(hub, run, case, repo, root):
    code, out, err = hub["results"][run][case]
    assert code == 0, err
    d = hub["ck"] / root / repo
    names = sorted(p.name for p in d.iterdir())
    assert names == ["generation_config.json", "model.safetensors", "model_config.yaml", "tokenizer.json",
                     "tokenizer_config.json"], names
    model = load_model(d, dtype=torch.float32)
    assert model.config.hf_repo_id == repo and model.config.name == repo.split("/")[1]
    ref = hub["models"][repo]
    idx = torch.randint(0, VOCAB, (2, 12))
    atol = 1e-5 if case != "notree" else 0.1  # notree was converted to bf16
    assert (model(idx) - ref(idx).logits).abs().max().item() <= atol
    if case == "notree":
        assert model.lm_head.weight.dtype == torch.float32  # cast by load_model(dtype=...)
        assert load_model(d).lm_head.weight.dtype == torch.bfloat16


def test_tokenizer_only_and_list(hub):
    code, _, err = hub["results"]["offline"]["tokenizer_only"]
    assert code == 0, err
    d = hub["ck"] / "tok" / "org" / "tiny-tree"
    assert sorted(p.name for p in d.iterdir()) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert not (d / "tokenizer.json").is_symlink()
    code, out, _ = hub["results"]["offline"]["list"]
    assert code == 0
    for c in configs:
        assert any(line.split() == [c["name"], c["hf_repo_id"]] for line in out.splitlines()), c["name"]


@pytest.mark.parametrize("run, case, fragments", [
    ("offline", "absent", ["org/absent", "HF_HUB_OFFLINE=1", "convert_hf_checkpoint.py"]),
    ("unreachable", "absent", ["org/absent", "unreachable", "HF_HUB_OFFLINE=1", "convert_hf_checkpoint.py"]),
    ("gated", "no_token", ["org/gated is gated", "accept the license on the Hub page", "--access_token",
                           "HF_TOKEN"]),
    ("gated", "bad_token", ["your token has no access", "accept the license on the Hub page"]),
])
def test_download_errors_are_one_clear_line(hub, run, case, fragments):
    code, out, err = hub["results"][run][case]
    assert code == 1, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    for name in ("absent", "absent2", "gated"):
        assert not (hub["ck"] / name).exists()


def test_weight_patterns_prefer_safetensors():
    both = ["config.json", "model.safetensors", "pytorch_model.bin", "original/consolidated.00.pth"]
    assert weight_patterns(both) == ["model*.safetensors", "model.safetensors.index.json"]
    sharded = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors",
               "pytorch_model-00001-of-00002.bin"]
    assert weight_patterns(sharded)[0] == "model*.safetensors"
    assert weight_patterns(["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]) == \
        ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
