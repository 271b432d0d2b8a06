"""Optimizer debug: one job and rank, from the loss down to Adam's moments."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dashboard_builders

from adamwatch_dashboards.common import (
    PanelIds,
    base_dashboard,
    label_variable,
    query,
    table_panel,
    timeseries_panel,
)

__all__ = ["UID", "optimizer_debug_dashboard"]

UID = "adamwatch-optimizer-debug"

SEL = 'job="$job", rank="$rank"'
GROUP_SEL = SEL + ', param_group=~"$param_group"'
DEEP = "Deep statistic, computed every N steps (deep_stats_every). "


def optimizer_debug_dashboard() -> dashboard_builders.Dashboard:
    """Returns: the Optimizer debug dashboard builder."""
    ids = PanelIds()
    return (
        base_dashboard("adamwatch / Optimizer debug", UID, "One job and rank: loss, gradients, scheduled and effective learning rates, Adam's state.", since="now-1h", multi=False)
        .with_variable(label_variable(
            "param_group", "Param group", 'adamwatch_learning_rate{job="$job", rank="$rank"}', multi=True))
        .with_row(dashboard_builders.Row("Loss and gradients"))
        .with_panel(timeseries_panel(
            ids, "Loss", "Loss at each scraped step and its one-minute mean.",
            [query(f'adamwatch_loss{{{SEL}}}', "loss"), query(f'adamwatch_job_rank:loss:avg1m{{{SEL}}}', "1m mean")]))
        .with_panel(timeseries_panel(
            ids, "Gradient norm by param group", 'L2 norm of the unscaled gradients before clipping; "all" is the global norm.',
            [query(f'adamwatch_grad_norm{{{SEL}}}', "{{param_group}}")], log_scale=True))
        .with_row(dashboard_builders.Row("Learning rates"))
        .with_panel(timeseries_panel(
            ids, "Scheduled vs effective learning rate",
            DEEP + "Scheduled lr against the quantiles of Adam's per-coordinate rate lr/(sqrt(v_hat)+eps). "
            "Effective rates far above lr mean tiny second moments; at lr/eps, eps rules the step.",
            [
                query(f'adamwatch_learning_rate{{{GROUP_SEL}}}', "{{param_group}} scheduled"),
                query(f'adamwatch_effective_learning_rate{{{GROUP_SEL}, quantile=~"0.1|0.5|0.9"}}',
                      "{{param_group}} effective p{{quantile}}"),
            ], log_scale=True))
        .with_panel(timeseries_panel(
            ids, "Update size quantiles",
            DEEP + "Quantiles of the per-coordinate update |lr*m_hat/(sqrt(v_hat)+eps)|.",
            [query(f'adamwatch_update_size{{{GROUP_SEL}}}', "{{param_group}} p{{quantile}}")], log_scale=True))
        .with_panel(timeseries_panel(
            ids, "Update-to-weight ratio",
            DEEP + "L2 norm of the update over the L2 norm of the weights; around 1e-3 is typical, far above means instability.",
            [query(f'adamwatch_update_to_weight_ratio{{{GROUP_SEL}}}', "{{param_group}}")], log_scale=True))
        .with_panel(timeseries_panel(
            ids, "Learning-rate scale", "Cumulative factor adamwatch's remediation applied to the learning rate.",
            [query(f'adamwatch_learning_rate_scale{{{SEL}}}', "scale")]))
        .with_row(dashboard_builders.Row("Adam state"))
        .with_panel(timeseries_panel(
            ids, "First and second moment norms", DEEP + "L2 norms of m (exp_avg) and v (exp_avg_sq) per param group.",
            [
                query(f'adamwatch_adam_exp_avg_norm{{{GROUP_SEL}}}', "{{param_group}} m"),
                query(f'adamwatch_adam_exp_avg_sq_norm{{{GROUP_SEL}}}', "{{param_group}} v"),
            ], log_scale=True))
        .with_panel(timeseries_panel(
            ids, "Share of coordinates with sqrt(v_hat) <= eps",
            DEEP + "Where eps sets the step size (AdamwatchEffectiveLearningRateOutOfRange above 50%).",
            [query(f'adamwatch_eps_dominated_ratio{{{GROUP_SEL}}}', "{{param_group}}")], unit="percentunit"))
        .with_row(dashboard_builders.Row("Steps"))
        .with_panel(timeseries_panel(
            ids, "Step time", "Wall time between consecutive optimizer steps: quantiles from the histogram, and the mean.",
            [
                query(f'histogram_quantile(0.5, sum by (le) (rate(adamwatch_step_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p50"),
                query(f'histogram_quantile(0.99, sum by (le) (rate(adamwatch_step_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))', "p99"),
                query(f'rate(adamwatch_step_duration_seconds_sum{{{SEL}}}[$__rate_interval])'
                      f' / rate(adamwatch_step_duration_seconds_count{{{SEL}}}[$__rate_interval])', "mean"),
            ], unit="s"))
        .with_panel(timeseries_panel(
            ids, "Non-finite and skipped steps", "Per 5 minutes: non-finite steps by source, skipped updates by reason.",
            [
                query(f'increase(adamwatch_nonfinite_steps_total{{{SEL}}}[5m])', "non-finite {{source}}"),
                query(f'increase(adamwatch_skipped_steps_total{{{SEL}}}[5m])', "skipped {{reason}}"),
            ], event_only=True))
        .with_panel(table_panel(
            ids, "Optimizer", "What the trainer announced: optimizer, implementation, hyperparameters, versions.",
            [query(f'adamwatch_optimizer_info{{{SEL}}}', instant=True)], height=5))
        # issue 11: evaluation and convergence toward the declared target
        .with_row(dashboard_builders.Row("Evaluation and convergence"))
        .with_panel(timeseries_panel(
            ids, "Evaluation results",
            "Results reported with monitor.observe_eval (metric=\"loss\" is the validation loss), next to the "
            "training loss and the declared targets.",
            [
                query(f'adamwatch_eval_metric{{{SEL}}}', "eval {{metric}}"),
                query(f'adamwatch_loss{{{SEL}}}', "training loss"),
                query(f'adamwatch_convergence_target{{{SEL}}}', "target {{metric}}"),
            ], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Time to target",
            "Estimated seconds to reach each target at the recent trend, 1 while on a plateau (right: overfitting "
            "streak of evaluations).",
            [
                query(f'adamwatch_convergence_eta_seconds{{{SEL}}}', "eta {{metric}}"),
                query(f'adamwatch_convergence_plateau{{{SEL}}}', "plateau {{metric}}"),
                query(f'adamwatch_eval_overfitting_streak{{{SEL}}}', "overfitting streak"),
            ], event_only=True))
        # Spike guard (issue 14) and mixed precision (issue 11 item 5): empty
        # unless the trainer runs watch(spike_guard=...) or a GradScaler.
        .with_row(dashboard_builders.Row("Spike guard and mixed precision"))
        .with_panel(timeseries_panel(
            ids, "Spike guard activations",
            "Per 5 minutes: steps the on-device spike guard clipped (gradients scaled to its bound) or skipped. "
            "Guarded steps are not spikes for the sidecar's detectors; a streak of them is its own detection.",
            [query(f'increase(adamwatch_spike_guard_activations_total{{{SEL}}}[5m])', "{{mode}}")], event_only=True))
        .with_panel(timeseries_panel(
            ids, "Spike guard z-score and threshold",
            "z-score of the latest step against the guard's statistics, and its bound mean + k*std next to the "
            "pre-clip global gradient norm (skip mode also judges the loss).",
            [
                query(f'adamwatch_spike_guard_zscore{{{SEL}}}', "z {{signal}}"),
                query(f'adamwatch_spike_guard_threshold{{{SEL}}}', "bound {{signal}}"),
                query(f'adamwatch_grad_norm{{{SEL}, param_group="all"}}', "grad norm (pre-clip)"),
            ], event_only=True))  # only with watch(spike_guard=...)
        .with_panel(timeseries_panel(
            ids, "GradScaler scale",
            "The loss scale the latest step used: halves on every overflow, doubles after each growth interval; "
            "below 1 it has collapsed (AdamwatchGradScalerScaleCollapsed). Dots: overflow-skipped steps per 5 minutes.",
            [
                query(f'adamwatch_grad_scaler_scale{{{SEL}}}', "scale"),
                query(f'increase(adamwatch_skipped_steps_total{{{SEL}, reason="grad_scaler"}}[5m])', "overflow skips"),
            ], log_scale=True, event_only=True))  # only with watch(scaler=GradScaler)
        .with_panel(timeseries_panel(
            ids, "Gradient zero share",
            "Share of sampled gradient coordinates exactly zero, per param group (every N steps): fp16 gradients "
            "that underflow become 0, so a rise while the scale falls means lost small gradients.",
            [query(f'adamwatch_grad_zero_ratio{{{GROUP_SEL}}}', "{{param_group}}")], unit="percentunit",
            event_only=True))  # only with watch(scaler=GradScaler)
    )
