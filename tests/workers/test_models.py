"""Model formats load; pickles are never executed; registered files are re-verified on load."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from loading import ModelLoadError, inspect_model, load_model
from loading.hashing import file_sha256, folder_sha256
from loading.models import clear_model_cache
from service.settings import Settings
from tests.workers.architectures import tiny_mlp

ALLOW = ["tests.workers.architectures:tiny_mlp"]
TINY_PARAMS = sum(p.numel() for p in tiny_mlp().parameters())


class _Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def test_torchscript_loads_and_reports_hash_and_size(data_root: Path) -> None:
    path = data_root / "mlp.pt"
    torch.jit.save(torch.jit.script(tiny_mlp()), str(path))
    info = inspect_model(path, "torchscript", "classification", architecture=None, allowlist=[])
    assert (info.format, info.sha256, info.num_parameters) == ("torchscript", file_sha256(path), TINY_PARAMS)
    assert info.structure["kfac_unsupported"] == {}  # TorchScript linear layers: K-FAC factors every parameter
    assert len(info.structure["parameters"]) == len(list(tiny_mlp().parameters()))
    assert inspect_model(path, "auto", "classification", architecture=None, allowlist=[]).format == "torchscript"


def test_safetensors_needs_an_allowlisted_architecture(data_root: Path) -> None:
    module = tiny_mlp()
    path = data_root / "mlp.safetensors"
    save_file(module.state_dict(), str(path))
    info = inspect_model(path, "safetensors", "classification", architecture=ALLOW[0], allowlist=ALLOW)
    assert info.num_parameters == TINY_PARAMS and info.format == "safetensors"
    assert inspect_model(path, "auto", "classification", architecture=ALLOW[0], allowlist=ALLOW).format == "safetensors"
    with pytest.raises(ModelLoadError, match="not in the server's allowlist") as refused:
        inspect_model(path, "safetensors", "classification", architecture="os:system", allowlist=ALLOW)
    assert refused.value.field == "architecture"
    with pytest.raises(ModelLoadError, match="allowlist"):
        inspect_model(path, "safetensors", "classification", architecture=ALLOW[0], allowlist=[])
    with pytest.raises(ModelLoadError, match="needs an architecture"):
        inspect_model(path, "safetensors", "classification", architecture=None, allowlist=ALLOW)


def test_safetensors_weights_must_fit_the_architecture_strictly(data_root: Path) -> None:
    path = data_root / "wrong.safetensors"
    save_file({"0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="weights do not fit"):
        inspect_model(path, "safetensors", "classification", architecture=ALLOW[0], allowlist=ALLOW)


def test_hf_folders_load_per_task(hf_folders: dict[str, Path]) -> None:
    bert = inspect_model(hf_folders["bert"], "hf", "classification", architecture=None, allowlist=[])
    gpt2 = inspect_model(hf_folders["gpt2"], "auto", "causal_lm", architecture=None, allowlist=[])
    assert bert.format == "hf" and gpt2.format == "hf"
    assert bert.sha256 == folder_sha256(hf_folders["bert"])
    assert gpt2.num_parameters > 0


def test_hf_folder_with_remote_code_is_refused(hf_folders: dict[str, Path], data_root: Path) -> None:
    folder = data_root / "remote"
    shutil.copytree(hf_folders["bert"], folder)
    config = (folder / "config.json").read_text().replace("{", '{"auto_map": {"AutoModel": "evil.Model"},', 1)
    (folder / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match="remote code"):
        inspect_model(folder, "hf", "classification", architecture=None, allowlist=[])


def test_pickled_model_is_refused_and_never_executed(data_root: Path, marker: Path) -> None:
    path = data_root / "evil.pt"
    torch.save({"weight": _Evil(marker)}, str(path))
    for fmt, arch in (("torchscript", None), ("auto", None), ("safetensors", ALLOW[0])):
        with pytest.raises(ModelLoadError):
            inspect_model(path, fmt, "classification", architecture=arch, allowlist=ALLOW)
    raw = data_root / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    for fmt in ("torchscript", "auto"):
        with pytest.raises(ModelLoadError):
            inspect_model(raw, fmt, "classification", architecture=None, allowlist=[])
    assert not marker.exists()


def test_plain_state_dict_pickle_is_refused_with_a_clear_reason(data_root: Path) -> None:
    path = data_root / "state.pt"
    torch.save(tiny_mlp().state_dict(), str(path))
    with pytest.raises(ModelLoadError, match=r"torch\.save pickle"):
        inspect_model(path, "torchscript", "classification", architecture=None, allowlist=[])


def test_hf_folder_with_malicious_pickle_weights_is_refused(hf_folders: dict[str, Path], data_root: Path,
                                                            marker: Path) -> None:
    folder = data_root / "bin-only"
    shutil.copytree(hf_folders["bert"], folder)
    (folder / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": _Evil(marker)}, str(folder / "pytorch_model.bin"))
    with pytest.raises(ModelLoadError):
        inspect_model(folder, "hf", "classification", architecture=None, allowlist=[])
    assert not marker.exists()


def test_unknown_format_task_and_garbage_files(data_root: Path) -> None:
    path = data_root / "garbage.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot recognise"):
        inspect_model(path, "auto", "classification", architecture=None, allowlist=[])
    with pytest.raises(ModelLoadError, match="unknown format"):
        inspect_model(path, "onnx", "classification", architecture=None, allowlist=[])
    with pytest.raises(ModelLoadError, match="unknown task") as info:
        inspect_model(path, "torchscript", "ranking", architecture=None, allowlist=[])
    assert info.value.field == "task"


def _row(path: Path, root: Path, fmt: str = "torchscript", **extra: object) -> SimpleNamespace:
    return SimpleNamespace(uri=path.as_uri(), format=fmt, task="classification", architecture=None,
                           sha256=file_sha256(path), tenant="t", **extra)


def test_load_model_caches_and_detects_changed_files(data_root: Path, settings: Settings) -> None:
    clear_model_cache()
    path = data_root / "mlp.pt"
    module = tiny_mlp()
    torch.jit.save(torch.jit.script(module), str(path))
    row = _row(path, data_root)
    first = load_model(row, settings)
    assert load_model(row, settings) is first
    x = torch.randn(4, 6)
    torch.testing.assert_close(first.module(x), module(x))
    torch.jit.save(torch.jit.script(tiny_mlp()), str(path))  # different random weights
    with pytest.raises(ModelLoadError, match="changed since registration"):
        load_model(row, settings)
