"""On-call: what is wrong right now — non-finite steps, spikes, stalls, remediation history, runbooks."""

from __future__ import annotations

import pathlib

import yaml
from grafana_foundation_sdk.builders import dashboard as dashboard_builders

from adamwatch_dashboards.common import (
    RULES_FILE,
    base_dashboard,
    PanelIds,
    query,
    stat_panel,
    table_panel,
    text_panel,
    timeseries_panel,
)

__all__ = ["UID", "RULES_FILE", "oncall_dashboard", "runbook_table_markdown"]

UID = "adamwatch-oncall"

SEL = 'job=~"$job", rank=~"$rank"'
FIRING = 'ALERTS{alertname=~"Adamwatch.*", alertstate="firing", job=~"$job"}'


def runbook_table_markdown(rules_file: pathlib.Path = RULES_FILE) -> str:
    """The alert list with runbook links, read from the rules file (one source of truth).

    Args:
        rules_file: path of alerts/adamwatch-rules.yaml.

    Returns:
        a markdown table: alert, severity, summary, runbook link.
    """
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    lines = ["| alert | severity | meaning |", "| --- | --- | --- |"]
    for group in groups:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            url = rule["annotations"]["runbook_url"]
            lines.append(f"| [{name}]({url}) | {rule['labels']['severity']} | {rule['annotations']['summary']} |")
    return "\n".join(lines) + "\n"


