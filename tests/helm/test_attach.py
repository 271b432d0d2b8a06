"""The sidecar attached to a training pod: native sidecar, shared socket, probes, security.

The acceptance: a rendered example Job, given to a Kubernetes 1.29+ API server,
creates pods whose trainer reaches the sidecar over the shared socket, whose
sidecar is scraped by the PodMonitor and whose rank 0 receives the webhook.
Each agreement of names, labels, selectors, ports and volumes is one test.
"""

from __future__ import annotations

import base64

import pytest
import yaml

from .chart_render import (
    NAMESPACE,
    RELEASE,
    matches,
    of_kind,
    one,
    pod_templates,
    render,
    render_case,
)

WORKLOAD_CASES = [
    "example-job-values.yaml",
    "pytorchjob-values.yaml",
    "networkpolicy-values.yaml",
    "servicemonitor-values.yaml",
    "secrets-values.yaml",
]
SOCKET = "/var/run/adamwatch/adamwatch.sock"


def trainer_pods(case: str) -> list[tuple[str, dict]]:
    return pod_templates(render_case(case))


def sidecar_of(pod: dict) -> dict:
    sidecars = [c for c in pod["spec"].get("initContainers", []) if c["name"] == "adamwatch-sidecar"]
    assert len(sidecars) == 1, "one adamwatch-sidecar init container"
    return sidecars[0]


def trainer_of(pod: dict) -> dict:
    assert len(pod["spec"]["containers"]) == 1
    return pod["spec"]["containers"][0]


def pods_created_by(manifests: list[dict]) -> list[dict[str, str]]:
    """The labels of the pods the Job controller / training operator would create."""
    pods = []
    for job in of_kind(manifests, "Job"):
        name = job["metadata"]["name"]
        for index in range(job["spec"]["completions"]):
            pods.append(
                job["spec"]["template"]["metadata"]["labels"]
                | {
                    "batch.kubernetes.io/job-name": name,
                    "job-name": name,
                    "batch.kubernetes.io/job-completion-index": str(index),
                }
            )
    for job in of_kind(manifests, "PyTorchJob"):
        name = job["metadata"]["name"]
        for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
            for index in range(spec["replicas"]):
                pods.append(
                    spec["template"]["metadata"]["labels"]
                    | {
                        "training.kubeflow.org/job-name": name,
                        "training.kubeflow.org/operator-name": "pytorchjob-controller",
                        "training.kubeflow.org/replica-type": role.lower(),
                        "training.kubeflow.org/replica-index": str(index),
                    }
                )
    return pods


def is_rank0(pod_labels: dict[str, str]) -> bool:
    return pod_labels.get("batch.kubernetes.io/job-completion-index") == "0" or (
        pod_labels.get("training.kubeflow.org/replica-type") == "master"
        and pod_labels.get("training.kubeflow.org/replica-index") == "0"
    )


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_sidecar_should_be_a_native_sidecar_init_container(case):
    for where, pod in trainer_pods(case):
        sidecar = sidecar_of(pod)
        assert sidecar["restartPolicy"] == "Always", where
        assert sidecar["image"] == "ghcr.io/adamwatch/adamwatch-sidecar:0.1.0", where
        assert "adamwatch-sidecar" not in [c["name"] for c in pod["spec"]["containers"]], where


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_sidecar_should_run_serve_with_the_documented_command_line(case):
    for where, pod in trainer_pods(case):
        assert sidecar_of(pod)["args"] == [
            "serve",
            "--listen",
            f"unix://{SOCKET}",
            "--metrics-address",
            "0.0.0.0:9400",
            "--control-address",
            "0.0.0.0:9401",
            "--control-token-file",
            "/etc/adamwatch/control/token",
            "--config",
            "/etc/adamwatch/config.yaml",
            "--socket-mode",
            "0660",
        ], where


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_trainer_and_sidecar_should_share_the_socket_directory_and_agree_on_the_endpoint(case):
    for where, pod in trainer_pods(case):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["adamwatch-socket"]["emptyDir"] is not None, where
        sidecar_mounts = {m["name"]: m["mountPath"] for m in sidecar_of(pod)["volumeMounts"]}
        trainer_mounts = {m["name"]: m["mountPath"] for m in trainer_of(pod)["volumeMounts"]}
        assert sidecar_mounts["adamwatch-socket"] == trainer_mounts["adamwatch-socket"] == "/var/run/adamwatch"

        env = {e["name"]: e for e in trainer_of(pod)["env"]}
        endpoint = env["ADAMWATCH_ENDPOINT"]["value"]
        assert endpoint == f"unix://{SOCKET}", where
        listen = sidecar_of(pod)["args"][sidecar_of(pod)["args"].index("--listen") + 1]
        assert listen == endpoint, where
        assert endpoint.removeprefix("unix://").startswith(trainer_mounts["adamwatch-socket"] + "/")


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_every_mounted_volume_should_exist_in_the_pod(case):
    for where, pod in trainer_pods(case):
        volumes = {v["name"] for v in pod["spec"]["volumes"]}
        for container in [sidecar_of(pod), trainer_of(pod)]:
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, f"{where}: {container['name']} mounts {mount['name']}"


