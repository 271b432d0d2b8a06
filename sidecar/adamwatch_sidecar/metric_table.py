"""Every metric the sidecar exports, declared once.

The collector renders from this table, the README's metric reference is
generated from it, and the alert rules and dashboards are checked against it:
a name that is not here does not exist.

Names are the names as exposed and as written in PromQL (counters end in
``_total``, the info metric in ``_info``, histograms are named by their base).
Trainer metrics carry ``job`` and ``rank`` from the trainer's hello; pod and
namespace come from Prometheus target labels, never from us.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MetricSpec", "METRICS", "BY_NAME", "STEP_DURATION_BUCKETS", "metric", "render_markdown_reference"]


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Args:
        name: exposed name, e.g. ``adamwatch_steps_total``.
        type: "gauge", "counter", "histogram", "summary" (quantiles only) or "info".
        unit: base unit ("seconds", "ratio", "bytes", ...) or "" when unitless.
        help: one sentence for # HELP and the README.
        labels: label names in exposition order.
        deep: only present when deep statistics are enabled (every N steps).
    """

    name: str
    type: str
    unit: str
    help: str
    labels: tuple[str, ...]
    deep: bool = False

    @property
    def family_name(self) -> str:
        """The name prometheus_client wants for the family (without _total/_info)."""
        if self.type == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        if self.type == "info" and self.name.endswith("_info"):
            return self.name[: -len("_info")]
        return self.name

    @property
    def series_names(self) -> tuple[str, ...]:
        """Every series name this metric produces in the exposition."""
        if self.type == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        if self.type == "counter":
            return (self.name, f"{self.family_name}_created")
        return (self.name,)


T = ("job", "rank")  # every trainer metric

# Step durations range from milliseconds (small models) to minutes (huge ones).
STEP_DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)

