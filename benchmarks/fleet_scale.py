"""Fleet scale: hundreds of ranks, one sidecar per pod, a real Prometheus with the shipped rules, one page.

    .venv/bin/python benchmarks/fleet_scale.py                  # 256 ranks, about 2 minutes
    .venv/bin/python benchmarks/fleet_scale.py --ranks 1024     # 1,024 ranks, 3 to 4 minutes
    .venv/bin/python benchmarks/fleet_scale.py --json out.json  # the figures as JSON too

What runs, all on 127.0.0.1, in a temporary folder, stopped at the end (Ctrl-C too):

- one real ``adamwatch-sidecar`` process per pod (``--ranks-per-sidecar``, default 8),
  with the default remediation policy in dry-run (the fake trainers do not act on
  commands). Processes rather than ``Sidecar`` objects in one process: a sidecar
  costs ~0.2 s of CPU to start and ~31 MiB, so the 128 of 1,024 ranks are ~25 s
  and 4 GiB, affordable here; sidecars sharing one process would share one GIL
  and distort the scrape durations this measures;
- one feeder process playing every rank (``fleet_trainers.py``): HELLO, then a
  STEP frame per step (4 param groups, deep statistics every 10 steps) at
  ``--steps-per-second`` per rank, each rank on its own Unix socket connection;
- a real Prometheus scraping every sidecar (``honor_labels``, pod and namespace as
  target labels) and itself, evaluating ``alerts/adamwatch-rules.yaml``;
- a real Alertmanager with ``alerts/alertmanager.yaml`` as shipped, timers
  included (only receivers and secrets local); PagerDuty is an Events v2 stub.

After a warm-up (every rank has sent deep statistics) the fleet trains for
``--duration`` seconds; then every rank of the first job turns non-finite for
three steps. The run passes when that reaches the PagerDuty stub as exactly one
notification (nothing for the other jobs), with every rank's alerts in it when
the scrape and evaluation intervals fit in the route's ``group_wait``.

Reported, each as min / median / max over the run: series per rank (counted
from what Prometheus stored, so new metrics count without a change here),
series, bytes and scrape time per sidecar, rule-group evaluation time,
Prometheus memory and head series, sidecar RSS; plus the CPU each part used and
the machine's load, since this machine's two cores may be shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fleet_trainers  # noqa: E402  (next to this file)
from tests.alerts.assets_under_test import ALERTMANAGER_FILE, RULES_FILE  # noqa: E402
from tests.alerts.stack import (  # noqa: E402  (the alerting tests' real-process helpers)
    Recorder,
    api,
    free_port,
    local_alertmanager_config,
    start,
    start_alertmanager,
    start_prometheus,
    stop,
)

SIDECAR_CLI = str(pathlib.Path(sys.executable).with_name("adamwatch-sidecar"))
NAMESPACE = "training"
NAN_STEPS = 3  # the sidecar's non-finite detector needs 3 in a row
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Pod:
    """One training pod: its job, its ranks, its sidecar's folder."""

    name: str
    job: str
    ranks: tuple[int, ...]
    world_size: int
    folder: pathlib.Path

    @property
    def endpoint(self) -> str:
        return f"unix://{self.folder}/adamwatch.sock"


