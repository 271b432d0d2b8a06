"""Optimizer policy: which configurations a job may train with, declared in the sidecar config.

    optimizer_policy:
      enforce: warn                 # default for every rule: warn | stop
      rules:
        - name: prod-llm            # label value: the rule's name and the field, "prod-llm.peak_lr"
          jobs: ["prod-*"]          # fnmatch patterns on the job name
          enforce: stop             # this rule stops the run before its first step
          peak_lr: {min: 1.0e-5, max: 3.0e-4}
          beta1: {min: 0.85, max: 0.95}
          beta2: {min: 0.95, max: 0.999}
          eps: {min: 1.0e-10, max: 1.0e-6}
          weight_decay: {max: 0.1}
          amsgrad: false
          implementation: [fused, foreach]
          require: {checkpointer: true, guard: true, deep_stats: true}

    >>> policy = parse_policy({"rules": [{"name": "r", "jobs": ["prod-*"], "eps": {"max": 1e-6}}]})
    >>> config = {"optimizer": {"implementation": "fused"}, "param_groups": [{"name": "0", "eps": 1e-3}]}
    >>> [v.rule for v in evaluate(policy, "prod-gpt", config, {})]
    ['r.eps']
    >>> evaluate(policy, "dev-gpt", config, {})
    []

Ranges are inclusive and apply to every param group. A field a rule does not
name is not checked. A value the trainer could not read (a hyperparameter held
in a device tensor, described as ``"tensor on cuda"``) violates any range on
it: a policy that cannot be checked is not met.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "ENFORCE_MODES",
    "RANGE_FIELDS",
    "FEATURES",
    "PolicyError",
    "PolicyRule",
    "OptimizerPolicy",
    "Violation",
    "parse_policy",
    "evaluate",
    "verdict",
]

ENFORCE_MODES = ("warn", "stop")
#: range-checked fields: name -> how to read it from one param group of the configuration
RANGE_FIELDS = ("peak_lr", "beta1", "beta2", "eps", "weight_decay")
#: features a rule can require (the HELLO's ``features``)
FEATURES = ("checkpointer", "guard", "deep_stats")
_RULE_KEYS = frozenset({"name", "jobs", "enforce", "amsgrad", "implementation", "require", *RANGE_FIELDS})


class PolicyError(ValueError):
    """The policy is invalid; the message starts with the field's path (``optimizer_policy.rules[0].eps``)."""


@dataclass(frozen=True)
class PolicyRule:
    """One rule: which jobs it covers and what it allows."""

    name: str
    jobs: tuple[str, ...]
    enforce: str
    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    amsgrad: bool | None = None
    implementations: tuple[str, ...] | None = None
    require: dict[str, bool] = field(default_factory=dict)

    def covers(self, job: str) -> bool:
        """Whether ``job`` matches one of the rule's patterns."""
        return any(fnmatch.fnmatchcase(job, pattern) for pattern in self.jobs)


@dataclass(frozen=True)
class OptimizerPolicy:
    """Every rule, in the order declared."""

    rules: tuple[PolicyRule, ...] = ()

    @property
    def empty(self) -> bool:
        """No rule at all: nothing is ever a violation."""
        return not self.rules


@dataclass(frozen=True)
class Violation:
    """One broken rule.

    Args:
        rule: ``<rule name>.<field>``, the ``rule`` label of ``adamwatch_policy_violations``.
        enforce: "warn" or "stop".
        message: what was found and what is allowed.
    """

    rule: str
    enforce: str
    message: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"rule": self.rule, "enforce": self.enforce, "message": self.message}


def _number(where: str, value: Any) -> float:
    if isinstance(value, str):
        # PyYAML (YAML 1.1) reads 3e-4 without a dot as a string, and helm's
        # toYaml writes 1e-05 so: accept the numbers people write.
        try:
            value = float(value)
        except ValueError:
            raise PolicyError(f"{where}: must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyError(f"{where}: must be a finite number, got {value!r}")
    return float(value)


def _range(where: str, value: Any) -> tuple[float | None, float | None]:
    if not isinstance(value, Mapping) or not value or set(value) - {"min", "max"}:
        raise PolicyError(f"{where}: must be a mapping with min and/or max, got {value!r}")
    low = _number(f"{where}.min", value["min"]) if "min" in value else None
    high = _number(f"{where}.max", value["max"]) if "max" in value else None
    if low is not None and high is not None and low > high:
        raise PolicyError(f"{where}: min {low:g} is above max {high:g}")
    return low, high


def _rule(where: str, raw: Any, default_enforce: str) -> PolicyRule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise PolicyError(f"{where}.name: must be a string of 1 to 64 characters, got {name!r}")
    jobs = raw.get("jobs", ["*"])
    if isinstance(jobs, str):
        jobs = [jobs]
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, str) and j for j in jobs):
        raise PolicyError(f"{where}.jobs: must be a list of job-name patterns, got {jobs!r}")
    enforce = raw.get("enforce", default_enforce)
    if enforce not in ENFORCE_MODES:
        raise PolicyError(f"{where}.enforce: must be one of {', '.join(ENFORCE_MODES)}, got {enforce!r}")
    ranges = {key: _range(f"{where}.{key}", raw[key]) for key in RANGE_FIELDS if key in raw}
    amsgrad = raw.get("amsgrad")
    if amsgrad is not None and not isinstance(amsgrad, bool):
        raise PolicyError(f"{where}.amsgrad: must be true or false, got {amsgrad!r}")
    implementations = raw.get("implementation")
    if implementations is not None:
        if isinstance(implementations, str):
            implementations = [implementations]
        allowed = ("for-loop", "foreach", "fused")
        if not isinstance(implementations, list) or not implementations \
                or not all(i in allowed for i in implementations):
            raise PolicyError(f"{where}.implementation: must be a list of {', '.join(allowed)}, got {implementations!r}")
        implementations = tuple(implementations)
    require = raw.get("require", {})
    if not isinstance(require, Mapping):
        raise PolicyError(f"{where}.require: must be a mapping, got {require!r}")
    for key, value in require.items():
        if key not in FEATURES:
            raise PolicyError(f"{where}.require.{key}: unknown feature (known: {', '.join(FEATURES)})")
        if not isinstance(value, bool):
            raise PolicyError(f"{where}.require.{key}: must be true or false, got {value!r}")
    return PolicyRule(name, tuple(jobs), enforce, ranges, amsgrad, implementations, dict(require))


