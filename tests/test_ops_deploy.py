"""Deployment files under ops/ and the Dockerfile, checked against the gateway's own code.

No Docker daemon or cluster is needed: the files are parsed and compared with
what the gateway defines (``gateway.config.ENV_VARS``, the default ports, the
health paths) and with each other (compose service names against Prometheus
targets and Grafana's data source, Kubernetes Service ports against container
ports). The configuration files the stacks mount are loaded with the gateway's
own loader, and checked with ``aigw config check``, under the environment the
containers would give them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import ENV_VARS, Config, load_config
from tests.conftest import REPO, need

OPS = REPO / "ops"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = OPS / "docker-compose.yml"
COMPOSE_DIR = OPS / "compose"
SCALE_ENV = COMPOSE_DIR / "scale.env"
K8S = OPS / "k8s"

#: Services built from this repository's Dockerfile.
AIGW_SERVICES = ("aigw", "worker-gpu", "worker-cpu")
SCALE_SERVICES = ("rabbitmq", "postgres", "worker-gpu", "worker-cpu")
#: Variables that aigw containers may carry besides AIGW_* ones.
OTHER_CONTAINER_VARS = {"NVIDIA_VISIBLE_DEVICES"}

DEFAULTS = Config()


# ----------------------------------------------------------------- helpers
def yaml_files() -> list[Path]:
    return sorted(p for p in OPS.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, args = current.partition(" ")
        out.append((word.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in dockerfile_instructions():
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_args(word: str) -> list[str]:
    return [args for w, args in dockerfile_instructions() if w == word]


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}."""

    def sub(m: re.Match[str]) -> str:
        value = env.get(m["name"])
        if m["op"] == ":-":
            return value if value else m["default"]
        if m["op"] == "-":
            return value if value is not None else m["default"]
        return value or ""

    if isinstance(node, str):
        return _VAR.sub(sub, node)
    if isinstance(node, list):
        return [interpolate(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text())
    return interpolate(raw, env or {})


def container_env(service: Mapping[str, Any]) -> dict[str, str]:
    """What an aigw container sees: the image's ENV, then the service's environment."""
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("AIGW_")}
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> source (relative bind mounts resolved against ops/) of a compose service."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            source = str((OPS / source).resolve())
        out[target] = source
    return out


