"""deploy/kubernetes/: every object valid against the Kubernetes schemas (kubernetes-validate, strict: no
unknown fields), and consistent with itself and with kvroute (its args parse as `kvroute serve` flags,
probes hit the router's endpoints, the RBAC covers what discovery calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvroute.router.cli import build_serve_parser, config_from_args

kubernetes_validate = pytest.importorskip("kubernetes_validate")

MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
K8S_VERSION = "1.32"  # a release the schemas cover; the objects use only long-stable APIs


def objects() -> list[dict[str, Any]]:
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in objects() if o["kind"] == kind]


@pytest.mark.parametrize("obj", objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_valid_against_the_kubernetes_schemas(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):  # a CRD: no schema in kubernetes-validate
        assert obj["kind"] == "ServiceMonitor" and obj["spec"]["endpoints"][0]["path"] == "/metrics"
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises ValidationError


def test_an_invalid_object_is_caught() -> None:
    """The check can fail: a misspelt field in the Deployment is rejected."""
    (deploy,) = by_kind("Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)


def test_wired_together_and_to_kvroute() -> None:
    (deploy,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    (account,) = by_kind("ServiceAccount")
    (role,) = by_kind("Role")
    (binding,) = by_kind("RoleBinding")
    (monitor,) = by_kind("ServiceMonitor")
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert container["livenessProbe"]["httpGet"]["path"] == "/liveness"
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (rule,) = role["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])

    args = container["args"]
    assert args[0] == "serve"
    config = config_from_args(build_serve_parser().parse_args(args[1:]), environ={})  # ConfigError if not
    assert config.discovery == "kubernetes" and config.selector
    assert (
        config.service_discovery_namespace == role["metadata"]["namespace"] == deploy["metadata"]["namespace"]
    )
    assert config.port == container["ports"][0]["containerPort"] and config.host == "0.0.0.0"
