"""docker/k8s: every manifest is valid Kubernetes (offline, against the schemas bundled with
kubernetes-validate) and says what serving needs: probes on the right paths, resources, a GPU
variant, an HPA on the deployment, and a grace period longer than the service's own drain."""

from __future__ import annotations

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

pytestmark = pytest.mark.unit

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"
# The oldest Kubernetes still in common use, and the newest the package knows.
VERSIONS = ("1.29.0", kv.utils.latest_version())


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _manifests() -> dict[str, list[dict]]:
    return {p.name: _docs(p.name) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def _by_kind(kind: str) -> list[dict]:
    return [d for docs in _manifests().values() for d in docs if d["kind"] == kind]


def _deployment(name: str) -> dict:
    (d,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == name]
    return d


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(_manifests()))
def test_manifest_is_valid_kubernetes(name: str, version: str) -> None:
    docs = _docs(name)
    assert docs, f"{name} holds no resource"
    for doc in docs:
        # strict: a misspelt or misplaced field is an error, not silently ignored
        kv.validate(doc, version, strict=True)


def test_kustomization_lists_existing_files() -> None:
    (k,) = _docs("kustomization.yaml")
    assert k["kind"] == "Kustomization"
    for res in k["resources"]:
        assert (K8S / res).is_file(), res
    assert "deployment.yaml" in k["resources"]