def container_ports(service: Mapping[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def option(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def cli_config_check(path: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``aigw config check --config PATH`` under ``env`` (and no AIGW_* of the caller)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIGW_")}
    clean.update(env)
    clean["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=clean,
        timeout=120,
    )


def local_models_env(env: Mapping[str, str]) -> dict[str, str]:
    """The container's environment with its models dir mapped back to the repository's exported_models."""
    out = dict(env)
    if "AIGW_MODELS_DIR" in out:
        out["AIGW_MODELS_DIR"] = str(REPO / "exported_models")
    return out


def k8s_objects() -> list[dict[str, Any]]:
    """The Kubernetes objects of ops/k8s (kustomization.yaml is kustomize's, not one)."""
    return [d for p in sorted(K8S.rglob("*.yaml")) for d in load_yaml_docs(p) if d.get("kind") != "Kustomization"]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_containers(deployment: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def main_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def named_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container["ports"]:
        if p["name"] == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def k8s_config_text() -> str:
    return str(k8s_object("ConfigMap", "aigw-config")["data"]["aigw.toml"])


# ------------------------------------------------------------------- YAML
@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(OPS)))
def test_every_yaml_file_under_ops_parses(path: Path) -> None:
    assert load_yaml_docs(path), f"{path} holds no YAML document"


# ------------------------------------------------------------- Dockerfile
def test_dockerfile_runs_as_non_root_with_volume_healthcheck_and_ports() -> None:
    (user,) = dockerfile_args("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be numeric (runAsNonRoot checks it) and not root"

    env = dockerfile_env()
    assert dockerfile_args("VOLUME") == ['["/data"]']
    assert env["AIGW_DATA_DIR"] == "/data"
    assert env["AIGW_METRICS_HOST"] == "0.0.0.0"
    # Bound beyond loopback, so closed by default: a bearer token, callers from listed networks only.
    assert env["AIGW_METRICS_AUTH"] == "bearer" and env["AIGW_METRICS_CREDENTIAL_FILE"].startswith("/run/secrets/")
    assert load_config(environ={k: v for k, v in env.items() if k.startswith("AIGW_")}).gateway.allow_hosts

    (health,) = dockerfile_args("HEALTHCHECK")
    m = re.search(r"http://127\.0\.0\.1:\$\{AIGW_METRICS_PORT:-(\d+)\}(/\w+)", health)
    assert m, health
    assert int(m[1]) == DEFAULTS.metrics.port and m[2] == "/healthz"

    exposed = {int(p) for args in dockerfile_args("EXPOSE") for p in args.split()}
    assert exposed == {DEFAULTS.gateway.port, DEFAULTS.metrics.port}
    assert dockerfile_args("ENTRYPOINT") == ['["aigw"]'] and dockerfile_args("CMD") == ['["serve"]']


def test_dockerfile_aigw_variables_exist() -> None:
    unknown = {k for k in dockerfile_env() if k.startswith("AIGW_")} - set(ENV_VARS)
    assert not unknown, f"Dockerfile sets variables the gateway does not read: {unknown}"


def test_dockerfile_installs_scale_extra_and_verifies_baked_models() -> None:
    runs = " ".join(dockerfile_args("RUN"))
    assert "['optional-dependencies']['scale']" in runs, "the image must hold Celery for `aigw worker`"
    assert "aigw models verify" in runs and "UNAVAILABLE" in runs

    # The models dir the image names is where it copies exported_models/.
    workdirs = dockerfile_args("WORKDIR")
    copies = [shlex.split(a) for a in dockerfile_args("COPY")]
    dest = next(d for *srcs, d in copies if srcs == ["exported_models"])
    assert dockerfile_env()["AIGW_MODELS_DIR"] == str(PurePosixPath(workdirs[0]) / dest)


def test_dockerfile_cuda_base_matches_onnxruntime_gpu() -> None:
    from packaging.requirements import Requirement

    args = dict(a.split("=", 1) for a in dockerfile_args("ARG") if "=" in a)
    image = args["CUDA_IMAGE"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu[\d.]+", image)
    assert m, f"CUDA_IMAGE {image!r}: expected an nvidia/cuda cudnn runtime image"

    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ort = next(Requirement(d) for d in deps if Requirement(d).name == "onnxruntime-gpu")
    assert ort.specifier.contains(args["ORT_VERSION"]), f"ORT_VERSION {args['ORT_VERSION']} outside {ort}"
    # The wheel's CUDA major against the base image's is checked where it is
    # certain, inside the image build (the RUN step after the pip install):
    # the wheel installed here may be a newer release than the pinned one.
    checks = [a for a in dockerfile_args("RUN") if "import cuda_version" in a]
    assert checks and '!= "${CUDA_VERSION%%.*}"' in checks[0], "the build must compare the wheel's CUDA major"


def test_dockerignore_lets_in_only_what_the_image_copies() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "start from nothing, then let in what the Dockerfile copies"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources = {s.rstrip("/") for a in dockerfile_args("COPY") for s in shlex.split(a)[:-1]}
    assert sources <= allowed, f"COPY sources excluded from the context: {sources - allowed}"
    assert not allowed & {".venv", ".git", "tests", "aigw-data"}
    assert all((REPO / s).exists() for s in sources)


# -------------------------------------------------------- docker compose
def test_compose_services_images_and_profiles() -> None:
    c = compose()
    services = c["services"]
    assert set(services) == {"aigw", "orthanc", "prometheus", "grafana", *SCALE_SERVICES}
    for name, s in services.items():
        image = s["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
        assert s.get("profiles", []) == (["scale"] if name in SCALE_SERVICES else []), name
    for name in AIGW_SERVICES:
        s = services[name]
        assert s["image"] == services["aigw"]["image"], "gateway and workers run one image"
        context = (OPS / s["build"]["context"]).resolve()
        assert context == REPO and (context / s["build"]["dockerfile"]).is_file()
        assert s["pull_policy"] == "build"


def test_compose_volumes_and_bind_mounts_exist() -> None:
    c = compose()
    named = set(c["volumes"])
    for name, s in c["services"].items():
        for target, source in mounts(s).items():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} (mounted at {target}) does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    for name in AIGW_SERVICES:
        m = mounts(c["services"][name])
        assert m["/data"] == "aigw-data", f"{name}: the data dir must be the shared volume at /data"
        assert Path(m["/etc/aigw/aigw.toml"]) == COMPOSE_DIR / "aigw.toml"


def test_compose_aigw_variables_exist() -> None:
    text = COMPOSE.read_text()
    used = {m["name"] for m in _VAR.finditer(text) if m["name"].startswith("AIGW_")}
    used |= {k for k in read_env_file(SCALE_ENV) if k.startswith("AIGW_")}
    for name in AIGW_SERVICES:
        env = yaml.safe_load(text)["services"][name]["environment"]
        assert not set(env) - set(ENV_VARS) - OTHER_CONTAINER_VARS, f"{name}: {set(env)}"
        used |= set(env) - OTHER_CONTAINER_VARS
    unknown = used - set(ENV_VARS)
    assert not unknown, f"compose uses variables the gateway does not read: {unknown}"


def test_compose_depends_on_targets_have_healthchecks() -> None:
    c = compose()
    services = c["services"]
    for name, s in services.items():
        for target, dep in (s.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            assert dep["condition"] == "service_healthy"
            has_check = "healthcheck" in services[target] or target in AIGW_SERVICES  # the image's HEALTHCHECK
            assert has_check, f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
            if target in SCALE_SERVICES and name not in SCALE_SERVICES:
                assert dep.get("required") is False, f"{name} must start without the scale profile"
        check = s.get("healthcheck")
        if check:
            assert check["test"][0] in ("CMD", "CMD-SHELL")


def test_compose_gateway_config_loads_in_default_mode() -> None:
    gw = compose()["services"]["aigw"]
    env = container_env(gw)
    cfg = load_config(COMPOSE_DIR / "aigw.toml", environ=env)
    assert cfg.jobs.executor == "local" and cfg.gateway.database_url is None
    assert str(cfg.gateway.data_dir) == "/data" and "/data" in mounts(gw)
    assert cfg.metrics.host == "0.0.0.0"

    # Ports published and health path used are the gateway's.
    assert container_ports(gw) == {cfg.gateway.port, cfg.metrics.port}
    assert (cfg.gateway.port, cfg.metrics.port) == (DEFAULTS.gateway.port, DEFAULTS.metrics.port)
    url = urlsplit(next(a for a in gw["healthcheck"]["test"] if a.startswith("http")))
    assert url.port == cfg.metrics.port and url.path == "/readyz"

    r = cli_config_check(COMPOSE_DIR / "aigw.toml", local_models_env(env))
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stderr


@pytest.mark.parametrize("name", AIGW_SERVICES)
def test_compose_scale_mode_config_loads(name: str) -> None:
    scale = read_env_file(SCALE_ENV)
    assert scale["COMPOSE_PROFILES"] == "scale"
    c = compose(scale)
    s = c["services"][name]
    env = container_env(s)
    cfg = load_config(COMPOSE_DIR / "aigw.toml", environ=env)
    assert cfg.jobs.executor == "celery"
    assert cfg.gateway.database_url == scale["AIGW_DATABASE_URL"] and cfg.jobs.broker_url == scale["AIGW_BROKER_URL"]

    # The URLs name the compose services, with the passwords they are given.
    db, mq = urlsplit(cfg.database_url), urlsplit(cfg.jobs.broker_url or "")
    pg, rabbit = c["services"]["postgres"]["environment"], c["services"]["rabbitmq"]["environment"]
    assert (db.hostname, db.username, db.password, db.path) == (
        "postgres",
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        "/" + pg["POSTGRES_DB"],
    )
    assert (mq.hostname, mq.username, mq.password, mq.path) == (
        "rabbitmq",
        rabbit["RABBITMQ_DEFAULT_USER"],
        rabbit["RABBITMQ_DEFAULT_PASS"],
        "/" + rabbit["RABBITMQ_DEFAULT_VHOST"],
    )
    if name != "aigw":
        args = s["command"]
        assert args[0] == "worker" and option(args, "--config") == "/etc/aigw/aigw.toml"
        assert option(args, "--device") == name.removeprefix("worker-")
        assert int(option(args, "--metrics-port")) == DEFAULTS.metrics.port  # the image's HEALTHCHECK port

    r = cli_config_check(COMPOSE_DIR / "aigw.toml", local_models_env(env))
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stderr


def test_compose_gpu_worker_reserves_a_gpu() -> None:
    services = compose()["services"]
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "deploy" not in services["worker-cpu"] and "deploy" not in services["aigw"]


def test_compose_orthanc_is_the_destination() -> None:
    services = compose()["services"]
    cfg = load_config(COMPOSE_DIR / "aigw.toml", environ=container_env(services["aigw"]))
    (dest,) = cfg.destinations
    orthanc = services["orthanc"]["environment"]
    assert dest.host == "orthanc" and dest.ae_title == orthanc["ORTHANC__DICOM_AET"] == "ORTHANC"
    assert dest.port == int(orthanc["ORTHANC__DICOM_PORT"])
    assert 8042 in container_ports(services["orthanc"])

    # Orthanc's modality "aigw" is the gateway: AE title, service name, DICOM port.
    import json

    (ae, host, port) = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])["aigw"]
    assert (ae, host, port) == (cfg.gateway.ae_title, "aigw", cfg.gateway.port)


def test_compose_prometheus_targets_match_services() -> None:
    c = compose()
    services = c["services"]
    prom_mounts = mounts(services["prometheus"])
    config_path = Path(prom_mounts["/etc/prometheus/prometheus.yml"])
    assert config_path == COMPOSE_DIR / "prometheus.yml"
    prom = yaml.safe_load(config_path.read_text())

    # The alert rules are the host install's file, mounted beside the configuration.
    (rules,) = prom["rule_files"]
    assert Path(prom_mounts[f"/etc/prometheus/{rules}"]) == OPS / "prometheus" / "alerts.yml"

    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) == {"aigw", "aigw-worker"}, "the alert rules select these job names"
    (target,) = jobs["aigw"]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "aigw" and int(port) == DEFAULTS.metrics.port
    (sd,) = jobs["aigw-worker"]["dns_sd_configs"]
    assert set(sd["names"]) == {"worker-gpu", "worker-cpu"}
    for name in sd["names"]:
        assert int(option(services[name]["command"], "--metrics-port")) == sd["port"]


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(OPS / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "aigw-metrics-token").write_text("token\n")  # the compose secret; promtool checks it exists
    r = subprocess.run(
        [need("promtool"), "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_grafana_provisioning_matches_mounts() -> None:
    services = compose()["services"]
    graf = mounts(services["grafana"])
    assert Path(graf["/etc/grafana/provisioning"]) == OPS / "grafana" / "provisioning"

    (datasource,) = yaml.safe_load((OPS / "grafana/provisioning/datasources/aigw.yml").read_text())["datasources"]
    url = urlsplit(datasource["url"])
    assert url.hostname in services and url.port in container_ports(services[url.hostname])

    (provider,) = yaml.safe_load((OPS / "grafana/provisioning/dashboards/aigw.yml").read_text())["providers"]
    dashboards = [t for t, s in graf.items() if Path(s) == OPS / "grafana" / "aigw-dashboard.json"]
    assert [str(PurePosixPath(t).parent) for t in dashboards] == [provider["options"]["path"]]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboards[0]


# ------------------------------------------------------------- Kubernetes
def test_k8s_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present
    (image,) = kust["images"]
    images = {c["image"] for o in k8s_objects() if o["kind"] == "Deployment" for c in pod_containers(o)}
    assert images == {f"{image['name']}:{image['newTag']}"}


def test_k8s_objects_live_in_the_namespace() -> None:
    (ns,) = [o for o in k8s_objects() if o["kind"] == "Namespace"]
    for o in k8s_objects():
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == ns["metadata"]["name"], o["metadata"]["name"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_k8s_shared_data_volume_is_read_write_many() -> None:
    pvc = k8s_object("PersistentVolumeClaim", "aigw-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cfg_dir = None
    for name in ("aigw-gateway", "aigw-worker-gpu", "aigw-worker-cpu"):
        dep = k8s_object("Deployment", name)
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        container = main_container(dep)
        by_path = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert by_path["/data"]["persistentVolumeClaim"]["claimName"] == "aigw-data"
        config_file = PurePosixPath(option(container["args"], "--config"))
        assert by_path[str(config_file.parent)]["configMap"]["name"] == "aigw-config"
        assert config_file.name in k8s_object("ConfigMap", "aigw-config")["data"]
        cfg_dir = cfg_dir or str(config_file.parent)
    assert cfg_dir == "/etc/aigw"


def test_k8s_gateway_is_one_replica_recreated() -> None:
    dep = k8s_object("Deployment", "aigw-gateway")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert main_container(dep)["args"][0] == "serve"


def test_k8s_workers_and_gpu_request() -> None:
    gpu = k8s_object("Deployment", "aigw-worker-gpu")
    container = main_container(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert option(container["args"], "--device") == "gpu"
    spec = gpu["spec"]["template"]["spec"]
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])

    cpu = main_container(k8s_object("Deployment", "aigw-worker-cpu"))
    assert option(cpu["args"], "--device") == "cpu"
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    for c in (container, cpu):
        assert c["args"][0] == "worker"
        assert int(option(c["args"], "--metrics-port")) == named_port(c, "metrics") == DEFAULTS.metrics.port


def test_k8s_probes_and_ports_match_the_gateway() -> None:
    for name in ("aigw-gateway", "aigw-worker-gpu", "aigw-worker-cpu"):
        c = main_container(k8s_object("Deployment", name))
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{name} {probe}"
            assert named_port(c, get["port"]) == DEFAULTS.metrics.port, f"{name} {probe}"
        annotations = k8s_object("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == DEFAULTS.metrics.port
        assert annotations["prometheus.io/path"] == "/metrics"
    gw = main_container(k8s_object("Deployment", "aigw-gateway"))
    assert named_port(gw, "dicom") == DEFAULTS.gateway.port


def test_k8s_services_select_pods_and_ports() -> None:
    deployments = [o for o in k8s_objects() if o["kind"] == "Deployment"]
    for svc in (o for o in k8s_objects() if o["kind"] == "Service"):
        name = svc["metadata"]["name"]
        selector = svc["spec"]["selector"]
        chosen = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert chosen, f"Service {name} selects no pod"
        for port in svc["spec"]["ports"]:
            for d in chosen:
                named_port(main_container(d), port["targetPort"])
    dicom = k8s_object("Service", "aigw-dicom")
    assert dicom["spec"]["type"] in ("LoadBalancer", "NodePort")
    assert [p["port"] for p in dicom["spec"]["ports"]] == [DEFAULTS.gateway.port]
    assert dicom["spec"]["externalTrafficPolicy"] == "Local"
    metrics = k8s_object("Service", "aigw-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and [p["port"] for p in metrics["spec"]["ports"]] == [9110]


def test_k8s_pods_run_as_the_image_user_without_privileges() -> None:
    (user,) = dockerfile_args("USER")
    uid, _, gid = user.partition(":")
    for d in (o for o in k8s_objects() if o["kind"] == "Deployment"):
        pod = d["spec"]["template"]["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == int(uid) and sc["fsGroup"] == int(gid or uid)
        assert pod["automountServiceAccountToken"] is False
        for c in pod_containers(d):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], c["name"]


def test_k8s_aigw_variables_exist() -> None:
    secret = k8s_object("Secret", "aigw-urls")
    used = set(secret["stringData"])
    for d in (o for o in k8s_objects() if o["kind"] == "Deployment"):
        for c in pod_containers(d):
            used |= {e["name"] for e in c.get("env", [])} - OTHER_CONTAINER_VARS
            for source in c.get("envFrom", []):
                assert source["secretRef"]["name"] == "aigw-urls"
    unknown = used - set(ENV_VARS)
    assert not unknown, f"Kubernetes manifests use variables the gateway does not read: {unknown}"


def test_k8s_config_loads_with_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "aigw.toml"
    path.write_text(k8s_config_text())
    gateway = main_container(k8s_object("Deployment", "aigw-gateway"))
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("AIGW_")}
    env.update(k8s_object("Secret", "aigw-urls")["stringData"])
    env.update({e["name"]: e["value"] for e in gateway["env"]})
    cfg = load_config(path, environ=env)
    assert cfg.jobs.executor == "celery" and str(cfg.gateway.data_dir) == "/data"
    assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == DEFAULTS.metrics.port
    assert cfg.gateway.port == DEFAULTS.gateway.port
    # Pipelines sent to the gpu queue exist among the built-in ones.
    import tomllib

    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["aigw.pipelines"]
    assert set(cfg.jobs.devices) <= set(entry_points)

    r = cli_config_check(path, local_models_env(env))
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stderr


def test_k8s_servicemonitor_keeps_the_alert_job_names() -> None:
    monitor = k8s_object("ServiceMonitor", "aigw")
    label = monitor["spec"]["jobLabel"]
    services = [o for o in k8s_objects() if o["kind"] == "Service" and label in o["metadata"].get("labels", {})]
    assert {s["metadata"]["labels"][label] for s in services} == {"aigw", "aigw-worker"}
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for s in services:
        assert ports <= {p["name"] for p in s["spec"]["ports"]}
    # Pods carry the same label, for annotation-based discovery.
    for d in (o for o in k8s_objects() if o["kind"] == "Deployment"):
        assert d["spec"]["template"]["metadata"]["labels"][label] in ("aigw", "aigw-worker")


def test_compose_metrics_token_is_shared_by_aigw_and_prometheus() -> None:
    """/metrics asks for a bearer token in every aigw container, and Prometheus sends that same secret."""
    c = compose()
    (secret,) = c["secrets"]
    assert Path(c["secrets"][secret]["file"]).name == "metrics-token"
    # One aigw.toml for the gateway and the workers.
    cfg = load_config(COMPOSE_DIR / "aigw.toml", environ=container_env(c["services"]["aigw"]))
    assert cfg.metrics.auth == "bearer" and str(cfg.metrics.credential_file) == f"/run/secrets/{secret}"
    assert cfg.gateway.allow_hosts, "the DICOM port is open to any address"
    for name in AIGW_SERVICES:
        assert c["services"][name]["secrets"] == [secret], name
    (mount,) = c["services"]["prometheus"]["secrets"]
    assert mount["source"] == secret
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        creds = PurePosixPath("/etc/prometheus") / job["authorization"]["credentials_file"]
        assert str(creds) == mount["target"], job["job_name"]


def test_k8s_metrics_token_is_shared_by_the_pods_and_the_servicemonitor(tmp_path: Path) -> None:
    path = tmp_path / "aigw.toml"
    path.write_text(k8s_config_text())
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("AIGW_")}
    env.update(k8s_object("Secret", "aigw-urls")["stringData"])
    cfg = load_config(path, environ=env)
    assert cfg.metrics.auth == "bearer" and cfg.gateway.allow_hosts
    token = k8s_object("Secret", "aigw-metrics-token")
    (key,) = token["stringData"]
    for d in (o for o in k8s_objects() if o["kind"] == "Deployment"):
        pod = d["spec"]["template"]["spec"]
        (vol,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == token["metadata"]["name"]]
        (item,) = vol["secret"]["items"]
        (mount,) = [m for m in main_container(d)["volumeMounts"] if m["name"] == vol["name"]]
        assert PurePosixPath(mount["mountPath"]) / item["path"] == PurePosixPath(str(cfg.metrics.credential_file))
        assert item["key"] == key
    for endpoint in k8s_object("ServiceMonitor", "aigw")["spec"]["endpoints"]:
        auth = endpoint["authorization"]
        assert auth["type"] == "Bearer" and auth["credentials"] == {"name": token["metadata"]["name"], "key": key}
