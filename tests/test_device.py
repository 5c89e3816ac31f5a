"""Device names (auto, cpu, cuda, cuda:N) everywhere they are taken, and what a device can do."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import semid.train
from semid.cli import main
from semid.config import ConfigError, SemidConfig, is_device_name
from semid.device import as_current, device_available, native_bf16, resolve_device
from semid.train import Trainer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pretend_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_that_are_taken(name):
    assert is_device_name(name)
    assert SemidConfig().with_overrides({"train.device": name}).train.device == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:-1", "cuda:1:2", "cuda 1", "mps", "", 0, None])
def test_other_device_names_are_config_errors_that_list_the_choices(name):
    assert not is_device_name(name)
    expected = r"train.device.*auto, cpu, cuda or cuda:N" if isinstance(name, str) else "train.device.*expected str"
    with pytest.raises(ConfigError, match=expected):
        SemidConfig().with_overrides({"train.device": name})
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_resolve_device_without_a_gpu(monkeypatch):
    _pretend_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(RuntimeError, match=f"device is '{name}' but no CUDA device is available"):
            resolve_device(name)
        assert not device_available(name)
    assert device_available("auto") and device_available("cpu") and not device_available("tpu")


def test_resolve_device_names_the_gpus_a_machine_has(monkeypatch):
    _pretend_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda") == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match=r"'cuda:2' but this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert device_available("cuda:1") and not device_available("cuda:2")


def _recorder(entered: list[torch.device]):
    """A stand-in for a device context manager that notes each device it is entered with."""

    @contextlib.contextmanager
    def record(device):
        entered.append(device)
        yield

    return record


def test_as_current_makes_a_gpu_current_and_leaves_the_cpu_alone(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "device", _recorder(made_current))
    with as_current(torch.device("cpu")):
        pass
    assert made_current == []
    with as_current(torch.device("cuda", 1)):
        assert made_current == [torch.device("cuda", 1)]


def test_training_runs_with_its_device_current(real_data, tiny_config, monkeypatch):
    """CUDA streams and graph capture use the current device, not the model's: fit makes them the same."""
    entered = []
    monkeypatch.setattr(semid.train, "as_current", _recorder(entered))
    trainer = Trainer(tiny_config({"train.steps": 5, "train.eval_every": 5}), torch.from_numpy(real_data("ml-100k")))
    trainer.fit()
    assert entered == [trainer.device] == [torch.device("cpu")]


def test_cli_names_a_bad_device_in_its_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "x.npy", "--out", "o", "--device", "gpu"])
    assert exit_info.value.code == 2
    assert "argument --device: expected auto, cpu, cuda or cuda:N (GPU N), got 'gpu'" in capsys.readouterr().err


def test_cli_passes_an_indexed_gpu_to_the_config(tmp_path, capsys, monkeypatch):
    """Without that GPU the run stops before training, with the device named, not a usage error."""
    _pretend_gpus(monkeypatch, 1)
    data = tmp_path / "items.npy"
    np.save(data, np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "model"), "--device", "cuda:3",
                 "--set", "train.progress=false"]) == 1
    assert "device is 'cuda:3' but this machine has 1 CUDA device(s), cuda:0 to cuda:0" in capsys.readouterr().err


def test_native_bf16_is_an_ampere_or_later_gpu_or_a_cpu_with_bf16_instructions(monkeypatch):
    for capability, native in [((7, 5), False), ((8, 0), True), ((9, 0), True)]:  # T4 emulates bf16; A100, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert native_bf16(torch.device("cuda")) is native
    assert not native_bf16(torch.device("meta"))
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert not native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16(torch.device("cpu"))
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # a build without the probes
        monkeypatch.delattr(torch.cpu, probe)
    assert not native_bf16(torch.device("cpu"))


@needs_cuda
def test_training_on_cuda_n_captures_its_graph_on_that_gpu(real_data, tiny_config):
    """The last GPU by index, named as cuda:N. With two GPUs that is cuda:1 while cuda:0 stays the process's
    current device: the captured step must run on the model's GPU and train as a run on "cuda" does when that
    GPU is the current one. With one GPU it checks that an indexed name trains as the plain one does."""
    index = torch.cuda.device_count() - 1
    x = torch.from_numpy(real_data("ml-100k"))
    config = tiny_config({"train.device": f"cuda:{index}", "train.amp": False, "train.steps": 60,
                          "train.eval_every": 30})
    trainer = Trainer(config, x)
    assert trainer.use_graph and trainer.device == torch.device("cuda", index)
    model = trainer.fit()
    assert torch.cuda.current_device() == 0
    assert {p.device for p in model.parameters()} == {torch.device("cuda", index)}
    assert trainer.state.history[-1]["fvu"] < 0.95
    with torch.cuda.device(index):
        plain = Trainer(config.with_overrides({"train.device": "cuda"}), x)
        plain.fit()
    assert abs(plain.state.final["fvu"] - trainer.state.final["fvu"]) < 0.02
