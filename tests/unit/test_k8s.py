"""The Kubernetes manifests (docker/k8s/) checked without a cluster: against the Kubernetes API
schemas of current releases (kubernetes-validate, strict: an unknown or misspelled field fails),
and for what holds them together: selectors, the gateway's configuration, the autoscaler's
metric and its query, tritonserver's options."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from client.gateway.config import parse_config
from serving.server import Ports, server_command

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
VERSIONS = ("1.33.0", "1.37.0")  # an older release still maintained by most platforms, and the newest


def _documents() -> list[dict]:
    return [d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d]


def _one(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in _documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(version):
    docs = _documents()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "ConfigMap",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_misspelled_field():
    deployment = _one("Deployment", "battery-triton")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"periodSeconds": 5}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_services_budget_and_autoscaler_point_at_the_triton_pods():
    deployment = _one("Deployment", "battery-triton")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    headless = _one("Service", "battery-triton-grpc")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"].items() <= labels.items()
    budget = _one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2  # one replica is a single point of failure
    rollout = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0 and rollout["maxSurge"] == 1  # one replica at a time, never fewer


def test_readiness_tolerates_a_model_swap_and_liveness_is_the_inference_probe():
    (container,) = _one("Deployment", "battery-triton")["spec"]["template"]["spec"]["containers"]
    ready = container["readinessProbe"]
    # a version swap makes /v2/health/ready say no for ~4 s (strict readiness; docs/operations.md)
    assert ready["httpGet"]["path"] == "/v2/health/ready" and ready["periodSeconds"] * ready["failureThreshold"] >= 20
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:3] == ["python3", "-m", "serving.probe"]
    out = subprocess.run([sys.executable, *command[1:], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "liveness probe" in out.stdout, out.stderr


def test_the_tritonserver_options_in_the_manifest_exist():
    (container,) = _one("Deployment", "battery-triton")["spec"]["template"]["spec"]["containers"]
    cmd, env = server_command(ROOT / "model_repository", Ports())
    out = subprocess.run([cmd[0], "--help"], env=env, capture_output=True, text=True, timeout=60)
    help_text = out.stdout + out.stderr
    for arg in container["args"]:
        option = arg.split("=")[0]
        assert re.search(rf"^\s+{re.escape(option)} ", help_text, re.M), f"tritonserver has no option {option}"


def test_the_gateway_configuration_in_the_configmap_loads_and_lives_on_the_volumes():
    config_map = _one("ConfigMap", "battery-gateway-line1")
    cfg = parse_config(yaml.safe_load(config_map["data"]["gateway.yaml"]))
    headless = _one("Service", "battery-triton-grpc")
    name, namespace = headless["metadata"]["name"], headless["metadata"]["namespace"]
    assert cfg.triton.url == f"dns:///{name}.{namespace}.svc.cluster.local:{headless['spec']['ports'][0]['port']}"
    deployment = _one("Deployment", "battery-gateway-line1")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"  # one writer of the outbox
    (container,) = spec["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    claim = volumes["outbox"]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)
    assert Path(cfg.outbox).is_relative_to(mounts["outbox"])  # the outbox survives the pod
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert container["args"][-1] == f"{mounts['config']}/gateway.yaml"
    for station in cfg.stations:
        assert any(Path(station.image_root).is_relative_to(m) for m in mounts.values())
    assert container["ports"][0]["containerPort"] == cfg.metrics_port


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_the_autoscalers_metric_is_the_adapters_rule_and_its_query_gives_the_queue_time_per_pod(tmp_path):
    (rule,) = yaml.safe_load(_one("ConfigMap", "adapter-config")["data"]["config.yaml"])["rules"]
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    # the adapter's query for pods a and b, as it renders it
    query = (
        rule["metricsQuery"]
        .replace("<<.LabelMatchers>>", 'namespace="battery",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )

    # pod a: 60 requests a minute to each network; the CT classifier's wait 0.1 s each, the
    # autoencoder's 0.02 s; pod b idle
    def labels(pod: str, model: str) -> str:
        return f'{{namespace="battery",pod="{pod}",model="{model}",version="1"}}'

    series = [
        ("nv_inference_queue_duration_us" + labels("a", "ct_classifier"), "0+6000000x10"),
        ("nv_inference_request_success" + labels("a", "ct_classifier"), "0+60x10"),
        ("nv_inference_queue_duration_us" + labels("a", "rgb_autoencoder"), "0+1200000x10"),
        ("nv_inference_request_success" + labels("a", "rgb_autoencoder"), "0+60x10"),
        ("nv_inference_queue_duration_us" + labels("b", "ct_classifier"), "0+0x10"),
        ("nv_inference_request_success" + labels("b", "ct_classifier"), "0+0x10"),
    ]
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "5m",
                        "exp_samples": [{"labels": '{pod="a"}', "value": 0.1}, {"labels": '{pod="b"}', "value": 0}],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "adapter_test.yml"
    path.write_text(yaml.safe_dump(test))
    out = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
