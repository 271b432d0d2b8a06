"""helm/README.md's three steps, done: a chart of one's own with adamwatch as a dependency."""

from __future__ import annotations

import re
import shutil

import kubernetes_validate
import pytest
import yaml

import helm_python as helm

from .chart_render import CHART, REPO_ROOT, matches, of_kind, one

README = REPO_ROOT / "helm" / "README.md"


def readme_block(first_line: str) -> str:
    """The README's fenced code block that starts with ``first_line``."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"no block starting with {first_line!r} in {README}")


@pytest.fixture(scope="module")
def user_release(tmp_path_factory):
    """Render a user's chart built from the README: its Job plus the adamwatch subchart."""
    chart = tmp_path_factory.mktemp("user") / "my-training"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: my-training\nversion: 1.0.0\n"
        "dependencies:\n  - name: adamwatch\n    version: 0.1.0\n"
    )
    # What `helm dependency update` would put there.
    shutil.copytree(CHART, chart / "charts" / "adamwatch")
    (chart / "templates" / "train-job.yaml").write_text(readme_block("# templates/train-job.yaml"))
    values = yaml.safe_load(readme_block("# values.yaml of your chart"))
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name="llm-pretrain", namespace="training")
    return [doc for name, text in rendered.items() if not name.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def test_readme_job_should_render_to_valid_kubernetes(user_release):
    job = one(user_release, "Job")

    for version in ["1.29", kubernetes_validate.utils.latest_version()]:
        kubernetes_validate.validate(job, version, strict=True)


def test_readme_job_should_get_the_native_sidecar_socket_and_env(user_release):
    pod = one(user_release, "Job")["spec"]["template"]["spec"]
    sidecar = pod["initContainers"][0]
    trainer = pod["containers"][0]
    env = {e["name"]: e for e in trainer["env"]}

    assert sidecar["name"] == "adamwatch-sidecar" and sidecar["restartPolicy"] == "Always"
    assert env["ADAMWATCH_ENDPOINT"]["value"] == "unix:///var/run/adamwatch/adamwatch.sock"
    assert env["ADAMWATCH_JOB"]["value"] == "llm-pretrain"
    assert {m["name"] for m in trainer["volumeMounts"]} <= {v["name"] for v in pod["volumes"]}


def test_readme_job_should_be_scraped_and_webhooked_by_the_subchart_resources(user_release):
    job = one(user_release, "Job")
    labels = job["spec"]["template"]["metadata"]["labels"]
    rank0 = labels | {"batch.kubernetes.io/job-name": "llm-pretrain", "batch.kubernetes.io/job-completion-index": "0"}
    rank1 = rank0 | {"batch.kubernetes.io/job-completion-index": "1"}
    control = next(s for s in of_kind(user_release, "Service") if s["metadata"]["name"].endswith("-control"))

    assert matches(one(user_release, "PodMonitor")["spec"]["selector"]["matchLabels"], labels)
    assert one(user_release, "PodMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert matches(control["spec"]["selector"], rank0) and not matches(control["spec"]["selector"], rank1)
    assert one(user_release, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_readme_job_pods_should_mount_the_config_map_and_secret_the_subchart_creates(user_release):
    volumes = {v["name"]: v for v in one(user_release, "Job")["spec"]["template"]["spec"]["volumes"]}
    config_maps = {m["metadata"]["name"] for m in of_kind(user_release, "ConfigMap")}
    secrets = {m["metadata"]["name"] for m in of_kind(user_release, "Secret")}

    assert volumes["adamwatch-config"]["configMap"]["name"] in config_maps
    assert volumes["adamwatch-control-token"]["secret"]["secretName"] in secrets


def test_trainer_env_should_read_the_job_name_from_the_pod_label_when_none_is_set(tmp_path):
    chart = tmp_path / "user"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: user\nversion: 1.0.0\n")
    shutil.copytree(CHART, chart / "charts" / "adamwatch")
    (chart / "templates" / "env.yaml").write_text(
        '{{- $aw := dict "Values" .Values.adamwatch "Release" .Release }}\n'
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: env\ndata:\n"
        '  env: |\n    {{- include "adamwatch.trainerEnv" $aw | nindent 4 }}\n'
    )
    with helm.Chart.load(chart) as loaded:
        for kind, label in [("Job", "batch.kubernetes.io/job-name"), ("PyTorchJob", "training.kubeflow.org/job-name")]:
            rendered = loaded.render({"adamwatch": {"workload": {"kind": kind}}}, name="r", namespace="n")
            env = yaml.safe_load(yaml.safe_load(rendered["user/templates/env.yaml"])["data"]["env"])
            job = next(e for e in env if e["name"] == "ADAMWATCH_JOB")
            assert job["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{label}']"
