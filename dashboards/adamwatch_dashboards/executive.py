"""Executive: are training runs succeeding, within budget, at what cost — SLOs, time to converge, GPU-hours."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dashboard_builders

from adamwatch_dashboards.common import PanelIds, base_dashboard, query, stat_panel, table_panel, timeseries_panel

__all__ = ["UID", "PRICE_VARIABLE", "executive_dashboard", "price_variable"]

UID = "adamwatch-executive"
PRICE_VARIABLE = "price_per_device_hour"

SEL = 'job=~"$job"'
# Counters of a finished run vanish from the sidecar after its retention time:
# the largest value seen in the dashboard's range is the run's total.
RANGE = "$__range"


def price_variable() -> dashboard_builders.TextBoxVariable:
    """Returns: the textbox variable holding the price of one device-hour (any currency; default 0)."""
    return (
        dashboard_builders.TextBoxVariable(PRICE_VARIABLE)
        .label("Price per device-hour")
        .default_value("0")
        .description("What one device (GPU, or CPU pod for CPU runs) costs per hour; every device type at one price.")
    )


def executive_dashboard() -> dashboard_builders.Dashboard:
    """Returns: the Executive dashboard builder."""
    ids = PanelIds()
    return (
        base_dashboard("adamwatch / Executive",
                       UID, "Training runs against their SLOs: success rate, error budget, time to converge, cost.",
                       since="now-7d", multi=True)
        .with_variable(price_variable())
        .with_row(dashboard_builders.Row("Service level"))
        .with_panel(stat_panel(
            ids, "Run success rate (30 days)",
            "Share of runs (rank 0 of each job) that ended cleanly without a non-finite step, OOM or crash; "
            "preempted runs are not counted. The objective is 95 %.",
            [query('1 - adamwatch_slo:error:ratio_increase30d{slo="run_success"}', instant=True)],
            unit="percentunit", event_only=True))
        .with_panel(stat_panel(
            ids, "Error budget remaining (30 days)",
            "Share of the run-success error budget (5 % of runs) not yet spent in the last 30 days; below 0 the SLO is missed.",
            [query('adamwatch_slo:error_budget_remaining:ratio30d{slo="run_success"}', instant=True)],
            unit="percentunit", event_only=True))
        .with_panel(stat_panel(
            ids, "Runs reaching their target (30 days)",
            "Share of runs with a declared target that reached it (within the configured budget).",
            [query('1 - adamwatch_slo:error:ratio_increase30d{slo="target_within_budget"}', instant=True)],
            unit="percentunit", event_only=True))
        .with_panel(stat_panel(
            ids, "Target error budget remaining (30 days)",
            "Share of the target-within-budget error budget not yet spent in the last 30 days.",
            [query('adamwatch_slo:error_budget_remaining:ratio30d{slo="target_within_budget"}', instant=True)],
            unit="percentunit", event_only=True))
        .with_panel(timeseries_panel(
            ids, "Error budget burn rate",
            "Burn rate by SLO over 6 hours and 3 days: 1 spends the budget exactly in 30 days; "
            "AdamwatchErrorBudgetFastBurn pages above 2, AdamwatchErrorBudgetSlowBurn tickets above 1.",
            [
                query('adamwatch_slo:error_budget_burn:rate6h', "{{slo}} 6h"),
                query('adamwatch_slo:error_budget_burn:rate3d', "{{slo}} 3d"),
            ], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Runs ended by outcome",
            "Runs (rank 0) ending per hour: success, nonfinite, oom, crashed, preempted.",
            [query(f'sum by (outcome) (increase(adamwatch_runs_ended_total{{{SEL}, rank="0"}}[1h]))', "{{outcome}}")],
            event_only=True))
        .with_row(dashboard_builders.Row("Convergence"))
        .with_panel(table_panel(
            ids, "Time to converge per model family",
            "Mean seconds from a run's first step to reaching its target, by the model family the trainer "
            "announced (watch(model_family=...)) and the target metric.",
            [query('avg by (model_family, metric) (max_over_time(adamwatch_convergence_reached_seconds[$__range])'
                   ' * on (job, rank) group_left (model_family) max_over_time(adamwatch_run_info[$__range]))',
                   instant=True)], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Estimated time to target",
            "Seconds until each run reaches its target at its recent trend (absent when the trend leads away).",
            [query(f'adamwatch_convergence_eta_seconds{{{SEL}, rank="0"}}', "{{job}} {{metric}}")],
            unit="s", event_only=True))
        .with_row(dashboard_builders.Row("Cost"))
        .with_panel(table_panel(
            ids, "Device-hours and cost per run",
            "Device-hours of every rank of each job (GPU-hours for device cuda) in the time range, and their cost "
            "at the price per device-hour set above.",
            [
                query(f'sum by (job, device) (max_over_time(adamwatch_trainer_device_seconds_total{{{SEL}}}[{RANGE}])) / 3600',
                      instant=True),
                query(f'sum by (job) (max_over_time(adamwatch_trainer_device_seconds_total{{{SEL}}}[{RANGE}])) / 3600'
                      f' * ${PRICE_VARIABLE}', instant=True),
            ], width=12))
        .with_panel(table_panel(
            ids, "Remediations per run",
            "Remediation actions applied per job in the time range (skip, reduce LR, restore, stop).",
            [query(f'sum by (job, action) (max_over_time(adamwatch_remediations_total{{{SEL}, outcome="applied"}}[{RANGE}]))',
                   instant=True)], width=12, event_only=True))
        .with_panel(timeseries_panel(
            ids, "Optimizer state and parameters",
            "Bytes of parameters and of optimizer state by dtype, summed over the ranks of each job.",
            [
                query(f'sum by (job, dtype) (adamwatch_param_bytes{{{SEL}}})', "{{job}} params {{dtype}}"),
                query(f'sum by (job, dtype) (adamwatch_optimizer_state_bytes{{{SEL}}})', "{{job}} state {{dtype}}"),
            ], unit="bytes"))
    )
