"""deploy/ checked offline: Kubernetes schemas, the KEDA CRD schema, the compose schema, the Dockerfile's
instructions, and that every metric a dashboard, alert or autoscaler queries is one the worker exports."""

from __future__ import annotations

import json
import re
import shlex
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from worker.config import load_pipeline
from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30"
SECRETISH = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.IGNORECASE)


def _k8s_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def _exported_metric_names() -> set[str]:
    """Every sample name a worker exposes (counters with _total, histograms with _bucket/_sum/_count)."""
    m = Metrics("p", sources=["cam1"])
    m.reconnect("broker")
    m.published("result")
    m.publish_error("timeout")
    m.error("decode_error")
    m.e2e_latency("cam1", 0.1)
    m.batch_done(1, 0.01, 0.01)
    text = m.render()[0].decode()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def _queried_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bsegstream_[a-z0-9_]+", expr))


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return _k8s_docs()


def test_every_builtin_manifest_validates_against_the_kubernetes_schema(
    docs: dict[str, dict[str, Any]],
) -> None:
    builtin = {k: d for k, d in docs.items() if not d["apiVersion"].startswith("keda.sh/")}
    assert {k.split("/")[0] for k in builtin} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }
    for name, doc in builtin.items():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message}")


def test_the_validator_rejects_a_misspelt_field(docs: dict[str, dict[str, Any]]) -> None:
    broken = json.loads(json.dumps(docs["Deployment/segstream"]))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_deployment_probes_grace_and_hardening(docs: dict[str, dict[str, Any]]) -> None:
    dep = docs["Deployment/segstream"]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names

    # the pipeline the pod runs is a valid pipeline file, and its HTTP port is the probed port
    cm = docs["ConfigMap/segstream-pipeline"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "pipeline")
    pipeline_path = container["args"][-1]
    assert pipeline_path == f"{mount['mountPath']}/pipeline.yaml" and "pipeline.yaml" in cm["data"]
    pipeline = _load_pipeline_text(cm["data"]["pipeline.yaml"])
    assert port_names["metrics"] == pipeline.http.port
    assert pipeline.broker is not None  # readiness then waits for the broker

    # terminationGracePeriodSeconds covers preStop + the worker's own grace time, with a small margin
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = int(pre_stop[1]) + pipeline.shutdown_grace_s
    assert budget < pod["terminationGracePeriodSeconds"] <= budget + 15

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # secrets only by reference
    for env in container["env"]:
        if SECRETISH.search(env["name"]):
            assert "value" not in env and "secretKeyRef" in env["valueFrom"], env


def test_selectors_match_the_pod_labels(docs: dict[str, dict[str, Any]]) -> None:
    labels = docs["Deployment/segstream"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        docs["Deployment/segstream"]["spec"]["selector"]["matchLabels"],
        docs["Service/segstream-metrics"]["spec"]["selector"],
        docs["PodDisruptionBudget/segstream"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()
    svc_port = docs["Service/segstream-metrics"]["spec"]["ports"][0]
    container = docs["Deployment/segstream"]["spec"]["template"]["spec"]["containers"][0]
    assert svc_port["targetPort"] in {p["name"] for p in container["ports"]}
    assert (
        docs["PodDisruptionBudget/segstream"]["spec"]["minAvailable"]
        < docs["Deployment/segstream"]["spec"]["replicas"]
    )


def _keda_schema() -> dict[str, Any]:
    schema = json.loads((DEPLOY / "schemas" / "keda-scaledobject.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_keda_scaledobject_against_its_crd_schema(docs: dict[str, dict[str, Any]]) -> None:
    scaled = docs["ScaledObject/segstream"]
    jsonschema.Draft202012Validator(_keda_schema()).validate(scaled)
    assert scaled["spec"]["scaleTargetRef"]["name"] == "segstream"
    assert (
        scaled["spec"]["minReplicaCount"] >= docs["PodDisruptionBudget/segstream"]["spec"]["minAvailable"] + 1
    )
    exported = _exported_metric_names()
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        queried = _queried_metrics(trigger["metadata"]["query"])
        assert queried and queried <= exported, queried - exported


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "triggers", 0, "metadata", "threshold"), 4),  # CRD: metadata values are strings
        (("spec", "maxReplicaCount"), "8"),
        (("spec", "minReplicas"), 2),  # HPA spelling, not KEDA's
        (("spec", "triggers", 0, "metricType"), "Average"),
    ],
)
def test_keda_schema_rejects_mistakes(
    docs: dict[str, dict[str, Any]], path: tuple[Any, ...], value: Any
) -> None:
    broken = json.loads(json.dumps(docs["ScaledObject/segstream"]))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_keda_schema()).validate(broken)