@pytest.mark.parametrize("name", ["mha-serve", "mha-serve-gpu"])
def test_probes_resources_and_security(name: str) -> None:
    dep = _deployment(name)
    spec = dep["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    c = _container(dep)
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    env = _env(c)
    assert env["MHA_HOST"] == "0.0.0.0"
    assert int(env["MHA_PORT"]) == port

    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
    assert int(env["MHA_GRPC_PORT"]) == grpc_port
    assert c["livenessProbe"]["grpc"] == {
        "port": grpc_port,
        "service": "live",
    }  # grpc.health.v1 (service/frontend/grpc_server.py)
    for probe in ("readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", port), probe

    requests = c["resources"]["requests"]
    assert "cpu" in requests and "memory" in requests
    assert "memory" in c["resources"]["limits"]

    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (docker/Dockerfile)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert env["MHA_CHECKPOINT"].startswith("/models/")


@pytest.mark.parametrize("name", ["mha-serve", "mha-serve-gpu"])
def test_grace_period_outlasts_prestop_and_drain(name: str) -> None:
    """SIGKILL must never cut a drain short: preStop sleep + MHA_SHUTDOWN_GRACE_S < grace period."""
    dep = _deployment(name)
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    drain = float(_env(c)["MHA_SHUTDOWN_GRACE_S"])
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = float(cmd[1])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > drain
    assert grace >= pre_stop + drain + 5, f"grace {grace}s leaves no margin over {pre_stop}s + {drain}s"


def test_cpu_variant_requests_no_gpu_and_sets_threads() -> None:
    c = _container(_deployment("mha-serve"))
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    env = _env(c)
    assert env["MHA_DEVICE"] == "cpu"
    # one torch thread per requested core
    assert int(env["MHA_TORCH_THREADS"]) == int(c["resources"]["requests"]["cpu"])


def test_gpu_variant_requests_a_gpu() -> None:
    dep = _deployment("mha-serve-gpu")
    c = _container(dep)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert _env(c)["MHA_DEVICE"].startswith("cuda")
    tolerations = dep["spec"]["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_gpu_variant_gives_the_arenas_a_dev_shm_they_fit_in() -> None:
    """Each front end and the model process own an arena per peer (service/shm.py), two a front end, each growing to
    MHA_SHM_ARENA_MAX_MIB: all of them at their largest fit the memory volume at /dev/shm (a container's own is
    64 MB), and that volume fits the memory limit."""
    from service.settings import Settings

    dep = _deployment("mha-serve-gpu")
    c = _container(dep)
    env = _env(c)
    s = Settings(workers=int(env["MHA_WORKERS"]), shm_arena_max_mib=int(env["MHA_SHM_ARENA_MAX_MIB"]))
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert vol["emptyDir"]["medium"] == "Memory"
    room = _mib(vol["emptyDir"]["sizeLimit"])
    assert 2 * s.workers * max(s.shm_arena_mib, s.shm_arena_max_mib) <= room
    assert room < _mib(c["resources"]["limits"]["memory"])


def test_hpa_targets_the_deployment() -> None:
    (hpa,) = _by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "mha-serve")
    _deployment(ref["name"])  # exists
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # a Utilization target needs a CPU request on the target's container
    assert "cpu" in _container(_deployment("mha-serve"))["resources"]["requests"]


def test_service_selects_the_pods_on_the_http_port() -> None:
    (svc,) = _by_kind("Service")
    selector = svc["spec"]["selector"].items()
    for name in ("mha-serve", "mha-serve-gpu"):
        assert selector <= _deployment(name)["spec"]["template"]["metadata"]["labels"].items(), name
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http", "grpc"}


def test_volume_claim_matches_the_deployments() -> None:
    (pvc,) = _by_kind("PersistentVolumeClaim")
    for name in ("mha-serve", "mha-serve-gpu"):
        vols = {v["name"]: v for v in _deployment(name)["spec"]["template"]["spec"]["volumes"]}
        assert vols["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]


def test_gpu_variant_runs_the_image_make_docker_build_cuda_builds() -> None:
    """docker/cuda.sh tags the CUDA image; the GPU Deployment must name that image."""
    import re

    cuda_sh = (K8S.parent / "cuda.sh").read_text()
    (tag,) = re.findall(r"IMAGE=\$\{MHA_CUDA_IMAGE:-([^}]+)\}", cuda_sh)
    assert _container(_deployment("mha-serve-gpu"))["image"] == tag
    assert _container(_deployment("mha-serve"))["image"] != tag  # the CPU pods keep the small image


# -- KServe: docker/k8s/kserve/inferenceservice.yaml against KServe's own CRD schema (tests/data/kserve) --

KSERVE_CRD = K8S.parents[1] / "tests" / "data" / "kserve" / "inferenceservice-v1beta1.json"
ISVC = K8S / "kserve" / "inferenceservice.yaml"


@pytest.fixture(scope="module")
def kserve_schema() -> tuple[dict, dict]:
    import json

    from tests.unit.test_k8s_autoscaling import _strict

    crd = json.loads(KSERVE_CRD.read_text())
    return crd, _strict(crd["openAPIV3Schema"])


@pytest.fixture(scope="module")
def isvc() -> dict:
    (d,) = [d for d in yaml.safe_load_all(ISVC.read_text()) if d]
    return d


def test_inference_service_is_valid_against_the_kserve_crd(kserve_schema, isvc) -> None:
    import copy

    jsonschema = pytest.importorskip("jsonschema")
    crd, schema = kserve_schema
    assert isvc["apiVersion"] == f"{crd['group']}/{crd['version']}"
    assert isvc["kind"] == crd["kind"]
    jsonschema.validate(isvc, schema)
    # the strict schema refuses what the API server would: a misspelt field, a wrong type
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["minReplica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_inference_service_serves_on_the_port_kserve_routes_to(isvc) -> None:
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    env = _env(c)
    port = c["ports"][0]["containerPort"]  # KServe sends traffic to the first port
    assert env["MHA_HOST"] == "0.0.0.0"
    assert int(env["MHA_PORT"]) == port
    assert env["MHA_MODEL_NAME"] == isvc["metadata"]["name"]  # /v2/models/{name} is the InferenceService's
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == port, probe
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["image"] == _container(_deployment("mha-serve"))["image"]  # the CPU image
    drain = float(env["MHA_SHUTDOWN_GRACE_S"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert predictor["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    (pvc,) = _by_kind("PersistentVolumeClaim")
    vols = {v["name"]: v for v in predictor["volumes"]}
    assert vols["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert predictor["securityContext"]["runAsUser"] == 10001