def test_sidecar_should_mount_the_chart_config_and_token_it_is_told_to_read():
    manifests = render_case("secrets-values.yaml")
    _, pod = pod_templates(manifests)[0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_maps = {m["metadata"]["name"]: m for m in of_kind(manifests, "ConfigMap")}

    config_volume = volumes["adamwatch-config"]["configMap"]
    assert "config.yaml" in config_maps[config_volume["name"]]["data"]
    token_volume = volumes["adamwatch-control-token"]["secret"]
    assert token_volume["secretName"] == "llm-pretrain-adamwatch-token"
    assert token_volume["items"] == [{"key": "bearer", "path": "token"}]
    mounts = {m["name"]: m["mountPath"] for m in sidecar_of(pod)["volumeMounts"]}
    assert mounts["adamwatch-control-token"] + "/token" == "/etc/adamwatch/control/token"
    assert mounts["adamwatch-config"] == "/etc/adamwatch/config.yaml"


def test_chart_should_create_the_control_token_secret_the_pods_mount_unless_one_is_given():
    manifests = render_case("example-job-values.yaml")
    _, pod = pod_templates(manifests)[0]
    secret_name = {v["name"]: v for v in pod["spec"]["volumes"]}["adamwatch-control-token"]["secret"]["secretName"]

    secrets = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    assert len(base64.b64decode(secrets[secret_name]["data"]["token"])) >= 32


def test_chart_should_not_render_a_token_secret_when_an_existing_one_is_named():
    secrets = [s["metadata"]["name"] for s in of_kind(render_case("secrets-values.yaml"), "Secret")]

    assert secrets == ["demo-adamwatch-pagerduty"]


def test_sidecar_config_file_should_carry_the_config_values():
    manifests = render_case("secrets-values.yaml")
    config = next(m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-config"))

    assert yaml.safe_load(config["data"]["config.yaml"]) == {
        "retention_seconds": 600,
        "log_level": "debug",
        "max_frame_bytes": 1048576,
        "remediation": {"audit": {"path": "/var/log/adamwatch/audit.jsonl"}},
    }


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_sidecar_should_keep_its_audit_log_on_a_writable_volume(case):
    for where, pod in trainer_pods(case):
        mounts = {m["name"]: m["mountPath"] for m in sidecar_of(pod)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert mounts["adamwatch-audit"] == "/var/log/adamwatch", where
        assert "emptyDir" in volumes["adamwatch-audit"], where


def test_audit_log_should_be_switchable_and_a_policy_audit_path_should_win():
    manifests = render(values={"sidecar": {"auditLog": {"enabled": False}}})
    config = next(m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-config"))
    assert "remediation" not in yaml.safe_load(config["data"]["config.yaml"])
    manifests = render(values={"sidecar": {"config": {"remediation": {"audit": {"path": "/tmp/a.jsonl"}}}}})
    config = next(m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-config"))
    assert yaml.safe_load(config["data"]["config.yaml"])["remediation"] == {"audit": {"path": "/tmp/a.jsonl"}}


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_sidecar_should_probe_readyz_at_startup_and_readiness_and_healthz_for_liveness(case):
    for where, pod in trainer_pods(case):
        sidecar = sidecar_of(pod)
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, where
        assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, where
        assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}, where
        assert ports == {"metrics": 9400, "control": 9401}, where


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_sidecar_should_run_with_a_restrictive_security_context(case):
    for where, pod in trainer_pods(case):
        assert sidecar_of(pod)["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }, where


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_sidecar_should_have_resource_requests_and_limits(case):
    for where, pod in trainer_pods(case):
        resources = sidecar_of(pod)["resources"]
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}, where


def test_example_job_should_be_an_indexed_job_whose_index_is_the_rank():
    job = one(render_case("example-job-values.yaml"), "Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert env["ADAMWATCH_JOB"]["value"] == job["metadata"]["name"]


def test_example_job_ranks_should_rendezvous_on_pod_0_through_the_headless_service():
    manifests = render_case("example-job-values.yaml")
    job = one(manifests, "Job")
    name = job["metadata"]["name"]
    service = next(s for s in of_kind(manifests, "Service") if s["metadata"]["name"] == name)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert env["MASTER_ADDR"] == f"{name}-0.{service['metadata']['name']}"
    assert all(matches(service["spec"]["selector"], pod) for pod in pods_created_by(manifests))


def test_pytorchjob_example_should_use_the_pytorch_container_and_a_master_plus_workers():
    job = one(render_case("pytorchjob-values.yaml"), "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]

    assert job["apiVersion"] == "kubeflow.org/v1"
    assert {role: spec["replicas"] for role, spec in replicas.items()} == {"Master": 1, "Worker": 2}
    for spec in replicas.values():
        assert spec["template"]["spec"]["containers"][0]["name"] == "pytorch"
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
        # The operator sets RANK; the chart must not override it.
        assert "RANK" not in env
        assert env["ADAMWATCH_JOB"]["value"] == job["metadata"]["name"]


@pytest.mark.parametrize("case", ["example-job-values.yaml", "pytorchjob-values.yaml", "networkpolicy-values.yaml"])
def test_podmonitor_should_select_every_trainer_pod_and_scrape_the_sidecar_metrics_port(case):
    manifests = render_case(case)
    monitor = one(manifests, "PodMonitor")
    pods = pods_created_by(manifests)

    assert pods
    assert all(matches(monitor["spec"]["selector"]["matchLabels"], pod) for pod in pods)
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    for where, pod in pod_templates(manifests):
        assert endpoint["port"] in [p["name"] for p in sidecar_of(pod)["ports"]], where
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True


def test_podmonitor_should_not_select_pods_of_another_release():
    monitor = one(render_case("example-job-values.yaml"), "PodMonitor")
    other = one(render({"example": {"enabled": True}}, release="other"), "Job")

    assert not matches(monitor["spec"]["selector"]["matchLabels"], other["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("case", ["example-job-values.yaml", "pytorchjob-values.yaml", "secrets-values.yaml"])
def test_control_service_should_select_exactly_the_rank0_pod_on_the_control_port(case):
    manifests = render_case(case)
    service = next(s for s in of_kind(manifests, "Service") if s["metadata"]["name"].endswith("-control"))
    selected = [pod for pod in pods_created_by(manifests) if matches(service["spec"]["selector"], pod)]

    assert len(selected) == 1 and is_rank0(selected[0])
    port = service["spec"]["ports"][0]
    _, pod = pod_templates(manifests)[0]
    sidecar_ports = {p["name"]: p["containerPort"] for p in sidecar_of(pod)["ports"]}
    assert port["targetPort"] == sidecar_ports["control"] == port["port"]


def test_control_service_should_be_limited_to_the_named_job_when_one_is_set():
    manifests = render_case("secrets-values.yaml")
    service = next(s for s in of_kind(manifests, "Service") if s["metadata"]["name"].endswith("-control"))

    assert service["spec"]["selector"]["batch.kubernetes.io/job-name"] == "llm-pretrain"


def test_should_not_render_a_network_policy_by_default():
    assert of_kind(render_case("default"), "NetworkPolicy") == []
    assert of_kind(render_case("example-job-values.yaml"), "NetworkPolicy") == []


def test_network_policy_should_admit_only_prometheus_to_metrics_and_alertmanager_to_control():
    manifests = render_case("networkpolicy-values.yaml")
    policy = one(manifests, "NetworkPolicy")
    rules = policy["spec"]["ingress"]

    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert all(matches(policy["spec"]["podSelector"]["matchLabels"], pod) for pod in pods_created_by(manifests))
    prometheus, alertmanager = rules[0], rules[1]
    assert prometheus["ports"] == [{"port": 9400, "protocol": "TCP"}]
    assert prometheus["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "prometheus",
                    "operator.prometheus.io/name": "kps-prometheus",
                }
            },
        }
    ]
    assert alertmanager["ports"] == [{"port": 9401, "protocol": "TCP"}]
    assert alertmanager["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "alertmanager"}}
    # No rule admits everyone: every rule names who may connect.
    assert all(rule.get("from") for rule in rules)


def test_network_policy_should_let_ranks_reach_each_other_unless_turned_off():
    manifests = render_case("networkpolicy-values.yaml")
    rules = one(manifests, "NetworkPolicy")["spec"]["ingress"]
    same_pods = [r for r in rules if "ports" not in r and "namespaceSelector" not in r["from"][0]]
    assert len(same_pods) == 1
    assert all(matches(same_pods[0]["from"][0]["podSelector"]["matchLabels"], p) for p in pods_created_by(manifests))

    closed = one(render({"networkPolicy": {"enabled": True, "allowSamePods": False}}), "NetworkPolicy")
    assert all("ports" in rule for rule in closed["spec"]["ingress"])


def test_network_policy_should_append_extra_ingress_rules():
    rules = one(render_case("networkpolicy-values.yaml"), "NetworkPolicy")["spec"]["ingress"]

    assert rules[-1]["ports"] == [{"port": 6006, "protocol": "TCP"}]


def test_release_name_containing_adamwatch_should_not_be_repeated_in_names():
    assert one(render({}, release="adamwatch"), "PodMonitor")["metadata"]["name"] == "adamwatch"
    assert one(render({}, release=RELEASE), "PodMonitor")["metadata"]["name"] == f"{RELEASE}-adamwatch"


def test_convergence_and_runs_values_should_reach_the_sidecar_config_and_load():
    """Issue 11: targets per job and the vanish grace pass through; the sidecar accepts the file."""
    from adamwatch_sidecar.config import build_config

    assert {"convergence", "runs"}.isdisjoint(yaml.safe_load(
        next(m for m in of_kind(render(), "ConfigMap") if m["metadata"]["name"].endswith("-config"))
        ["data"]["config.yaml"]))
    values = {"sidecar": {"config": {"convergence": {"targets": {"gpt": {"eval_loss": 1.6}}, "budget_seconds": 86400},
                                     "runs": {"vanish_grace_seconds": 10}}}}
    config = next(m for m in of_kind(render(values=values), "ConfigMap") if m["metadata"]["name"].endswith("-config"))
    loaded = yaml.safe_load(config["data"]["config.yaml"])
    assert loaded["convergence"]["targets"] == {"gpt": {"eval_loss": 1.6}}
    assert loaded["runs"] == {"vanish_grace_seconds": 10}
    assert build_config(loaded).convergence["budget_seconds"] == 86400


@pytest.mark.parametrize("case", WORKLOAD_CASES)
def test_the_socket_should_not_be_world_accessible(case):
    for where, pod in trainer_pods(case):
        args = sidecar_of(pod)["args"]
        assert int(args[args.index("--socket-mode") + 1], 8) & 0o007 == 0, where