def _load_pipeline_text(text: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.yaml"
        path.write_text(text)
        return load_pipeline(path)


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, "dangling line continuation"
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    names = [i for i, _ in instructions]
    assert names[0] in {"ARG", "FROM"} and "FROM" in names
    final = instructions[max(i for i, (n, _) in enumerate(instructions) if n == "FROM") :]
    final_names = [n for n, _ in final]
    assert all("slim" in a or a.startswith("${") for n, a in instructions if n == "FROM")
    args = dict(a.split("=", 1) for n, a in instructions if n == "ARG" and "=" in a)
    assert "slim" in args["PYTHON_IMAGE"]
    user = next(a for n, a in reversed(final) if n == "USER")
    assert user.split(":")[0] not in {"root", "0"}
    # the user is set before the entrypoint runs, and nothing after it switches back
    assert final_names.index("USER") < final_names.index("ENTRYPOINT")
    healthcheck = next(a for n, a in final if n == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "--interval" in healthcheck
    assert any(n == "VOLUME" and "/models" in a for n, a in final)
    assert any(n == "EXPOSE" and "9108" in a for n, a in final)
    entry = json.loads(next(a for n, a in final if n == "ENTRYPOINT"))
    cmd = json.loads(next(a for n, a in final if n == "CMD"))
    assert entry == ["segstream"] and cmd[0] == "run"
    # the default command's pipeline is copied into the image from deploy/pipelines/ and is valid
    assert load_pipeline(DEPLOY / "pipelines" / Path(cmd[1]).name).http.port == 9108
    for name, value in ((n, a) for n, a in instructions if n in {"ENV", "ARG"}):
        for token in shlex.split(value):
            key = token.split("=", 1)[0]
            assert not SECRETISH.search(key), f"{name} {key}: secrets belong in the runtime environment"
    for n, a in instructions:
        if n == "COPY" and "--from" not in a:
            for src in shlex.split(a)[:-1]:
                assert (ROOT / src).exists(), src
    deps = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert "opencv-python-headless" in deps and "opencv-python>" not in deps


def test_compose_file_against_the_compose_schema() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose)
    services = compose["services"]
    assert {"mosquitto", "worker", "prometheus"} <= set(services)
    worker = services["worker"]
    assert worker["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    assert (ROOT / "deploy" / worker["build"]["context"] / worker["build"]["dockerfile"]).exists()
    for volume in worker["volumes"] + services["mosquitto"]["volumes"] + services["prometheus"]["volumes"]:
        src = volume.split(":")[0]
        if src.startswith("."):
            assert (DEPLOY / src).exists(), src
        else:
            assert src in compose["volumes"], src
    pipeline = load_pipeline(DEPLOY / "pipelines" / Path(worker["command"][1]).name)
    assert pipeline.http.preview is True  # the demo stack shows the live preview
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert pipeline.shutdown_grace_s < grace
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == f"worker:{pipeline.http.port}"
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["stop_grace_periods"] = "25s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(schema).validate(broken)


def test_dashboard_and_alerts_query_only_exported_metrics() -> None:
    exported = _exported_metric_names()
    dashboard = json.loads((DEPLOY / "grafana" / "segstream-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= _queried_metrics(target["expr"])
    for variable in dashboard["templating"]["list"]:
        queried |= _queried_metrics(str(variable.get("definition", "")))
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in alerts["groups"][0]["rules"]:
        queried |= _queried_metrics(rule["expr"])
    assert queried <= exported, queried - exported
    # the required metrics all have a panel
    required = {
        "segstream_frames_received_total",
        "segstream_frames_processed_total",
        "segstream_frames_dropped_total",
        "segstream_batch_size_bucket",
        "segstream_model_seconds_bucket",
        "segstream_postprocess_seconds_bucket",
        "segstream_e2e_latency_seconds_bucket",
        "segstream_queue_depth",
        "segstream_outbox_depth",
        "segstream_reconnects_total",
    }
    assert required <= queried, required - queried