def parse_policy(raw: Any, where: str = "optimizer_policy") -> OptimizerPolicy:
    """Validate the ``optimizer_policy`` mapping of the sidecar config.

    Args:
        raw: the parsed YAML value (None or ``{}``: no policy).
        where: the field path used in error messages.

    Returns:
        The policy.

    Raises:
        PolicyError: naming the first bad field.
    """
    if raw is None:
        return OptimizerPolicy()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"enforce", "rules"})
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}: unknown key (known: enforce, rules)")
    enforce = raw.get("enforce", "warn")
    if enforce not in ENFORCE_MODES:
        raise PolicyError(f"{where}.enforce: must be one of {', '.join(ENFORCE_MODES)}, got {enforce!r}")
    rules_raw = raw.get("rules", [])
    if not isinstance(rules_raw, list):
        raise PolicyError(f"{where}.rules: must be a list, got {type(rules_raw).__name__}")
    rules = tuple(_rule(f"{where}.rules[{i}]", r, enforce) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PolicyError(f"{where}.rules: rule names must be unique, {duplicates[0]!r} repeats")
    return OptimizerPolicy(rules)


def _group_value(group: Mapping[str, Any], key: str) -> Any:
    if key in ("beta1", "beta2"):
        betas = group.get("betas")
        if isinstance(betas, list) and len(betas) == 2:
            return betas[0 if key == "beta1" else 1]
        return None
    return group.get(key)


def _in_range(value: Any, low: float | None, high: float | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _shown(low: float | None, high: float | None) -> str:
    if low is None:
        return f"<= {high:g}"
    if high is None:
        return f">= {low:g}"
    return f"in [{low:g}, {high:g}]"


def evaluate(policy: OptimizerPolicy, job: str, config: Mapping[str, Any] | None,
             features: Mapping[str, Any] | None) -> list[Violation]:
    """Every violation of the rules covering ``job``.

    Args:
        policy: from :func:`parse_policy`.
        job: the job name.
        config: the trainer's configuration (``adamwatch.optimizer_config.capture_config``);
            None when the trainer sent none (an older trainer): only feature rules apply then.
        features: ``{"checkpointer", "guard", "deep_stats"}`` booleans (missing ones count as off).

    Returns:
        One :class:`Violation` per broken (rule, field), in rule order; each field once.
    """
    out: list[Violation] = []
    features = features if isinstance(features, Mapping) else {}
    if config is not None and not isinstance(config.get("param_groups"), list):
        config = None  # not a configuration this sidecar can read: checked as if none was sent
    groups = [g if isinstance(g, Mapping) else {} for g in (config or {}).get("param_groups") or []]
    optimizer = (config or {}).get("optimizer")
    implementation = optimizer.get("implementation") if isinstance(optimizer, Mapping) else None
    for rule in policy.rules:
        if not rule.covers(job):
            continue
        for key, (low, high) in rule.ranges.items():
            if config is None:
                out.append(Violation(f"{rule.name}.{key}", rule.enforce,
                                     f"{key}: the trainer sent no configuration to check (allowed {_shown(low, high)})"))
                continue
            bad = [(g.get("name", str(i)), _group_value(g, key)) for i, g in enumerate(groups)
                   if not _in_range(_group_value(g, key), low, high)]
            if bad:
                found = ", ".join(f"group {name}: {value!r}" for name, value in bad)
                out.append(Violation(f"{rule.name}.{key}", rule.enforce,
                                     f"{key} must be {_shown(low, high)}; found {found}"))
        if rule.amsgrad is not None and config is not None:
            bad = [g.get("name", str(i)) for i, g in enumerate(groups) if bool(g.get("amsgrad", False)) != rule.amsgrad]
            if bad:
                out.append(Violation(f"{rule.name}.amsgrad", rule.enforce,
                                     f"amsgrad must be {str(rule.amsgrad).lower()}; groups {', '.join(bad)} differ"))
        if rule.implementations is not None and config is not None and implementation not in rule.implementations:
            out.append(Violation(f"{rule.name}.implementation", rule.enforce,
                                 f"implementation must be one of {', '.join(rule.implementations)}; "
                                 f"found {implementation!r}"))
        for feature, wanted in rule.require.items():
            if wanted and not features.get(feature):
                out.append(Violation(f"{rule.name}.require.{feature}", rule.enforce,
                                     f"{feature} is required but is off"))
    return out


def verdict(violations: list[Violation]) -> str:
    """"ok", "warn" or "stop" (the most severe enforcement among the violations)."""
    if not violations:
        return "ok"
    return "stop" if any(v.enforce == "stop" for v in violations) else "warn"
