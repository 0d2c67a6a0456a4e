"""docker/k8s/autoscaling: the queue-aware autoscaling paths, validated offline.

KEDA's ScaledObject against the CRD's own openAPIV3Schema (vendored in tests/data/keda), the HPA on a
custom metric with kubernetes-validate, prometheus-adapter's rules against a schema of its config
types (tests/data/prometheus-adapter). And what ties them together: the metric the autoscaler reads
is one the service exports, both paths aim at the same target, and each overlay leaves exactly one
HPA on the Deployment.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from service.metrics import Metrics

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
AUTO = K8S / "autoscaling"
DATA = ROOT / "tests" / "data"
# the trigger metadata KEDA's prometheus scaler reads (pkg/scalers/prometheus_scaler.go, v2.20.2)
KEDA_PROMETHEUS_KEYS = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "awsRegion",
    "timeout",
    "identityOwner",
}


def _doc(path: Path) -> dict:
    (d,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return d


def _exported_metrics() -> set[str]:
    text = generate_latest(Metrics().registry).decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def _strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused, as `kubectl apply` with strict field validation does."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    s["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: the API server's, not the CRD's
    return s


@pytest.fixture(scope="module")
def keda_crd() -> dict:
    return json.loads((DATA / "keda" / "scaledobject-v1alpha1.json").read_text())


@pytest.fixture(scope="module")
def scaled_object() -> dict:
    return _doc(AUTO / "keda" / "scaledobject.yaml")


@pytest.fixture(scope="module")
def base_hpa() -> dict:
    return _doc(K8S / "hpa.yaml")


def test_scaled_object_is_valid_against_the_keda_crd(keda_crd, scaled_object):
    assert scaled_object["apiVersion"] == f"{keda_crd['group']}/{keda_crd['version']}"
    assert scaled_object["kind"] == keda_crd["kind"]
    schema = _strict(keda_crd["openAPIV3Schema"])
    jsonschema.validate(scaled_object, schema)
    # the strict schema does refuse what the API server would: a misplaced field, a non-string metadata value
    bad = copy.deepcopy(scaled_object)
    bad["spec"]["minReplicas"] = 2  # that is the HPA's spelling
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(scaled_object)
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 12
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_keda_trigger_reads_an_exported_metric_per_replica(scaled_object, base_hpa):
    spec = scaled_object["spec"]
    ref = spec["scaleTargetRef"]
    assert (ref.get("kind", "Deployment"), ref["name"]) == (
        base_hpa["spec"]["scaleTargetRef"]["kind"],
        base_hpa["spec"]["scaleTargetRef"]["name"],
    )
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
        base_hpa["spec"]["minReplicas"],
        base_hpa["spec"]["maxReplicas"],
    )
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    by_type = {t["type"]: t for t in spec["triggers"]}
    prom = by_type["prometheus"]
    assert set(prom["metadata"]) <= KEDA_PROMETHEUS_KEYS
    assert prom.get("metricType", "AverageValue") == "AverageValue"  # threshold = target per replica
    assert float(prom["metadata"]["threshold"]) > 0
    query = prom["metadata"]["query"]
    names = set(re.findall(r"\b(mha_[a-z_]+)\b", query))
    assert names == {"mha_requests_in_flight"} and names <= _exported_metrics()
    assert query.startswith("sum(")  # KEDA divides the total by the threshold
    (pattern,) = re.findall(r'pod=~"([^"]+)"', query)
    assert re.fullmatch(pattern, "mha-serve-7d9c8b6f4-x2x9q")
    assert not re.fullmatch(pattern, "mha-serve-gpu-7d9c8b6f4-x2x9q")  # the GPU Deployment scales apart
    # CPU stays as a second trigger, at the base HPA's target
    cpu = base_hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"]
    assert by_type["cpu"]["metadata"]["value"] == str(cpu)


def test_keda_overlay_replaces_the_cpu_hpa(base_hpa):
    k = _doc(AUTO / "keda" / "kustomization.yaml")
    for res in k["resources"]:
        p = (AUTO / "keda" / res).resolve()
        assert (p / "kustomization.yaml").is_file() if p.is_dir() else p.is_file(), res
    assert (K8S / "kustomization.yaml").resolve() == (AUTO / "keda" / "../.." / "kustomization.yaml").resolve()
    assert "hpa.yaml" in _doc(K8S / "kustomization.yaml")["resources"]
    (patch,) = k["patches"]
    assert patch["target"]["kind"] == "HorizontalPodAutoscaler"
    assert patch["target"]["name"] == base_hpa["metadata"]["name"]
    body = yaml.safe_load(patch["patch"])
    assert body["$patch"] == "delete" and body["metadata"]["name"] == base_hpa["metadata"]["name"]


@pytest.mark.parametrize("version", ("1.29.0", kv.utils.latest_version()))
def test_custom_metric_hpa_is_valid_kubernetes(version):
    kv.validate(_doc(AUTO / "prometheus-adapter" / "hpa.yaml"), version, strict=True)


def test_custom_metric_hpa_merges_over_the_base_one(base_hpa, scaled_object):
    hpa = _doc(AUTO / "prometheus-adapter" / "hpa.yaml")
    assert hpa["metadata"]["name"] == base_hpa["metadata"]["name"]  # a patch of the base's HPA: still one HPA
    assert hpa["spec"]["scaleTargetRef"] == base_hpa["spec"]["scaleTargetRef"]
    k = _doc(AUTO / "prometheus-adapter" / "kustomization.yaml")
    assert [p["path"] for p in k["patches"]] == ["hpa.yaml"]
    assert (AUTO / "prometheus-adapter" / k["resources"][0] / "kustomization.yaml").is_file()
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    pods = by_type["Pods"]["pods"]
    assert pods["target"]["type"] == "AverageValue"
    keda = {t["type"]: t for t in scaled_object["spec"]["triggers"]}["prometheus"]
    assert float(pods["target"]["averageValue"]) == float(keda["metadata"]["threshold"])  # one target, two paths
    assert by_type["Resource"] == base_hpa["spec"]["metrics"][0]  # CPU as before


def test_adapter_rules_follow_the_adapter_config_and_feed_the_hpa():
    schema = json.loads((DATA / "prometheus-adapter" / "config.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    # the schema accepts the adapter's own sample, and refuses a misspelt field
    jsonschema.validate(yaml.safe_load((DATA / "prometheus-adapter" / "sample-config.yaml").read_text()), schema)
    cfg = _doc(AUTO / "prometheus-adapter" / "adapter-rules.yaml")
    jsonschema.validate(cfg, schema)
    bad = copy.deepcopy(cfg)
    bad["rules"][0]["metricQuery"] = bad["rules"][0].pop("metricsQuery")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)

    exported = _exported_metrics()
    served = {}
    for rule in cfg["rules"]:
        (series,) = re.findall(r"^(mha_[a-z_]+)\{", rule["seriesQuery"])
        assert series in exported
        assert re.search(rule["name"]["matches"], series)
        served[re.sub(rule["name"]["matches"], rule["name"]["as"], series)] = rule
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        assert {o["resource"] for o in rule["resources"]["overrides"].values()} == {"namespace", "pod"}
        for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert part in rule["metricsQuery"]
    hpa = _doc(AUTO / "prometheus-adapter" / "hpa.yaml")
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["metric"]["name"] in served
