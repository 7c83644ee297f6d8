"""Deployment manifests validated offline: every Kubernetes object of each overlay against the API
schemas, the compose file against the Compose specification, and both against the code (stage
commands, NATS users and permissions, drain time)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from proto import events as ev
from services.cli import build_parser
from services.runtime import health, metrics
from services.runtime.config import RuntimeConfig
from services.tools import natsconf

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
OVERLAYS = ("dev", "prod")
# the Compose Specification schema as shipped by docker-compose 1.29.2 (Apache-2.0)
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"
CLUSTER_SCOPED = {"Namespace", "ClusterRoleBinding", "APIService"}
# the custom metrics adapter reads the API server's client CA where it lives
KUBE_SYSTEM = {("RoleBinding", "voicebus-prometheus-adapter-auth-reader"): "kube-system"}
# the API server's own port behind the kubernetes Service (443 or 6443, depending on the cluster)
APISERVER_PORTS = (443, 6443)


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
        kind, name = obj["kind"], obj["metadata"]["name"]
        namespace = None if kind in CLUSTER_SCOPED else KUBE_SYSTEM.get((kind, name), "voicebus")
        assert obj["metadata"].get("namespace") == namespace, (kind, name)


def test_each_stage_runs_its_command_with_its_own_nats_user(objects: list[dict[str, Any]]) -> None:
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    services = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in of(objects, "Deployment")
        if d["metadata"]["name"].startswith("voicebus-")
    }
    assert set(services) == {*ev.STAGES, "gateway"}
    drain = RuntimeConfig().drain_timeout_s
    for name, deployment in services.items():
        user = natsconf.EDGE_USER if name == "gateway" else name
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == [name] and name in commands
        env = {e["name"]: e for e in container["env"]}
        assert env["VB_NATS_USER"]["value"] == user
        assert env["VB_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == user
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


def test_nats_runs_as_many_go_threads_as_the_cores_it_requests(objects: list[dict[str, Any]]) -> None:
    nats = named(objects, "StatefulSet", "nats")
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    source = env_of(nats)["GOMAXPROCS"]["valueFrom"]["resourceFieldRef"]
    assert source["resource"] == "requests.cpu" and str(source["divisor"]) == "1"
    assert "cpu" in container["resources"]["requests"]  # without a request it would be the node's cores


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
    gateway = services["gateway"]
    assert gateway["command"] == ["gateway"]
    assert gateway["environment"]["VB_NATS_USER"] == natsconf.EDGE_USER
    port = gateway["environment"]["VB_GATEWAY_PORT"]
    assert f"{port}:{port}" in gateway["ports"]
    livekit_port = services["livekit"]["ports"][0].split(":")[0]
    for name in ("ingress", "egress", "gateway"):
        env = services[name]["environment"]
        assert env["LIVEKIT_URL"].endswith(f"ws://livekit:{livekit_port}}}")
        assert {"LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"} <= set(env)


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_the_gateway_is_reachable_and_the_livekit_edge_shares_one_key(objects: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in of(objects, "Deployment")}
    gateway = deployments["voicebus-gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    port = int(env_of(gateway)["VB_GATEWAY_PORT"]["value"])
    assert {"name": "api", "containerPort": port} in container["ports"]
    (service,) = [s for s in of(objects, "Service") if s["metadata"]["name"] == "voicebus-gateway"]
    assert service["spec"]["ports"][0]["targetPort"] == "api"
    (policy,) = [p for p in of(objects, "NetworkPolicy") if p["metadata"]["name"] == "gateway-public"]
    assert {"port": port} in policy["spec"]["ingress"][0]["ports"]
    (livekit,) = [s for s in of(objects, "Service") if s["metadata"]["name"] == "livekit"]
    for name in ("voicebus-ingress", "voicebus-egress", "voicebus-gateway"):
        env = env_of(deployments[name])
        assert env["LIVEKIT_URL"]["value"] == f"ws://livekit:{livekit['spec']['ports'][0]['port']}"
        refs = {k: env[k]["valueFrom"]["secretKeyRef"] for k in ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")}
        assert all(r["name"].startswith("voicebus-livekit") for r in refs.values())  # dev: name-hash
    for stage, provider in (("stt", "deepgram"), ("dialogue", "anthropic"), ("tts", "elevenlabs")):
        ref = env_of(deployments[f"voicebus-{stage}"])[f"{provider.upper()}_API_KEY"]["valueFrom"][
            "secretKeyRef"
        ]
        assert ref["name"].startswith("voicebus-providers")
        assert (ref["key"], ref["optional"]) == (provider, True)


def test_dev_livekit_server_and_services_use_the_same_key_pair() -> None:
    dev = render("dev")
    (secret,) = [s for s in of(dev, "Secret") if s["metadata"]["name"].startswith("voicebus-livekit")]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["keys"] == f"{data['api-key']}: {data['api-secret']}"


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of a kind with that name, or that name and a generator's hash suffix."""
    pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]{{10}})?")
    (obj,) = [o for o in of(objects, kind) if pattern.fullmatch(o["metadata"]["name"])]
    return obj


