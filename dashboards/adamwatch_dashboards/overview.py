"""Overview: the fleet at a glance — who reports, who is healthy, remediations, throughput."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dashboard_builders

from adamwatch_dashboards.common import (
    base_dashboard,
    PanelIds,
    query,
    stat_panel,
    table_panel,
    timeseries_panel,
)

__all__ = ["UID", "overview_dashboard"]

UID = "adamwatch-overview"

SEL = 'job=~"$job", rank=~"$rank"'
# A trainer is unhealthy while any adamwatch alert fires for its job and rank.
FIRING = 'ALERTS{alertname=~"Adamwatch.*", alertstate="firing"}'
# Fleet scale: the per-job recording rules (group adamwatch-job of the rules),
# one series per job, which a global Prometheus or Thanos/Mimir keeps above the shards.
JOB_AGGREGATES = ("trainers_connected:sum", "loss:avg", "grad_norm:max", "steps:min_rate5m", "tokens:rate5m",
                  "nonfinite_ranks:count5m")


def overview_dashboard() -> dashboard_builders.Dashboard:
    """Returns: the Overview dashboard builder."""
    ids = PanelIds()
    return (
        base_dashboard("adamwatch / Overview", UID, "Every training job adamwatch watches: who reports, who is healthy, what was repaired.", since="now-3h", multi=True)
        .with_row(dashboard_builders.Row("Fleet"))
        .with_panel(stat_panel(
            ids, "Jobs reporting", "Training jobs with at least one rank connected to its sidecar.",
            [query(f'count(count by (job) (adamwatch_trainer_connected{{{SEL}}} == 1)) or vector(0)')]))
        .with_panel(stat_panel(
            ids, "Ranks reporting", "Trainer processes (ranks) connected to their sidecar.",
            [query(f'sum(adamwatch_trainer_connected{{{SEL}}}) or vector(0)')]))
        .with_panel(stat_panel(
            ids, "Healthy ranks", "Connected ranks with no adamwatch alert firing for their job and rank.",
            [query(f'count(adamwatch_trainer_connected{{{SEL}}} == 1 unless on (job, rank) {FIRING}) or vector(0)')]))
        .with_panel(stat_panel(
            ids, "Unhealthy ranks", "Ranks with at least one adamwatch alert firing (see the On-call dashboard).",
            [query(f'count(adamwatch_trainer_connected{{{SEL}}} and on (job, rank) {FIRING}) or vector(0)')],
            red_from=1))
        .with_panel(table_panel(
            ids, "Trainers",
            "One row per job and rank: connected (1) or not, latest optimizer step, optimizer and implementation.",
            [
                query(f'adamwatch_trainer_connected{{{SEL}}}', instant=True),
                query(f'adamwatch_optimizer_step{{{SEL}}}', instant=True),
                query(f'adamwatch_optimizer_info{{{SEL}}}', instant=True),
            ], height=8))
        .with_panel(table_panel(
            ids, "Jobs",
            "One row per training job from the per-job recording rules (adamwatch_job:*): ranks connected, mean "
            "loss, largest global gradient norm, the slowest rank's steps/s, tokens/s, ranks with a non-finite step "
            "in the last 5 minutes. Works on a global Prometheus that federates only these (alerts/README.md).",
            [query(f'adamwatch_job:{name}{{job=~"$job"}}', instant=True) for name in JOB_AGGREGATES], height=8))
        .with_row(dashboard_builders.Row("Alerts and remediation"))
        .with_panel(stat_panel(
            ids, "Critical alerts firing", "adamwatch alerts with severity critical that are firing now.",
            [query(f'count({FIRING[:-1]}, severity="critical"}}) or vector(0)')], red_from=1))
        .with_panel(stat_panel(
            ids, "Warnings firing", "adamwatch alerts with severity warning that are firing now.",
            [query(f'count({FIRING[:-1]}, severity="warning"}}) or vector(0)')], red_from=1))
        .with_panel(stat_panel(
            ids, "Remediations (24h)", "Remediation actions adamwatch took in the last 24 hours, any outcome.",
            [query(f'sum(increase(adamwatch_remediations_total{{{SEL}}}[24h])) or vector(0)')]))
        .with_panel(stat_panel(
            ids, "Ladders exhausted", "Ranks whose remediation ladder is used up: a human must act.",
            [query(f'sum(adamwatch_remediation_ladder_exhausted{{{SEL}}}) or vector(0)')], red_from=1))
        .with_panel(timeseries_panel(
            ids, "Remediations by action and outcome", "Actions per 5 minutes, by job, action and outcome.",
            [query(f'sum by (job, action, outcome) (increase(adamwatch_remediations_total{{{SEL}}}[5m]))',
                   "{{job}} {{action}} {{outcome}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Firing alerts by name", "adamwatch alerts firing, by alert name and severity.",
            [query(f'count by (alertname, severity) ({FIRING})', "{{alertname}} ({{severity}})")],
            event_only=True))
        .with_row(dashboard_builders.Row("Throughput"))
        .with_panel(timeseries_panel(
            ids, "Optimizer steps per second", "Steps per second per job (mean over its ranks).",
            [query(f'avg by (job) (rate(adamwatch_steps_total{{{SEL}}}[$__rate_interval]))', "{{job}}")],
            unit="ops", width=8))
        .with_panel(timeseries_panel(
            ids, "Samples per second", "Training samples per second per job (all ranks), when the trainer reports them.",
            [query(f'sum by (job) (rate(adamwatch_samples_total{{{SEL}}}[$__rate_interval]))', "{{job}}")],
            unit="short", width=8))
        .with_panel(timeseries_panel(
            ids, "Tokens per second", "Training tokens per second per job (all ranks), when the trainer reports them.",
            [query(f'sum by (job) (rate(adamwatch_tokens_total{{{SEL}}}[$__rate_interval]))', "{{job}}")],
            unit="short", width=8))
    )