def oncall_dashboard() -> dashboard_builders.Dashboard:
    """Returns: the On-call dashboard builder."""
    ids = PanelIds()
    return (
        base_dashboard("adamwatch / On-call", UID, "What is wrong now with the training jobs adamwatch watches, and what was already done about it.", since="now-6h", multi=True)
        .with_row(dashboard_builders.Row("Now"))
        .with_panel(stat_panel(
            ids, "Critical alerts", "adamwatch alerts with severity critical firing for the selected jobs.",
            [query(f'count({FIRING[:-1]}, severity="critical"}}) or vector(0)')], red_from=1))
        .with_panel(stat_panel(
            ids, "Ranks not stepping", "Connected ranks whose last optimizer step is more than 5 minutes old.",
            [query(f'count((time() - adamwatch_last_step_timestamp_seconds{{{SEL}}} > 300)'
                   f' and on (job, rank) adamwatch_trainer_connected == 1) or vector(0)')], red_from=1))
        .with_panel(stat_panel(
            ids, "Disconnected ranks", "Ranks whose trainer closed the connection to its sidecar (until their series expire).",
            [query(f'count(adamwatch_trainer_connected{{{SEL}}} == 0) or vector(0)')], red_from=1))
        .with_panel(stat_panel(
            ids, "Sidecar targets down", "adamwatch sidecars Prometheus cannot scrape (scrape job adamwatch-sidecar).",
            [query('count(up{job="adamwatch-sidecar"} == 0) or vector(0)')], red_from=1))
        .with_panel(table_panel(
            ids, "Firing alerts",
            "Every firing adamwatch alert; click the alert name for its runbook.",
            [query(FIRING, instant=True)], event_only=True, runbook_links=True))
        .with_row(dashboard_builders.Row("Numerics"))
        .with_panel(timeseries_panel(
            ids, "Non-finite steps", "Steps with NaN/Inf loss or gradients per 5 minutes, by source (AdamwatchNonFiniteStep).",
            [query(f'sum by (job, rank, source) (increase(adamwatch_nonfinite_steps_total{{{SEL}}}[5m]))',
                   "{{job}}/{{rank}} {{source}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Skipped steps", "Steps whose update was not applied per 5 minutes, by reason.",
            [query(f'sum by (job, rank, reason) (increase(adamwatch_skipped_steps_total{{{SEL}}}[5m]))',
                   "{{job}}/{{rank}} {{reason}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Loss against its baseline",
            "Mean loss over the last minute and the 30-minute baseline ending 5 minutes ago (AdamwatchLossSpike).",
            [
                query(f'adamwatch_job_rank:loss:avg1m{{{SEL}}}', "{{job}}/{{rank}} last minute"),
                query(f'adamwatch_job_rank:loss:baseline_avg30m{{{SEL}}}', "{{job}}/{{rank}} baseline"),
            ], needs_history=True))
        .with_panel(timeseries_panel(
            ids, "Loss z-score", "Standard deviations of the last minute's mean loss above its baseline; alerts above 4.",
            [query(f'adamwatch_job_rank:loss:zscore{{{SEL}}}', "{{job}}/{{rank}}")], needs_history=True))
        .with_panel(timeseries_panel(
            ids, "Gradient norm against its baseline",
            "Global gradient norm over the last minute divided by its 30-minute median; alerts above 10 (AdamwatchGradNormExplosion).",
            [query(f'adamwatch_job_rank:grad_norm:ratio_to_baseline{{{SEL}}}', "{{job}}/{{rank}}")],
            needs_history=True))
        .with_panel(timeseries_panel(
            ids, "Global gradient norm", "L2 norm of the unscaled gradients at each scraped step, before clipping.",
            [query(f'adamwatch_grad_norm{{{SEL}, param_group="all"}}', "{{job}}/{{rank}}")], log_scale=True))
        .with_row(dashboard_builders.Row("Progress"))
        .with_panel(timeseries_panel(
            ids, "Seconds since last step", "Age of each rank's latest optimizer step (AdamwatchTrainingStalled above 600 s).",
            [query(f'time() - adamwatch_last_step_timestamp_seconds{{{SEL}}}', "{{job}}/{{rank}}")], unit="s"))
        .with_panel(timeseries_panel(
            ids, "Steps per second", "Optimizer steps per second per rank (AdamwatchThroughputDrop compares 5m with the hour before).",
            [query(f'rate(adamwatch_steps_total{{{SEL}}}[$__rate_interval])', "{{job}}/{{rank}}")], unit="ops"))
        .with_panel(timeseries_panel(
            ids, "Dropped summaries", "Step summaries the trainer dropped per second (sidecar unreachable or slow).",
            [query(f'rate(adamwatch_dropped_summaries_total{{{SEL}}}[$__rate_interval])', "{{job}}/{{rank}}")]))
        .with_panel(timeseries_panel(
            ids, "Known-good checkpoint age", "Age of the newest known-good checkpoint (AdamwatchNoRecentKnownGoodCheckpoint above 2 h).",
            [query(f'time() - adamwatch_last_known_good_checkpoint_timestamp_seconds{{{SEL}}}', "{{job}}/{{rank}}")],
            unit="s"))
        .with_row(dashboard_builders.Row("Remediation"))
        .with_panel(timeseries_panel(
            ids, "Detections", "Incidents the sidecar's step-latency detectors raised per 5 minutes, by detector.",
            [query(f'sum by (job, rank, detector) (increase(adamwatch_detections_total{{{SEL}}}[5m]))',
                   "{{job}}/{{rank}} {{detector}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Remediation history", "Remediation actions per 5 minutes, by action and outcome.",
            [query(f'sum by (job, rank, action, outcome) (increase(adamwatch_remediations_total{{{SEL}}}[5m]))',
                   "{{job}}/{{rank}} {{action}} {{outcome}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Learning-rate scale", "Cumulative factor adamwatch applied to the learning rate (1 = untouched).",
            [query(f'adamwatch_learning_rate_scale{{{SEL}}}', "{{job}}/{{rank}}")]))
        .with_panel(timeseries_panel(
            ids, "Remediation ladder exhausted", "1 while every rung is used up (AdamwatchRemediationLadderExhausted).",
            [query(f'adamwatch_remediation_ladder_exhausted{{{SEL}}}', "{{job}}/{{rank}}")]))
        .with_panel(timeseries_panel(
            ids, "Replica divergence",
            "1 on ranks whose parameter fingerprint differs from their job's other ranks at the same step "
            "(as one sidecar sees them; AdamwatchReplicaDivergence compares the whole job).",
            [query(f'adamwatch_replica_divergence{{{SEL}}}', "{{job}}/{{rank}}")]))

        # issue 11: how runs end, restores, device memory, error budget
        .with_row(dashboard_builders.Row("Runs and SLOs"))
        .with_panel(timeseries_panel(
            ids, "Run ends by reason",
            "Trainer exits per hour by reason: clean, exception, oom, preemption, signal, vanished "
            "(AdamwatchTrainerOutOfMemory, AdamwatchTrainerCrashLooping).",
            [query(f'sum by (job, rank, reason) (increase(adamwatch_trainer_exits_total{{{SEL}}}[1h]))',
                   "{{job}}/{{rank}} {{reason}}")]))
        .with_panel(timeseries_panel(
            ids, "Checkpoint restore success",
            "Share of checkpoint restores that succeeded per hour, and the restores by outcome "
            "(AdamwatchCheckpointRestoreFailed).",
            [
                query(f'sum by (job, rank) (increase(adamwatch_checkpoint_restores_total{{{SEL}, outcome="success"}}[1h]))'
                      f' / sum by (job, rank) (increase(adamwatch_checkpoint_restores_total{{{SEL}}}[1h]))',
                      "{{job}}/{{rank}} success ratio"),
                query(f'sum by (job, rank, outcome) (increase(adamwatch_checkpoint_restores_total{{{SEL}}}[1h]))',
                      "{{job}}/{{rank}} {{outcome}}"),
            ], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Error budget burn",
            "Burn rate of each training SLO over 30 minutes and 6 hours (AdamwatchErrorBudgetFastBurn pages "
            "when both exceed 2).",
            [
                query('adamwatch_slo:error_budget_burn:rate30m', "{{slo}} 30m"),
                query('adamwatch_slo:error_budget_burn:rate6h', "{{slo}} 6h"),
            ], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Error budget remaining",
            "Share of each SLO's 30-day error budget not yet spent; below 0 the SLO is missed.",
            [query('adamwatch_slo:error_budget_remaining:ratio30d', "{{slo}}")], unit="percentunit",
            event_only=True))
        .with_panel(timeseries_panel(
            ids, "Device memory per rank",
            "Peak allocated and reserved CUDA memory per rank (absent on CPU).",
            [
                query(f'adamwatch_device_memory_peak_bytes{{{SEL}}}', "{{job}}/{{rank}} peak"),
                query(f'adamwatch_device_memory_reserved_bytes{{{SEL}}}', "{{job}}/{{rank}} reserved"),
            ], unit="bytes", event_only=True))
        .with_row(dashboard_builders.Row("Monitor health"))
        .with_panel(timeseries_panel(
            ids, "Monitor errors",
            "Failures inside the trainers' monitors per 10 minutes, by where (AdamwatchMonitorErrors): "
            "steps it could not summarise are missing from every other panel.",
            [query(f'sum by (job, rank, where) (increase(adamwatch_monitor_errors_total{{{SEL}}}[10m]))',
                   "{{job}}/{{rank}} {{where}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Gradient clipping",
            "Factor clipping applied at the latest clipped step (1 = within max_norm); the gradient-norm panels show the norm before clipping.",
            [query(f'adamwatch_grad_clip_coefficient{{{SEL}}}', "{{job}}/{{rank}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Refused trainer connections",
            "Trainer connections or HELLOs each sidecar refused per 10 minutes, by reason "
            "(AdamwatchSidecarRefusingTrainers): a refused trainer trains on unmonitored.",
            [query('sum by (pod, reason) (increase(adamwatch_sidecar_connections_refused_total[10m]))',
                   "{{pod}} {{reason}}")], event_only=True))
        .with_row(dashboard_builders.Row("Runbooks"))
        .with_panel(text_panel(ids, "Alerts and runbooks", runbook_table_markdown(), height=12))
    )