def plan_pods(ranks: int, jobs: int, per_sidecar: int, tmp: pathlib.Path) -> list[Pod]:
    """Split ``ranks`` into ``jobs`` equal jobs and each job into pods of ``per_sidecar`` ranks.

    Raises:
        ValueError: naming the option that does not divide.
    """
    if ranks % jobs:
        raise ValueError(f"--ranks {ranks} is not a multiple of --jobs {jobs}")
    job_size = ranks // jobs
    if job_size % per_sidecar:
        raise ValueError(f"--ranks-per-sidecar {per_sidecar} does not divide a job's {job_size} ranks")
    return [Pod(f"fleet-{j}-pod-{p}", f"fleet-{j}", tuple(range(p * per_sidecar, (p + 1) * per_sidecar)), job_size,
                tmp / f"fleet-{j}-pod-{p}")
            for j in range(jobs) for p in range(job_size // per_sidecar)]


READY = re.compile(r"adamwatch-sidecar ready: ingest=\S+ metrics=http://(\S+)")


def start_sidecars(pods: list[Pod], processes: list) -> dict[str, tuple[subprocess.Popen, str]]:
    """One ``adamwatch-sidecar serve`` per pod, started together, then awaited.

    Each binds a port of the kernel's choosing and names it in its ready line:
    ports picked in advance for a hundred sidecars would collide now and then.

    Returns:
        pod name -> (process, metrics address HOST:PORT).
    """
    for pod in pods:
        pod.folder.mkdir()
        config = {"listen": pod.endpoint, "metrics_address": "127.0.0.1:0", "log_level": "INFO",
                  "remediation": {"dry_run": True}}
        (pod.folder / "sidecar.yaml").write_text(yaml.safe_dump(config))
        processes.append(start([SIDECAR_CLI, "serve", "--config", str(pod.folder / "sidecar.yaml")],
                               pod.folder / "sidecar.log"))
    started = {}
    for pod, process in zip(pods, processes[-len(pods):]):
        log = pod.folder / "sidecar.log"

        def ready() -> str | None:
            if process.poll() is not None:
                raise RuntimeError(f"the sidecar of {pod.name} exited {process.returncode}: {log.read_text()[-2000:]}")
            match = READY.search(log.read_text())
            return match.group(1) if match else None

        started[pod.name] = (process, wait_until(ready, 120, f"the sidecar of {pod.name}", 0.1))
    return started


def prometheus_config(pods: list[Pod], metrics: dict[str, str], alertmanager: str, interval: float) -> dict[str, Any]:
    """Scrape every sidecar (``metrics``: pod name -> HOST:PORT) as the Helm chart's PodMonitor does,
    and Prometheus itself; the shipped rules."""
    every = f"{interval:g}s"
    return {
        "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
        "rule_files": [str(RULES_FILE)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [
            {"job_name": "adamwatch-sidecar", "honor_labels": True,
             "static_configs": [{"targets": [metrics[pod.name]], "labels": {"namespace": NAMESPACE, "pod": pod.name}}
                                for pod in pods]},
            {"job_name": "prometheus", "static_configs": [{"targets": ["__SELF__"]}]},
        ],
    }


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    reply = api(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return reply["data"]["result"]


def count(prometheus: str, selector: str) -> int:
    """How many series ``selector`` matches now."""
    result = query(prometheus, f"count({selector})")
    return int(float(result[0]["value"][1])) if result else 0


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """A range query's result matrix."""
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:.3f}"}
    reply = api(f"{prometheus}/api/v1/query_range?" + urllib.parse.urlencode(params))
    return reply["data"]["result"]


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0) -> Any:
    """Poll ``predicate`` until it returns something true; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- process accounting
def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used (0 once it is gone)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, from /proc (None once it is gone)."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine (all cores, every process) has been busy since boot."""
    values = [int(v) for v in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICK  # less idle and iowait


class RssSampler(threading.Thread):
    """Samples the RSS of some processes every ``interval`` seconds until stopped."""

    def __init__(self, pids: list[int], interval: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.pids, self.interval, self.samples = pids, interval, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.samples.extend(v for v in map(rss_bytes, self.pids) if v is not None)

    def stop(self) -> list[int]:
        self._stop_event.set()
        self.join()
        return self.samples


# ---------------------------------------------------------------------------- figures
def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of some values (NaN when there are none)."""
    if not values:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan")}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def range_values(result: list[dict[str, Any]]) -> list[float]:
    return [float(v) for series in result for _, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]


# (label, unit, scale, PromQL) read back from Prometheus over the measured window.
FIGURES = (
    ("series per rank, from the sidecar", "", 1, 'count by (job, rank) ({__name__=~"adamwatch_[^:]+", rank!=""})'),
    ("series per rank, recording rules", "", 1, 'count by (job, rank) ({__name__=~"adamwatch_.+:.+", rank!=""})'),
    ("series per sidecar (samples per scrape)", "", 1, 'scrape_samples_scraped{job="adamwatch-sidecar"}'),
    ("scrape size per sidecar", "KiB", 1 / 1024, 'scrape_body_size_bytes{job="adamwatch-sidecar"}'),
    ("scrape duration per sidecar", "ms", 1000, 'scrape_duration_seconds{job="adamwatch-sidecar"}'),
    ("Prometheus RSS", "MiB", 1 / 2**20, 'process_resident_memory_bytes{job="prometheus"}'),
    ("Prometheus head series", "", 1, 'prometheus_tsdb_head_series{job="prometheus"}'),
)
RULE_GROUPS = 'prometheus_rule_group_last_duration_seconds{job="prometheus"}'
RULE_SAMPLES = 'prometheus_rule_group_last_evaluation_samples{job="prometheus"}'


def collect_figures(prometheus: str, start: float, end: float, interval: float) -> dict[str, dict[str, Any]]:
    """Every figure of FIGURES, and evaluation time and output per rule group, over [start, end]."""
    step = max(interval, (end - start) / 30)
    figures = {}
    for label, unit, scale, expr in FIGURES:
        figures[label] = {"unit": unit, **spread([v * scale for v in range_values(
            query_range(prometheus, expr, start, end, step))])}
    for expr, what, unit, scale in ((RULE_GROUPS, "evaluation time", "ms", 1000), (RULE_SAMPLES, "samples out", "", 1)):
        for series in query_range(prometheus, expr, start, end, step):
            group = series["metric"]["rule_group"].rsplit(";", 1)[-1]
            figures[f"rule group {group}: {what}"] = {"unit": unit,
                                                      **spread([v * scale for v in range_values([series])])}
    return figures


# ---------------------------------------------------------------------------- the incident
def pagerduty_events(recorder: Recorder, job: str) -> list[dict[str, Any]]:
    """The Events v2 requests for ``job``: by the job detail or, should Alertmanager have dropped
    the details (an event over PagerDuty's 512 KB), by the title it starts with."""
    def for_job(request: dict[str, Any]) -> bool:
        payload = (request["json"] or {}).get("payload") or {}
        details = payload.get("custom_details") or {}
        return details.get("job") == job or payload.get("summary", "").startswith((f"[FIRING] {job}:",
                                                                                    f"[RESOLVED] {job}:"))
    return recorder.matching(for_job)


def run_incident(args, feeder, receivers: dict[str, Recorder], alertmanager_api: str, jobs: list[str],
                 job_ranks: int) -> dict[str, Any]:
    """Make every rank of the first job non-finite; check it pages exactly once, for that job only.

    Returns:
        what happened (latency, notifications, alerts in the page, its size) and ``failures``.
    """
    target, others = jobs[0], jobs[1:]
    shipped = yaml.safe_load(ALERTMANAGER_FILE.read_text())["route"]
    pagerduty_route = next(r for r in shipped["routes"] if r["receiver"] == "pagerduty")
    group_wait = _seconds(pagerduty_route.get("group_wait", shipped["group_wait"]))
    feeder.send(("incident", target, NAN_STEPS))
    if not feeder.poll(30):
        raise TimeoutError("the feeder did not start the incident")
    _, nan_step, nan_time = feeder.recv()
    budget = 4 * args.scrape_interval + group_wait + 60
    pagerduty = receivers["pagerduty"]
    wait_until(lambda: pagerduty_events(pagerduty, target), budget, f"a PagerDuty event for {target}", 0.1)
    first = pagerduty_events(pagerduty, target)[0]
    # Alerts of a group that was split (per rank, per alert) would go out within
    # a group_wait of their own first alert: one more scrape and two evaluations.
    time.sleep(3 * args.scrape_interval + 2)
    events = pagerduty_events(pagerduty, target)
    expected = job_ranks * 2  # AdamwatchNonFiniteStep per rank, for the loss and for the gradients
    details = first["json"]["payload"].get("custom_details") or {}
    groups = [g for g in api(f"{alertmanager_api}/alerts/groups") if g["receiver"]["name"] == "pagerduty"]
    # All of a job's ranks fit in the first page when the last of them can reach
    # Alertmanager (a scrape, an evaluation and the scrape itself later) before group_wait ends.
    complete_expected = 2 * args.scrape_interval + 1 < group_wait
    outcome = {
        "job": target, "ranks": job_ranks, "nan_step": nan_step, "latency_s": first["time"] - nan_time,
        "notifications": len(events), "other_jobs_notified": sum(len(pagerduty_events(pagerduty, j)) for j in others),
        "alerts_in_first": int(details.get("num_firing", 0)), "alerts_expected": expected,
        "first_complete_expected": complete_expected, "payload_bytes": int(first["headers"]["Content-Length"]),
        "summary": first["json"]["payload"]["summary"], "group_wait_s": group_wait,
        "alertmanager_groups": [{"labels": g["labels"], "alerts": len(g["alerts"])} for g in groups],
    }
    failures = []
    if len(events) != 1:
        failures.append(f"{len(events)} PagerDuty notifications for {target}, expected 1")
    if any(e["json"].get("event_action") != "trigger" for e in events):
        failures.append("a PagerDuty event for the incident is not a trigger")
    if [g["labels"] for g in groups] != [{"job": target}]:
        failures.append(f"Alertmanager holds the incident in groups {[g['labels'] for g in groups]}, expected one")
    if outcome["other_jobs_notified"]:
        failures.append(f"{outcome['other_jobs_notified']} PagerDuty notifications for healthy jobs")
    if details.get("job") != target:
        failures.append(f"the page lost its details (Alertmanager drops them from events over 512 KB): {details}")
    elif complete_expected and outcome["alerts_in_first"] != expected:
        failures.append(f"the page holds {outcome['alerts_in_first']} alerts, expected {expected}")
    outcome["failures"] = failures
    return outcome


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smh])", duration))


# ---------------------------------------------------------------------------- report
def print_report(settings: dict[str, Any], figures: dict[str, dict[str, Any]], cpu: dict[str, float],
                 incident: dict[str, Any], load: tuple[float, float], sidecar_rss: dict[str, float]) -> None:
    print(f"\nfleet: {settings['ranks']} ranks = {settings['jobs']} jobs x {settings['job_ranks']} ranks; "
          f"{settings['sidecars']} sidecars x {settings['ranks_per_sidecar']} ranks; "
          f"{settings['steps_per_second']:g} steps/s per rank, deep statistics every {settings['deep_stats_every']} steps")
    print(f"prometheus: scrape and evaluation every {settings['scrape_interval']:g} s, rules {RULES_FILE.name}; "
          f"measured over {settings['window_s']:.0f} s (incident included)")
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f} at start, {load[1]:.1f} at end; "
          f"CPU used (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    width = max(len(k) for k in figures) + 2
    print(f"\n{'figure':<{width}}{'min':>10}{'median':>10}{'max':>10}")
    rows = dict(figures)
    rows["sidecar RSS"] = sidecar_rss
    for label, values in rows.items():
        unit = f" ({values['unit']})" if values.get("unit") else ""
        print(f"{label + unit:<{width}}" + "".join(f"{values[k]:>10.4g}" for k in ("min", "median", "max")))
    print(f"\nincident: NaN on all {incident['ranks']} ranks of {incident['job']} from step {incident['nan_step']} "
          f"-> {incident['notifications']} PagerDuty notification(s) after {incident['latency_s']:.1f} s "
          f"(route group_wait {incident['group_wait_s']:g} s), {incident['alerts_in_first']} of "
          f"{incident['alerts_expected']} alerts in the first, {incident['payload_bytes'] / 1024:.1f} KiB; "
          f"healthy jobs paged: {incident['other_jobs_notified']}")
    print(f"  title: {incident['summary']!r}; Alertmanager groups for PagerDuty: "
          + ", ".join(f"{g['labels']} with {g['alerts']} alerts" for g in incident["alertmanager_groups"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=256, help="ranks in the fleet (default 256; try 1024)")
    parser.add_argument("--jobs", type=int, default=2, help="training jobs the ranks are split into (default 2)")
    parser.add_argument("--ranks-per-sidecar", type=int, default=8, help="ranks per pod, one sidecar each (default 8)")
    parser.add_argument("--steps-per-second", type=float, default=1.0, help="per rank (default 1)")
    parser.add_argument("--deep-stats-every", type=int, default=10)
    parser.add_argument("--scrape-interval", type=float, default=3.0,
                        help="Prometheus scrape and evaluation interval, seconds (default 3)")
    parser.add_argument("--duration", type=float, default=60.0, help="healthy seconds measured before the incident")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for name in ("ranks", "jobs", "ranks_per_sidecar", "deep_stats_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("steps_per_second", "scrape_interval", "duration"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    return args


def start_trainers(pods: list[Pod], args: argparse.Namespace, processes: list):
    """The feeder process playing every rank; returns (process, control pipe) once every rank said HELLO."""
    context = multiprocessing.get_context("spawn")
    control, feeder_end = context.Pipe()
    specs = [fleet_trainers.RankSpec(pod.endpoint, pod.job, rank, pod.world_size, pod.name)
             for pod in pods for rank in pod.ranks]
    feeder = context.Process(target=fleet_trainers.run, name="fleet-trainers",
                             args=(specs, 1 / args.steps_per_second, args.deep_stats_every, feeder_end))
    feeder.start()
    processes.append(feeder)
    print("processes:", " ".join(str(p.pid) for p in processes), flush=True)
    if not control.poll(120):
        raise TimeoutError("the fake trainers did not connect")
    reply = control.recv()
    if reply[0] != "ready":
        raise RuntimeError(f"the fake trainers failed: {reply[1]}")
    print(f"{reply[1]} ranks connected to {len(pods)} sidecars", flush=True)
    return feeder, control


def run(args: argparse.Namespace, tmp: pathlib.Path, processes: list) -> int:
    """The whole benchmark; every process it starts is appended to ``processes`` for the caller to stop."""
    pods = plan_pods(args.ranks, args.jobs, args.ranks_per_sidecar, tmp)
    load_start = os.getloadavg()[0]
    sidecars = start_sidecars(pods, processes)
    receivers = {name: Recorder() for name in ("pagerduty", "ticket", "sidecar")}
    try:
        am_config = local_alertmanager_config(
            tmp, pagerduty=receivers["pagerduty"].url("/v2/enqueue"), ticket=receivers["ticket"].url("/ticket"),
            sidecar=receivers["sidecar"].url("/api/v1/alertmanager"), control_token="fleet-token",
            routing_key="fleet-routing-key", group_wait=None)
        alertmanager, am_api = start_alertmanager(tmp, am_config)
        processes.append(alertmanager)
        config = prometheus_config(pods, {name: address for name, (_, address) in sidecars.items()},
                                   am_api.split("//")[1].split("/")[0], args.scrape_interval)
        prometheus_process, prometheus = _start_prometheus(tmp, config)
        processes.append(prometheus_process)
        feeder, control = start_trainers(pods, args, processes)

        warmup = 60 + 3 * args.deep_stats_every / args.steps_per_second
        wait_until(lambda: count(prometheus, 'adamwatch_deep_stats_step{job=~"fleet-.*"}') == args.ranks, warmup,
                   "every rank's deep statistics in Prometheus")
        wait_until(lambda: count(prometheus, 'up{job="adamwatch-sidecar"} == 1') == len(pods), 30,
                   "every sidecar scraped")
        time.sleep(2 * args.scrape_interval)  # Prometheus's own metrics catch up with the last scrapes
        print("warm: every rank's series are in Prometheus; measuring", flush=True)

        ours = {"prometheus": [prometheus_process.pid], "alertmanager": [alertmanager.pid],
                "sidecars": [p.pid for p, _ in sidecars.values()], "trainers": [feeder.pid]}
        cpu_start = {k: sum(map(cpu_seconds, pids)) for k, pids in ours.items()}
        busy_start = machine_busy_seconds()
        sampler = RssSampler(ours["sidecars"], max(1.0, args.scrape_interval))
        sampler.start()
        start_time = time.time()
        time.sleep(args.duration)
        incident = run_incident(args, control, receivers, am_api, sorted({pod.job for pod in pods}),
                                args.ranks // args.jobs)
        window = time.time() - start_time
        cpu = {k: (sum(map(cpu_seconds, pids)) - cpu_start[k]) / window for k, pids in ours.items()}
        cpu["whole machine"] = (machine_busy_seconds() - busy_start) / window
        sidecar_rss = {"unit": "MiB", **spread([v / 2**20 for v in sampler.stop()])}
        figures = collect_figures(prometheus, start_time, start_time + window, args.scrape_interval)
        control.send(("stop",))
        feeder_stats = control.recv()[1] if control.poll(30) else {}
    finally:
        for recorder in receivers.values():
            recorder.close()

    settings = {"ranks": args.ranks, "jobs": args.jobs, "job_ranks": args.ranks // args.jobs, "sidecars": len(pods),
                "ranks_per_sidecar": args.ranks_per_sidecar, "steps_per_second": args.steps_per_second,
                "deep_stats_every": args.deep_stats_every, "scrape_interval": args.scrape_interval,
                "window_s": window, "trainers": feeder_stats,
                "schema_fields_filled": fleet_trainers.schema_fields_filled()}
    print_report(settings, figures, cpu, incident, (load_start, os.getloadavg()[0]), sidecar_rss)
    if feeder_stats.get("dropped"):
        print(f"note: the fake trainers dropped {feeder_stats['dropped']} frames (sidecars did not keep up)")
    filled = {k: v for k, v in settings["schema_fields_filled"].items() if v}
    if filled:
        print(f"note: wire fields sent with a neutral value (unknown to fleet_trainers.py): {filled}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"settings": settings, "figures": {**figures, "sidecar RSS": sidecar_rss}, "cpu_cores": cpu,
             "incident": incident}, indent=2, sort_keys=True))
    for failure in incident["failures"]:
        print(f"FAILED: {failure}")
    return 1 if incident["failures"] else 0


def stop_all(processes: list) -> None:
    """Stop subprocesses and multiprocessing children: all signalled at once (so 128 sidecars
    stop in parallel), then each awaited, killed after 10 s."""
    children = [p for p in processes if isinstance(p, multiprocessing.process.BaseProcess)]
    for process in processes:
        if process in children:
            if process.is_alive():
                process.terminate()
        elif process.poll() is None:
            process.terminate()
    for process in processes:
        if process in children:
            process.join(10)
            if process.exitcode is None:
                process.kill()
                process.join()
        else:
            stop(process)


def _start_prometheus(tmp: pathlib.Path, config: dict[str, Any]):
    # Prometheus scrapes itself: its own port is known only once chosen.
    port = free_port()
    config["scrape_configs"][1]["static_configs"][0]["targets"] = [f"127.0.0.1:{port}"]
    return start_prometheus(tmp, config, "--enable-feature=extra-scrape-metrics", port=port)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; Ctrl-C or SIGTERM stops everything it started.

    Returns:
        0 when the incident paged exactly once, 1 otherwise.
    """
    args = parse_args(argv)
    processes: list = []

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        with tempfile.TemporaryDirectory(prefix="aw-fleet-", dir="/tmp") as folder:
            try:
                return run(args, pathlib.Path(folder), processes)
            finally:
                stop_all(processes)
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
