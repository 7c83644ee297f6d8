"""Deployment manifests validated offline: every Kubernetes object of each overlay against the API
schemas, the compose file against the Compose specification, and both against the code (stage
commands, NATS users and permissions, drain time)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from proto import events as ev
from services.cli import build_parser
from services.runtime.config import RuntimeConfig
from services.tools import natsconf

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
OVERLAYS = ("dev", "prod")
# the Compose Specification schema as shipped by docker-compose 1.29.2 (Apache-2.0)
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/k8s"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_every_object_is_valid_for_the_kubernetes_api(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"].get("namespace") == "voicebus" or obj["kind"] == "Namespace"


def test_each_stage_runs_its_command_with_its_own_nats_user(objects: list[dict[str, Any]]) -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    stages = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in of(objects, "Deployment")
        if d["metadata"]["name"].startswith("voicebus-")
    }
    assert set(stages) == set(ev.STAGES)
    drain = RuntimeConfig().drain_timeout_s
    for stage, deployment in stages.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == [stage] and stage in commands
        env = {e["name"]: e for e in container["env"]}
        assert env["VB_NATS_USER"]["value"] == stage
        assert env["VB_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == stage
        assert pod["terminationGracePeriodSeconds"] > drain
        paths = {p["httpGet"]["path"] for p in (container["readinessProbe"], container["livenessProbe"])}
        assert paths == {"/readyz", "/healthz"}
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_every_stage_has_a_disruption_budget_and_an_autoscaler(objects: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in of(objects, "Deployment")}
    for stage in ev.STAGES:
        name = f"voicebus-{stage}"
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        (pdb,) = [p for p in of(objects, "PodDisruptionBudget") if p["metadata"]["name"] == name]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (hpa,) = [h for h in of(objects, "HorizontalPodAutoscaler") if h["metadata"]["name"] == name]
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        kinds = {m["type"] for m in hpa["spec"]["metrics"]}
        assert kinds == {"Resource", "Pods"}
        assert any(
            m.get("pods", {}).get("metric", {}).get("name") == "vb_sessions_owned"
            for m in hpa["spec"]["metrics"]
        )


def test_services_select_pods_that_exist(objects: list[dict[str, Any]]) -> None:
    pods = [
        w["spec"]["template"]["metadata"]["labels"]
        for w in objects
        if w["kind"] in ("Deployment", "StatefulSet")
    ]
    for service in of(objects, "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pods), service["metadata"]["name"]


def test_nats_configuration_is_the_generated_one() -> None:
    assert (K8S / "base" / "nats" / "nats.conf").read_text() == natsconf.render()
    assert (K8S / "overlays" / "prod" / "nats.conf").read_text() == natsconf.render(tls_dir="/etc/nats-tls")
    dev = render("dev")
    (config,) = [c for c in of(dev, "ConfigMap") if c["metadata"]["name"].startswith("nats-config")]
    assert config["data"]["nats.conf"] == natsconf.render()
    (server_secret,) = [
        s for s in of(dev, "Secret") if s["metadata"]["name"].startswith("voicebus-nats-server")
    ]
    assert set(server_secret["data"]) == {
        natsconf.password_variable(u) for u in (*ev.STAGES, natsconf.EDGE_USER)
    }


def test_prod_talks_to_nats_over_tls() -> None:
    prod = render("prod")
    (env,) = [c for c in of(prod, "ConfigMap") if c["metadata"]["name"].startswith("voicebus-env")]
    assert env["data"]["VB_NATS_URL"].startswith("tls://")
    (config,) = [c for c in of(prod, "ConfigMap") if c["metadata"]["name"].startswith("nats-config")]
    assert "tls {" in config["data"]["nats.conf"]


def test_compose_file_follows_the_compose_spec_and_the_code() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).validate(compose)
    services = compose["services"]
    assert {"nats", "jaeger", "livekit", *ev.STAGES} <= set(services)
    for stage in ev.STAGES:
        service = services[stage]
        assert service["command"] == [stage]
        assert service["environment"]["VB_NATS_USER"] == stage
        assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:")
        assert (ROOT / service["build"]["dockerfile"]).exists()
    mounted = services["nats"]["volumes"][0].split(":")[0]
    assert (ROOT / mounted).resolve() == (K8S / "base" / "nats" / "nats.conf").resolve()
    for user in (*ev.STAGES, natsconf.EDGE_USER):
        assert natsconf.password_variable(user) in services["nats"]["environment"]