def stage_deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The five stages and the gateway: every Deployment made from base/stage."""
    return [d for d in of(objects, "Deployment") if d["metadata"]["name"].startswith("voicebus-")]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def backend(objects: list[dict[str, Any]], host: str, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The workload and its container port that ``host:port`` (a Service of the namespace) leads to."""
    service = named(objects, "Service", host)
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    (workload,) = [
        w
        for w in objects
        if w["kind"] in ("Deployment", "StatefulSet")
        and service["spec"]["selector"].items() <= pod_labels(w).items()
    ]
    target = service_port.get("targetPort", port)
    (container_port,) = [
        p
        for c in workload["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
        if target in (p.get("name"), p["containerPort"])
    ]
    return workload, container_port


def mounted_config(objects: list[dict[str, Any]], workload: dict[str, Any], key: str) -> tuple[str, Any]:
    """(path in the container, parsed content) of the ConfigMap file ``key`` a workload mounts."""
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for volume in pod["volumes"]:
        config = volume.get("configMap")
        if config is None:
            continue
        data = named(objects, "ConfigMap", config["name"])["data"]
        if key in data:
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
            return f"{mount['mountPath']}/{key}", yaml.safe_load(data[key])
    raise AssertionError(f"{workload['metadata']['name']} mounts no ConfigMap with {key}")


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, and matchExpressions with In: all these manifests use)."""
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def allowed(
    objects: list[dict[str, Any]], src: dict[str, str] | None, dst: dict[str, str] | None, port: int
) -> bool:
    """Whether the NetworkPolicies let pods labelled ``src`` open ``port`` on pods labelled ``dst``.
    Pods are peers through podSelectors, ipBlocks stand for addresses outside the namespace's pods.
    None is the API server: not a pod here, so not fenced, and reached only through a peerless rule or
    an ipBlock without exceptions (its address is the cluster's own)."""

    def admits(rule: dict[str, Any], key: str, peer: dict[str, str] | None) -> bool:
        if "ports" in rule and not any(p.get("port") == port for p in rule["ports"]):
            return False
        if key not in rule:
            return True
        if peer is None:
            return any("ipBlock" in p and "except" not in p["ipBlock"] for p in rule[key])
        return any("podSelector" in p and selects(p["podSelector"], peer) for p in rule[key])

    def side(pod: dict[str, str] | None, kind: str, key: str, peer: dict[str, str] | None) -> bool:
        if pod is None:
            return True
        policies = [
            p["spec"]
            for p in of(objects, "NetworkPolicy")
            if kind in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod)
        ]
        return not policies or any(admits(r, key, peer) for p in policies for r in p.get(kind.lower(), []))

    return side(src, "Egress", "to", dst) and side(dst, "Ingress", "from", src)


