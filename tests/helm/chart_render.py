"""Helpers of the Helm chart tests: the chart, its values files, rendered manifests.

Rendering goes through helm-python-sdk (Helm's Go SDK, offline); manifests are
parsed with PyYAML as a Kubernetes API server would read them.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import yaml

import helm_python as helm

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "adamwatch"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "demo"
NAMESPACE = "ml"

# "default" renders values.yaml alone; the others add one ci/*-values.yaml each.
VALUES_CASES = ["default"] + [path.name for path in CI_VALUES]


def values_of(case: str) -> dict[str, Any] | None:
    """The values a case passes on top of the chart's defaults (None for "default")."""
    if case == "default":
        return None
    return yaml.safe_load((CHART / "ci" / case).read_text()) or {}


@functools.lru_cache(maxsize=None)
def _render_case(case: str) -> tuple[tuple[str, str], ...]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values_of(case), name=RELEASE, namespace=NAMESPACE)
    return tuple(sorted(rendered.items()))


def render(values: dict[str, Any] | None = None, *, release: str = RELEASE) -> list[dict[str, Any]]:
    """Render the chart with ``values`` and return every manifest as a dict.

    Args:
        values: values on top of the chart's defaults.
        release: the release name.

    Returns:
        The manifests in template order, NOTES.txt and empty documents left out.
    """
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=release, namespace=NAMESPACE)
    return _parse(sorted(rendered.items()))


def render_case(case: str) -> list[dict[str, Any]]:
    """Render one of VALUES_CASES (cached: the chart is rendered once per case)."""
    return _parse(_render_case(case))


def _parse(rendered: Any) -> list[dict[str, Any]]:
    manifests = []
    for template, text in rendered:
        if template.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                manifests.append(document)
    return manifests


def notes_of(values: dict[str, Any] | None = None) -> str:
    """The rendered NOTES.txt."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for template, text in rendered.items() if template.endswith("NOTES.txt"))


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The manifests of one kind."""
    return [manifest for manifest in manifests if manifest["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The only manifest of a kind; fails when there is none or more than one."""
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def pod_templates(manifests: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod template of a workload: (a description, the template)."""
    templates = []
    for manifest in manifests:
        if manifest["kind"] == "Job":
            templates.append((f"Job {manifest['metadata']['name']}", manifest["spec"]["template"]))
        elif manifest["kind"] == "PyTorchJob":
            for role, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
                templates.append((f"PyTorchJob {role}", spec["template"]))
    return templates


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-style selector selects an object with ``labels``."""
    return all(labels.get(key) == value for key, value in selector.items())