METRICS: tuple[MetricSpec, ...] = (
    # --- per step --------------------------------------------------------------
    MetricSpec("adamwatch_loss", "gauge", "",
               "Training loss at the trainer's latest step: the mean over that step's micro-batches "
               "(gradient accumulation).", T),
    MetricSpec("adamwatch_grad_norm", "gauge", "",
               "L2 norm of the unscaled gradients at the latest step, before any clipping; "
               "param_group=\"all\" is the global norm.",
               T + ("param_group",)),
    MetricSpec("adamwatch_learning_rate", "gauge", "", "Scheduled learning rate of each param group at the latest step.",
               T + ("param_group",)),
    MetricSpec("adamwatch_optimizer_step", "gauge", "", "Optimizer step index the trainer reached.", T),
    MetricSpec("adamwatch_steps_total", "counter", "", "Optimizer steps reported by the trainer.", T),
    MetricSpec("adamwatch_step_rewinds_total", "counter", "",
               "Times the reported optimizer step went backwards within one trainer session (a checkpoint "
               "restore, a loop restarting its counter); adamwatch_optimizer_step is not monotonic across them.", T),
    MetricSpec("adamwatch_nonfinite_steps_total", "counter", "",
               "Steps whose loss (source=\"loss\") or gradients (source=\"grad\") held NaN or Inf "
               "(GradScaler overflows count as skipped steps, not here).",
               T + ("source",)),
    MetricSpec("adamwatch_skipped_steps_total", "counter", "",
               "Steps whose update was not applied, by reason (grad_scaler overflow, adamwatch guard).",
               T + ("reason",)),
    MetricSpec("adamwatch_step_duration_seconds", "histogram", "seconds",
               "Wall time between the ends of consecutive optimizer steps.", T),
    MetricSpec("adamwatch_last_step_timestamp_seconds", "gauge", "seconds",
               "Unix time at which the latest optimizer step finished.", T),
    MetricSpec("adamwatch_samples_total", "counter", "",
               "Training samples processed, when the trainer reports samples per step.", T),
    MetricSpec("adamwatch_tokens_total", "counter", "",
               "Training tokens processed, when the trainer reports tokens per step.", T),
    # --- deep statistics (every N steps) ----------------------------------------
    # Quantiles of a sample: exposed as quantile-only summaries (no _sum/_count),
    # the type Prometheus expects for a quantile label.
    MetricSpec("adamwatch_effective_learning_rate", "summary", "",
               "Quantiles of Adam's per-coordinate rate lr/(sqrt(v_hat)+eps) over a fixed coordinate sample.",
               T + ("param_group", "quantile"), deep=True),
    MetricSpec("adamwatch_update_size", "summary", "",
               "Quantiles of the per-coordinate update |lr*m_hat/(sqrt(v_hat)+eps)| over a fixed coordinate sample.",
               T + ("param_group", "quantile"), deep=True),
    MetricSpec("adamwatch_update_to_weight_ratio", "gauge", "ratio",
               "L2 norm of the Adam update lr*m_hat/(sqrt(v_hat)+eps) divided by the L2 norm of the weights, "
               "per param group (AdamW's decoupled weight decay is not included).",
               T + ("param_group",), deep=True),
    MetricSpec("adamwatch_adam_exp_avg_norm", "gauge", "",
               "L2 norm of Adam's first moment m (exp_avg), per param group.", T + ("param_group",), deep=True),
    MetricSpec("adamwatch_adam_exp_avg_sq_norm", "gauge", "",
               "L2 norm of Adam's second moment v (exp_avg_sq), per param group.", T + ("param_group",), deep=True),
    MetricSpec("adamwatch_eps_dominated_ratio", "gauge", "ratio",
               "Share of sampled coordinates where sqrt(v_hat) <= eps, so eps sets the step size.",
               T + ("param_group",), deep=True),
    MetricSpec("adamwatch_deep_stats_step", "gauge", "",
               "Optimizer step at which the deep statistics were last computed.", T, deep=True),
    # --- connection and transport -----------------------------------------------
    MetricSpec("adamwatch_trainer_connected", "gauge", "",
               "1 while the trainer's connection is open, 0 after it closed (until its series expire).", T),
    MetricSpec("adamwatch_trainer_finished", "gauge", "",
               "1 once the trainer said goodbye with a clean or preemption exit (the run ended on purpose, not a "
               "crash); 0 before and after a crash.", T),
    MetricSpec("adamwatch_optimizer_info", "info", "",
               "Optimizer class (Adam, AdamW, SGD, ...), implementation and hyperparameters announced by the trainer "
               "(empty where the optimizer has no such hyperparameter).",
               T + ("optimizer", "implementation", "beta1", "beta2", "eps", "weight_decay", "amsgrad",
                    "world_size", "host", "torch_version", "adamwatch_version", "config_hash")),
    MetricSpec("adamwatch_dropped_summaries_total", "counter", "",
               "Step summaries the trainer dropped because the sidecar was unreachable or slow.", T),
    MetricSpec("adamwatch_frames_rejected_total", "counter", "",
               "Frames the sidecar rejected, by reason (see adamwatch.wire.REJECT_REASONS).", ("reason",)),
    MetricSpec("adamwatch_frame_unknown_fields_total", "counter", "",
               "Accepted frames that carried fields this sidecar does not know (newer trainer).", ()),
    MetricSpec("adamwatch_sidecar_connections", "gauge", "",
               "Open trainer connections, including those that have not said hello yet.", ()),
    MetricSpec("adamwatch_sidecar_connections_refused_total", "counter", "",
               "Trainer connections or HELLOs the sidecar refused, by reason "
               "(see adamwatch_sidecar.admission.REFUSAL_REASONS).", ("reason",)),
    MetricSpec("adamwatch_sidecar_render_errors_total", "counter", "",
               "Scrapes in which one trainer's series could not be rendered and were left out.", ()),
    MetricSpec("adamwatch_sidecar_http_requests_rejected_total", "counter", "",
               "HTTP requests the sidecar refused before a handler ran, by reason "
               "(header_timeout, body_timeout, bad_request, too_large).", ("reason",)),
    # --- checkpoints and remediation --------------------------------------------
    MetricSpec("adamwatch_last_checkpoint_timestamp_seconds", "gauge", "seconds",
               "Unix time of the trainer's latest checkpoint save.", T),
    MetricSpec("adamwatch_last_known_good_checkpoint_timestamp_seconds", "gauge", "seconds",
               "Unix time at which the newest checkpoint was marked known-good.", T),
    MetricSpec("adamwatch_last_known_good_checkpoint_step", "gauge", "",
               "Optimizer step of the newest known-good checkpoint.", T),
    MetricSpec("adamwatch_detections_total", "counter", "",
               "Incidents the sidecar's step-latency detectors raised, by detector.", T + ("detector",)),
    MetricSpec("adamwatch_remediations_total", "counter", "",
               "Remediation actions, by action and outcome (applied, failed, dry_run, rejected, timeout).",
               T + ("action", "outcome")),
    MetricSpec("adamwatch_remediation_ladder_exhausted", "gauge", "",
               "1 when every rung of the remediation ladder has been used up and a human must act.", T),
    MetricSpec("adamwatch_learning_rate_scale", "gauge", "",
               "Cumulative factor adamwatch has applied to the learning rate (1 = untouched).", T),
    MetricSpec("adamwatch_control_requests_rejected_total", "counter", "",
               "Control requests (Alertmanager webhook, ctl) rejected, by endpoint and reason.",
               ("endpoint", "reason")),
    # --- checkpoint health (issue 11 item 4): from the Checkpointer's CHECKPOINT events --------
    # Outcomes are "success" and "failed"; both series appear, at 0, with the
    # trainer's first checkpoint event, so increase() sees the first failure.
    # Time since the newest checkpoint: time() - adamwatch_last_checkpoint_timestamp_seconds.
    MetricSpec("adamwatch_checkpoint_saves_total", "counter", "",
               "Checkpoint saves, by outcome (success; failed: save() raised CheckpointSaveError and kept nothing).",
               T + ("outcome",)),
    MetricSpec("adamwatch_checkpoint_save_duration_seconds", "gauge", "seconds",
               "Wall time of the latest successful checkpoint save (state capture, serialisation, fsync, rename).", T),
    MetricSpec("adamwatch_checkpoint_size_bytes", "gauge", "bytes",
               "Bytes of the data files of the latest saved checkpoint.", T),
    MetricSpec("adamwatch_last_checkpoint_save_failure_timestamp_seconds", "gauge", "seconds",
               "Unix time of the trainer's latest failed checkpoint save.", T),
    MetricSpec("adamwatch_checkpoint_restores_total", "counter", "",
               "Checkpoint restores, by outcome (success; failed: nothing usable, the live state was left unchanged).",
               T + ("outcome",)),
    MetricSpec("adamwatch_checkpoint_restore_duration_seconds", "gauge", "seconds",
               "Wall time of the latest checkpoint restore attempt, successful or failed.", T),
    MetricSpec("adamwatch_corrupt_checkpoints_total", "counter", "",
               "Checkpoints found unusable (invalid manifest, size or sha256 mismatch, unloadable, "
               "or not fitting the live model and optimizer) and skipped.", T),
    # --- optimizer configuration as code (issue 12) ---------------------------------------------
    # config_hash on adamwatch_optimizer_info is the fingerprint; these two follow its changes.
    MetricSpec("adamwatch_optimizer_config_changes_total", "counter", "",
               "Changes of the optimizer's configuration made mid-run by something other than adamwatch "
               "(hyperparameters edited, param groups added), seen at a step boundary.", T),
    MetricSpec("adamwatch_policy_violations", "gauge", "",
               "1 while the trainer's optimizer configuration breaks this optimizer-policy rule, 0 once it "
               "complies again (rule: <policy rule name>.<field>).", T + ("rule",)),
    # --- evaluation, convergence, run ends, footprint (issue 11 items 1-3, 6, 7) ----------
    # Written by adamwatch_sidecar.evaluation, .convergence, .run_end, .footprint.
    MetricSpec("adamwatch_eval_metric", "gauge", "",
               "Latest evaluation result reported with monitor.observe_eval, by name (metric=\"loss\" is the "
               "validation loss).", T + ("metric",)),
    MetricSpec("adamwatch_eval_step", "gauge", "", "Optimizer step the latest evaluation belongs to.", T),
    MetricSpec("adamwatch_eval_timestamp_seconds", "gauge", "seconds",
               "Unix time at which the latest evaluation was observed.", T),
    MetricSpec("adamwatch_evaluations_total", "counter", "", "Evaluations reported by the trainer.", T),
    MetricSpec("adamwatch_eval_overfitting_streak", "gauge", "",
               "Consecutive evaluations at which the validation loss rose while the mean training loss since "
               "the previous evaluation fell (0 after any other evaluation).", T),
    MetricSpec("adamwatch_convergence_target", "gauge", "",
               "Declared convergence target, by metric (\"loss\": training loss; \"eval_<name>\": an evaluation "
               "result).", T + ("metric",)),
    MetricSpec("adamwatch_convergence_eta_seconds", "gauge", "seconds",
               "Estimated seconds until the metric reaches its target at the recent trend (absent when the trend "
               "does not lead there; 0 once reached).", T + ("metric",)),
    MetricSpec("adamwatch_convergence_eta_steps", "gauge", "",
               "Estimated optimizer steps until the metric reaches its target at the recent trend (absent when "
               "the trend does not lead there; 0 once reached).", T + ("metric",)),
    MetricSpec("adamwatch_convergence_reached_seconds", "gauge", "seconds",
               "Seconds from the trainer's first step to the first value at or beyond its target (absent until "
               "reached).", T + ("metric",)),
    MetricSpec("adamwatch_convergence_reached_step", "gauge", "",
               "Optimizer step at which the metric first reached its target (absent until reached).",
               T + ("metric",)),
    MetricSpec("adamwatch_convergence_plateau", "gauge", "",
               "1 while the metric has not reached its target and its trend over the plateau window improves "
               "by less than the configured share although the learning rate is not negligible; else 0.",
               T + ("metric",)),
    MetricSpec("adamwatch_trainer_starts_total", "counter", "",
               "Trainer processes that said hello (new sessions: starts and restarts).", T),
    MetricSpec("adamwatch_trainer_exits_total", "counter", "",
               "How trainer processes ended, by reason (clean, exception, oom, preemption, signal, vanished).",
               T + ("reason",)),
    MetricSpec("adamwatch_trainer_exception_exits_total", "counter", "",
               "Trainer processes ended by an uncaught exception, by exception type (at most 16 types, then "
               "\"other\").", T + ("exception",)),
    MetricSpec("adamwatch_runs_ended_total", "counter", "",
               "Runs ended, by outcome: success (clean, no non-finite step), nonfinite, oom, crashed "
               "(exception, signal or vanished), preempted. Exported by rank 0 only: one run per job.",
               T + ("outcome",)),
    MetricSpec("adamwatch_runs_target_total", "counter", "",
               "Runs with a convergence target that ended (not preempted), by outcome: reached (within the "
               "budget, when one is configured) or missed. Exported by rank 0 only.", T + ("outcome",)),
    MetricSpec("adamwatch_trainer_device_seconds_total", "counter", "seconds",
               "Wall seconds the trainer was connected, by the device type it trains on (GPU-hours: "
               "device=\"cuda\" / 3600).", T + ("device",)),
    MetricSpec("adamwatch_run_info", "gauge", "",
               "1 per trainer, labelled with the model family it announced (empty when none).",
               T + ("model_family",)),
    MetricSpec("adamwatch_param_bytes", "gauge", "bytes",
               "Bytes of the parameters the optimizer updates on this rank, by dtype.", T + ("dtype",)),
    MetricSpec("adamwatch_optimizer_state_bytes", "gauge", "bytes",
               "Bytes of the optimizer state (m, v, step) on this rank, by dtype.", T + ("dtype",)),
    MetricSpec("adamwatch_device_memory_peak_bytes", "gauge", "bytes",
               "Peak bytes allocated by tensors on this rank's CUDA device (absent on CPU).", T),
    MetricSpec("adamwatch_device_memory_reserved_bytes", "gauge", "bytes",
               "Bytes reserved by the CUDA caching allocator on this rank's device (absent on CPU).", T),
    # --- replica consistency (issue 9 item 4) -------------------------------------------
    MetricSpec("adamwatch_parameter_fingerprint", "gauge", "",
               "Fingerprint of the rank's parameters and Adam state (an integer below 2^52) at "
               "adamwatch_parameter_fingerprint_step; data-parallel replicas at the same step must agree.", T),
    MetricSpec("adamwatch_parameter_fingerprint_step", "gauge", "",
               "Optimizer step at which adamwatch_parameter_fingerprint was computed.", T),
    MetricSpec("adamwatch_replica_divergence", "gauge", "",
               "1 when this rank's latest fingerprint differs from the most common one among the ranks of its "
               "job that this sidecar saw at the same step, else 0.", T),
    # --- on-device spike guard (issue 14): from the STEP frame's extras ------------------
    # Present only when the trainer runs watch(spike_guard=...); the counter's series
    # appears at 0 with the first armed step so increase() sees the first activation.
    MetricSpec("adamwatch_spike_guard_activations_total", "counter", "",
               "Steps the on-device spike guard acted on, by mode (clip: gradients scaled down to the "
               "threshold; skip: update not applied).", T + ("mode",)),
    MetricSpec("adamwatch_spike_guard_threshold", "gauge", "",
               "The spike guard's current bound mean + k*std, by signal (grad_norm: pre-clip global norm; "
               "loss: skip mode only).", T + ("signal",)),
    MetricSpec("adamwatch_spike_guard_zscore", "gauge", "",
               "z-score (value - mean) / std of the latest step against the spike guard's statistics, by signal.",
               T + ("signal",)),
    # --- cross-rank reduction (issue 9): from the STEP frame's extras ----------------------
    # Present on multi-rank runs; at 0 from the first step, so increase() sees the first failure.
    MetricSpec("adamwatch_cross_rank_failed_steps_total", "counter", "",
               "Steps whose cross-rank reduction lacked a rank's payload (the monitor failed on that rank, "
               "which counts it in adamwatch_monitor_errors_total); under sharding such a step exports no "
               "gradient norm.", T),
    # --- mixed precision (issue 11 item 5): from the STEP frame's extras -------------------
    # The overflow-skip rate is rate(adamwatch_skipped_steps_total{reason="grad_scaler"}).
    MetricSpec("adamwatch_grad_scaler_scale", "gauge", "",
               "GradScaler's loss scale used by the latest step.", T),
    MetricSpec("adamwatch_grad_zero_ratio", "gauge", "ratio",
               "Share of sampled gradient coordinates that are exactly zero (an fp16 underflow signal), "
               "per param group, every N steps.", T + ("param_group",)),
    # --- gradient clipping (issue 8 item 1): adamwatch_grad_norm stays the pre-clip norm --------
    MetricSpec("adamwatch_grad_clip_coefficient", "gauge", "ratio",
               "Factor gradient clipping applied at the latest clipped step, min(1, max_norm/pre-clip norm); "
               "1 means the norm was within max_norm.", T),
    MetricSpec("adamwatch_grad_clip_max_norm", "gauge", "",
               "max_norm of the trainer's gradient clipping at its latest clipped step.", T),
    MetricSpec("adamwatch_clipped_steps_total", "counter", "",
               "Steps whose gradients clipping scaled down (pre-clip norm above max_norm).", T),
    # --- where a NaN began, under torch.distributed (issue 9 item 5; adamwatch.cross_rank) -------------
    MetricSpec("adamwatch_nonfinite_origin_steps_total", "counter", "",
               "Steps at which this rank's own loss (source=\"loss\") or its own gradients before the ranks' "
               "reduction (source=\"grad\") were non-finite.", T + ("source",)),
    MetricSpec("adamwatch_nonfinite_origin_step", "gauge", "",
               "Step at which this rank's latest streak of its own non-finite loss or gradients began.",
               T + ("source",)),
    MetricSpec("adamwatch_nonfinite_first_rank", "gauge", "",
               "Lowest rank whose own loss or gradients were non-finite, at the latest step where any rank's were.",
               T),
    # --- never silently blind (issue 8 item 8) -----------------------------------
    MetricSpec("adamwatch_monitor_errors_total", "counter", "",
               "Failures inside the trainer's monitor, by where (a step it could not summarise, its reader "
               "thread, a step extension, ...); each is logged once by the trainer.",
               T + ("where",)),
    MetricSpec("adamwatch_trainer_hello_timestamp_seconds", "gauge", "seconds",
               "Unix time at which the sidecar received the trainer's latest hello (connection or reconnection).",
               T),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


def metric(name: str) -> MetricSpec:
    """Look up a metric by its exposed name; KeyError names the unknown metric."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in adamwatch_sidecar.metric_table.METRICS") from None


def render_markdown_reference() -> str:
    """The README's metric reference, generated from METRICS."""
    lines = [
        "| metric | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for m in METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels) or "—"
        meaning = m.help + (" *(deep statistics, every N steps)*" if m.deep else "")
        lines.append(f"| `{m.name}` | {m.type} | {labels} | {meaning} |")
    return "\n".join(lines) + "\n"