def test_stages_trace_through_the_collector_to_jaeger(objects: list[dict[str, Any]]) -> None:
    endpoint = urlsplit(named(objects, "ConfigMap", "voicebus-env")["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.scheme == "http" and endpoint.hostname and endpoint.port
    collector, otlp_http = backend(objects, endpoint.hostname, endpoint.port)
    (container,) = collector["spec"]["template"]["spec"]["containers"]
    path, config = mounted_config(objects, collector, "config.yaml")
    assert container["args"] == [f"--config={path}"]
    # the stages export OTLP/HTTP (services/runtime/tracing.py): the receiver listens where the Service leads
    receiver = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert receiver == f"0.0.0.0:{otlp_http['containerPort']}"
    health = int(config["extensions"]["health_check"]["endpoint"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[container["livenessProbe"]["httpGet"]["port"]] == health
    assert ports[container["readinessProbe"]["httpGet"]["port"]] == health
    assert "health_check" in config["service"]["extensions"]
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["processors"][0] == "memory_limiter"
    (exporter,) = pipeline["exporters"]
    assert exporter.split("/")[0] == "otlp"  # OTLP over gRPC
    host, _, port = config["exporters"][exporter]["endpoint"].rpartition(":")
    jaeger, otlp_grpc = backend(objects, host, int(port))
    assert jaeger["metadata"]["name"] == "jaeger" and otlp_grpc["name"] == "otlp-grpc"
    collector_pod, jaeger_pod = pod_labels(collector), pod_labels(jaeger)
    for deployment in stage_deployments(objects):
        assert allowed(objects, pod_labels(deployment), collector_pod, endpoint.port)
        assert not allowed(objects, pod_labels(deployment), jaeger_pod, int(port))
    assert allowed(objects, collector_pod, jaeger_pod, int(port))


def adapter_metric(rule: dict[str, Any]) -> tuple[str, str]:
    """(Prometheus series, custom metric name) of a prometheus-adapter rule: ``name.matches`` (default
    ``.*``) renamed by ``name.as`` (default ``$1`` with one group, else ``$0``)."""
    series = re.match(r"\w+", rule["seriesQuery"])
    assert series, "rules select one series by name"
    naming = rule.get("name", {})
    match = re.search(naming.get("matches", ".*"), series.group())
    assert match, rule
    template = naming.get("as", "$1" if match.re.groups == 1 else "$0")
    return series.group(), re.sub(r"\$\{?(\d+)\}?", lambda m: match.group(int(m.group(1))), template)


def discovers(job: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a scrape job's pod discovery finds pods with these labels (selectors ``key in (a,b)``)."""
    for sd in job["kubernetes_sd_configs"]:
        assert sd["role"] == "pod" and sd["namespaces"] == {"own_namespace": True}
        for selector in sd.get("selectors", []):
            found = re.fullmatch(r"(\S+) in \((.*)\)", selector["label"])
            assert found, selector
            if labels.get(found.group(1)) not in found.group(2).split(","):
                return False
    return True


def may(objects: list[dict[str, Any]], workload: dict[str, Any], verb: str, resource: str) -> bool:
    """Whether a workload's ServiceAccount may ``verb`` the namespace's ``resource`` (core group)."""
    account = workload["spec"]["template"]["spec"]["serviceAccountName"]
    assert named(objects, "ServiceAccount", account)
    subject = {"kind": "ServiceAccount", "name": account, "namespace": "voicebus"}
    return any(
        subject in binding["subjects"]
        and any(
            "" in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
            for rule in named(objects, binding["roleRef"]["kind"], binding["roleRef"]["name"])["rules"]
        )
        for binding in of(objects, "RoleBinding")
        if binding["metadata"]["namespace"] == "voicebus"
    )


def args_of(workload: dict[str, Any]) -> dict[str, str]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


class CustomMetrics(NamedTuple):
    """The sessions metric's way to the autoscalers: API server -> adapter (rules) -> Prometheus (job)."""

    adapter: dict[str, Any]
    adapter_port: int
    rules: list[dict[str, Any]]
    prometheus: dict[str, Any]
    prometheus_port: int
    job: dict[str, Any]


def custom_metrics(objects: list[dict[str, Any]]) -> CustomMetrics:
    """Follow the APIService to the adapter and the adapter's --prometheus-url to Prometheus."""
    (api,) = of(objects, "APIService")
    assert (api["spec"]["group"], api["spec"]["version"]) == ("custom.metrics.k8s.io", "v1beta1")
    assert api["spec"]["service"]["namespace"] == "voicebus"
    adapter, https = backend(objects, api["spec"]["service"]["name"], api["spec"]["service"]["port"])
    adapter_args = args_of(adapter)
    assert int(adapter_args["secure-port"]) == https["containerPort"]
    rules_path, rules = mounted_config(objects, adapter, "rules.yaml")
    assert adapter_args["config"] == rules_path
    url = urlsplit(adapter_args["prometheus-url"])
    assert url.hostname and url.port
    prometheus, http = backend(objects, url.hostname, url.port)
    scrape_path, scrape = mounted_config(objects, prometheus, "prometheus.yml")
    assert args_of(prometheus)["config.file"] == scrape_path
    (job,) = scrape["scrape_configs"]
    return CustomMetrics(
        adapter, https["containerPort"], rules["rules"], prometheus, http["containerPort"], job
    )


def test_the_custom_metrics_api_is_the_adapter_reading_prometheus(objects: list[dict[str, Any]]) -> None:
    path = custom_metrics(objects)
    adapter, prometheus = pod_labels(path.adapter), pod_labels(path.prometheus)
    assert may(objects, path.prometheus, "list", "pods") and may(objects, path.prometheus, "watch", "pods")
    assert may(objects, path.adapter, "list", "pods")
    # the API server reaches the adapter, the adapter Prometheus, and both the API server
    assert allowed(objects, None, adapter, path.adapter_port)
    assert allowed(objects, adapter, prometheus, path.prometheus_port)
    for client in (adapter, prometheus):
        assert all(allowed(objects, client, None, port) for port in APISERVER_PORTS)
    for stage in stage_deployments(objects):
        assert not allowed(objects, pod_labels(stage), prometheus, path.prometheus_port)


def test_the_sessions_autoscalers_read_what_prometheus_scrapes_from_the_stages(
    objects: list[dict[str, Any]],
) -> None:
    path = custom_metrics(objects)
    # Prometheus keeps the targets on the port, and scrapes the path, the stages serve metrics on
    port = int(named(objects, "ConfigMap", "voicebus-env")["data"]["VB_HTTP_PORT"])
    (keep,) = [r for r in path.job["relabel_configs"] if r.get("action") == "keep"]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_container_port_number"]
    assert re.fullmatch(keep["regex"], str(port))
    server = health.HealthServer("127.0.0.1", port, lambda: (True, ""))
    assert path.job.get("metrics_path", "/metrics") in {r.canonical for r in server.app.router.resources()}
    # and labels each series with the pod and namespace the adapter maps back to objects
    relabelled = {
        r["target_label"]: r["source_labels"] for r in path.job["relabel_configs"] if "target_label" in r
    }
    sources = {"pod": ["__meta_kubernetes_pod_name"], "namespace": ["__meta_kubernetes_namespace"]}
    served = {adapter_metric(r)[1]: r for r in path.rules}
    deployments = {d["metadata"]["name"]: d for d in of(objects, "Deployment")}
    scaled = 0
    for hpa in of(objects, "HorizontalPodAutoscaler"):
        for metric in (m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"):
            rule = served[metric]  # the adapter serves it
            assert adapter_metric(rule)[0] == metrics.sessions_owned.describe()[0].name  # the code's gauge
            for label, resource in rule["resources"]["overrides"].items():
                assert relabelled[label] == sources[resource["resource"]]
            stage = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
            pod = stage["spec"]["template"]
            assert discovers(path.job, pod["metadata"]["labels"])
            assert port in [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]]
            assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
            assert allowed(objects, pod_labels(path.prometheus), pod["metadata"]["labels"], port)
            scaled += 1
    assert scaled == len(ev.STAGES)
