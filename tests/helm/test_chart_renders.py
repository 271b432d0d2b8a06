"""The chart lints, renders, and every manifest is valid Kubernetes (1.29 and newest)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml

import helm_python as helm

from .chart_render import CHART, VALUES_CASES, of_kind, one, render, render_case, values_of

OLDEST_KUBERNETES = "1.29"
NEWEST_KUBERNETES = kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())

# Kinds kubernetes-validate has no schema for: Prometheus Operator CRDs and the
# Kubeflow PyTorchJob. tests/helm/test_monitoring.py and test_attach.py check
# their fields by hand.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig"),
    ("kubeflow.org/v1", "PyTorchJob"),
}


@pytest.mark.parametrize("case", VALUES_CASES)
@pytest.mark.parametrize("kube_version", [f"v{OLDEST_KUBERNETES}.0", f"v{NEWEST_KUBERNETES}.0"])
def test_chart_should_lint_without_warnings(case, kube_version):
    report = helm.lint(CHART, values_of(case), strict=True, kube_version=kube_version)

    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert problems == [] and report["errors"] == []


def test_chart_should_require_kubernetes_1_29_for_native_sidecars():
    chart_yaml = yaml.safe_load((CHART / "Chart.yaml").read_text())

    assert chart_yaml["kubeVersion"] == ">=1.29.0-0"


@pytest.mark.parametrize("case", VALUES_CASES)
@pytest.mark.parametrize("kube_version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_every_rendered_manifest_should_be_valid_kubernetes_in_strict_mode(case, kube_version):
    manifests = render_case(case)
    assert manifests, "nothing rendered"

    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']}: {error.message} at {list(error.path)}")


@pytest.mark.parametrize("case", VALUES_CASES)
def test_every_manifest_should_be_named_within_63_characters_and_namespaced(case):
    for manifest in render_case(case):
        name = manifest["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert manifest["metadata"]["namespace"], name


@pytest.mark.parametrize("case", VALUES_CASES)
def test_no_two_manifests_should_share_kind_and_name(case):
    keys = [(m["kind"], m["metadata"]["name"]) for m in render_case(case)]

    assert len(keys) == len(set(keys))


def test_only_known_custom_kinds_should_bypass_schema_validation():
    rendered = {(m["apiVersion"], m["kind"]) for case in VALUES_CASES for m in render_case(case)}

    assert CUSTOM_KINDS <= rendered, f"never rendered: {CUSTOM_KINDS - rendered}"


def test_kubernetes_validate_should_reject_an_unknown_field_so_strict_mode_means_something():
    service = one(render_case("default"), "Service")
    service["spec"]["selectorr"] = service["spec"]["selector"]

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, OLDEST_KUBERNETES, strict=True)


def test_default_values_should_render_the_monitoring_but_no_workload():
    kinds = sorted({m["kind"] for m in render_case("default")})

    assert kinds == [
        "AlertmanagerConfig",
        "ConfigMap",
        "PodMonitor",
        "PrometheusRule",
        "Secret",
        "Service",
    ]
    assert of_kind(render_case("default"), "Job") == []


def test_minimal_values_should_render_only_the_sidecar_config_and_token():
    kinds = sorted(m["kind"] for m in render_case("minimal-values.yaml"))

    assert kinds == ["ConfigMap", "Secret"]


def test_a_long_release_name_should_still_give_valid_names_and_label_values():
    release = "llm-pretraining-run-with-a-very-long-release-name-x53"  # Helm's longest
    assert len(release) == 53
    helm.validate_release_name(release)
    manifests = render({"example": {"enabled": True}, "serviceMonitor": {"enabled": True}}, release=release)

    for manifest in manifests:
        name = manifest["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if (manifest["apiVersion"], manifest["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(manifest, OLDEST_KUBERNETES, strict=True)
    pod_labels = one(manifests, "Job")["spec"]["template"]["metadata"]["labels"]
    assert all(len(value) <= 63 for value in pod_labels.values())
    assert len({m["metadata"]["name"] for m in of_kind(manifests, "ConfigMap")}) == len(of_kind(manifests, "ConfigMap"))
