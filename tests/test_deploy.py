"""deploy/: both Kustomize overlays render (kubectl kustomize), every built-in kind in them and beside
them validates offline against a pinned Kubernetes version (kubernetes-validate), and the custom
resources it has no schema for are exactly the ones listed here. The manifests' links to the
service (probe path, the HPA's metric, the preStop drain check) are checked against the real thing."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.32.0"
# kubernetes-validate bundles no schema for these: checked here for their fields only
CUSTOM_KINDS = {"ScaledObject", "ServingRuntime", "InferenceService"}


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed: overlays not rendered")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def plain_manifests() -> list[dict]:
    """The manifests applied on their own (KEDA, KServe), outside the overlays."""
    return [d for path in sorted(DEPLOY.glob("k*/*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def overlay(request):
    return request.param, {d["kind"]: d for d in render(request.param)}


def unvalidated_kinds(docs: list[dict]) -> set[str]:
    """Validate every doc (a schema error raises); return the kinds without a bundled schema."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    unvalidated = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.utils.SchemaNotFoundError:
            unvalidated.add(doc["kind"])
    return unvalidated


def test_every_kind_of_the_overlays_validates(overlay):
    assert set(overlay[1]) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    assert unvalidated_kinds(list(overlay[1].values())) == set()


def test_the_manifests_beside_them_are_the_known_custom_resources():
    assert unvalidated_kinds(plain_manifests()) == CUSTOM_KINDS


def test_the_overlays_differ_where_they_should(overlay):
    name, kinds = overlay
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"llm-serve:{name}"
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if name == "gpu" else None)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http"}
    selector = kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert kinds["Service"]["spec"]["selector"] == selector == kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]


def test_the_autoscalers_scale_on_a_gauge_the_handler_reports():
    handler = (ROOT / "handler" / "llm_handler.py").read_text()
    hpa = yaml.safe_load((DEPLOY / "base" / "hpa.yaml").read_text())
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f'"{metric}"' in handler
    rule = yaml.safe_load((DEPLOY / "prometheus-adapter" / "rules.yaml").read_text())["rules"]["custom"][0]
    assert rule["name"]["as"] == metric and metric in rule["seriesQuery"]
    keda = yaml.safe_load((DEPLOY / "keda" / "scaledobject.yaml").read_text())
    assert metric in keda["spec"]["triggers"][0]["metadata"]["query"]


@pytest.mark.parametrize("running,waiting,busy", [(0, 0, False), (3, 0, True), (0, 12, True), (10, 2, True)])
def test_the_prestop_drain_waits_while_requests_run_or_wait(running, waiting, busy):
    """The preStop hook's pattern against metrics in TorchServe's Prometheus format: it must keep the
    pod alive (match) while a request runs or waits, and let it go (no match) when both are 0."""
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    hook = deployment["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
    pattern = re.search(r"grep -qE '([^']+)'", hook).group(1)
    metrics = (f'llm_requests_running{{Level="Model",Hostname="llm-serve-0"}} {running:.1f}\n'
               f'llm_requests_waiting{{Level="Model",Hostname="llm-serve-0"}} {waiting:.1f}\n'
               f'llm_kv_cache_usage_ratio{{Level="Model",Hostname="llm-serve-0"}} 12.5\n')
    matched = subprocess.run(["grep", "-qE", pattern], input=metrics, text=True).returncode == 0
    assert matched == busy
