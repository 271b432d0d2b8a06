"""The adamwatch demo: a real sidecar, a small GPT training on CPU, an incident, and its repair.

    bash scripts/demo.sh                  # set-up, then this script (about a minute)
    python examples/demo.py --no-incident # the same without the learning-rate blow-up

What happens:
1. ``adamwatch-sidecar`` starts on a Unix socket with the default remediation
   policy; the /metrics URL is printed.
2. TinyGPT trains with a watched AdamW (fused), a warmup-cosine schedule and an
   ``adamwatch.Checkpointer``; every few seconds a live line is read back from
   /metrics, so what you see is what Prometheus would scrape.
3. At a known step the learning rate blows up (x50 for 3 steps, as a bad
   schedule or a bad config push would do). The loss spikes; the sidecar's
   detector sees it at step latency, cuts the learning rate, and when the spike
   persists restores the newest known-good checkpoint from before it.
4. Meanwhile an undisturbed run with the same seed trains in a second process;
   at the end both evaluation losses are printed side by side, with the
   sidecar's audit log of what it did.

Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import adamwatch  # noqa: E402
from tiny_gpt import ArithmeticCorpus, GPTConfig, TinyGPT, warmup_cosine  # noqa: E402

MODEL = GPTConfig(n_embd=64)
BATCH = 16
PEAK_LR = 2e-3
BLOWUP = 50.0  # learning-rate multiplier during the incident
BLOWUP_STEPS = 3


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def sidecar_command() -> list[str]:
    exe = shutil.which("adamwatch-sidecar", path=os.path.dirname(sys.executable)) or shutil.which("adamwatch-sidecar")
    return [exe] if exe else [sys.executable, "-m", "adamwatch_sidecar.cli"]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"adamwatch-sidecar exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"adamwatch-sidecar not ready at {url} after {timeout}s")


def read_metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Parse an exposition into {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


class LivePrinter:
    """Every few seconds: one line of what /metrics says, plus any new remediation."""

    def __init__(self, metrics_url: str, job: str):
        self.url = metrics_url
        self.job = job
        self.seen_actions: dict[tuple, float] = {}

    def line(self) -> list[str]:
        m = read_metrics(self.url)
        base = {"job": self.job, "rank": "0"}

        def get(name: str, **labels: str) -> float | None:
            return m.get((name, tuple(sorted({**base, **labels}.items()))))

        out = []
        for (name, labels), value in sorted(m.items()):
            if name == "adamwatch_remediations_total" and ("job", self.job) in labels:
                if value > self.seen_actions.get(labels, 0):
                    d = dict(labels)
                    out.append(f"  >> sidecar remediation: {d['action']} -> {d['outcome']} (total {int(value)})")
                    self.seen_actions[labels] = value
        step, loss = get("adamwatch_optimizer_step"), get("adamwatch_loss")
        if step is None:
            return ["waiting for the first step ..."] + out
        norm, lr = get("adamwatch_grad_norm", param_group="all"), get("adamwatch_learning_rate", param_group="decay")
        dropped = get("adamwatch_dropped_summaries_total") or 0
        out.insert(0, f"step {int(step):>5}  loss {loss:7.4f}  grad_norm {norm:8.4f}  lr {lr:.2e}"
                      f"  dropped {int(dropped)}   (read from /metrics)")
        return out


def evaluate(model: TinyGPT) -> float:
    """Loss on fixed held-out batches (another seed), the same for every run."""
    corpus = ArithmeticCorpus(MODEL.block_size, seed=12345)
    model.eval()
    with torch.no_grad():
        loss = sum(model(*corpus.batch(64)).item() for _ in range(4)) / 4
    model.train()
    return loss


def make_run(seed: int, steps: int):
    torch.manual_seed(seed)
    model = TinyGPT(MODEL)
    optimizer = torch.optim.AdamW(model.param_groups(), lr=PEAK_LR, fused=True)
    scheduler = warmup_cosine(optimizer, warmup=50, total=steps)
    corpus = ArithmeticCorpus(MODEL.block_size, seed=seed)
    return model, optimizer, scheduler, corpus


def reference_run(args: argparse.Namespace) -> int:
    """The undisturbed run (second process): same seed, same steps, no adamwatch."""
    torch.set_num_threads(1)
    model, optimizer, scheduler, corpus = make_run(args.seed, args.steps)
    for _ in range(args.steps):
        loss = model(*corpus.batch(BATCH))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"eval_loss": evaluate(model)}))
    return 0


def watched_run(args: argparse.Namespace, endpoint: str, ckpt_dir: str, stop: threading.Event) -> dict:
    torch.set_num_threads(1)
    model, optimizer, scheduler, corpus = make_run(args.seed, args.steps)
    incident_at = None if args.no_incident else int(args.steps * 0.45)
    ckpt = adamwatch.Checkpointer(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler, keep=4,
                                  good_window=20)
    started = time.monotonic()
    iteration = 0
    with adamwatch.watch(
        optimizer, scheduler=scheduler, checkpointer=ckpt, endpoint=endpoint, job=args.job,
        samples_per_step=BATCH, tokens_per_step=BATCH * MODEL.block_size,
        lr_recovery_steps=100,  # once healthy again, give the learning rate back gradually
        model_family="tiny-gpt",  # groups runs on the Executive dashboard
    ) as monitor:
        # The restored run trains until it has done as many optimizer steps as
        # the reference; batches drawn meanwhile are simply not replayed, which
        # is "skipping the data around the spike".
        while monitor.step < args.steps and not stop.is_set() and time.monotonic() - started < args.seconds:
            blowup = incident_at is not None and incident_at <= iteration < incident_at + BLOWUP_STEPS
            if blowup:
                if iteration == incident_at:
                    print(f"  !! incident: learning rate x{BLOWUP:g} for {BLOWUP_STEPS} steps from step {monitor.step + 1}",
                          flush=True)
                for group in optimizer.param_groups:
                    group["lr"] *= BLOWUP
            loss = model(*corpus.batch(BATCH))
            loss.backward()
            monitor.observe_loss(loss)
            optimizer.step()
            if blowup:
                for group in optimizer.param_groups:
                    group["lr"] /= BLOWUP
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            iteration += 1
            if monitor.step % 50 == 0:
                ckpt.save(monitor.step)
            if iteration % 100 == 0:
                # held-out loss (fixed batches, own generator: training is unchanged)
                monitor.observe_eval(loss=evaluate(model))
        time.sleep(0.5)  # let the last summaries and acks reach the sidecar
        result = {"steps": monitor.step, "iterations": iteration, "eval_loss": evaluate(model),
                  "lr_scale": monitor.lr_scale, "seconds": time.monotonic() - started}
    return result


def print_audit(path: str) -> None:
    if not os.path.exists(path):
        return
    print("adamwatch demo: the sidecar's audit log (what it decided and what happened):")
    with open(path) as f:
        for raw in f:
            entry = json.loads(raw)
            fields = [f"{k}={entry[k]}" for k in ("event", "detector", "action", "step", "outcome") if entry.get(k) is not None]
            print("  " + "  ".join(fields))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="adamwatch demo: sidecar + TinyGPT on CPU, an incident and its repair")
    parser.add_argument("--steps", type=int, default=1800, help="optimizer steps of each run")
    parser.add_argument("--seconds", type=float, default=120.0, help="hard time limit of the watched run")
    parser.add_argument("--metrics-port", type=int, default=9400)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between live lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--job", default="demo-tinygpt")
    parser.add_argument("--no-incident", action="store_true", help="train without the learning-rate blow-up")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        return reference_run(args)

    logging.basicConfig(level=logging.WARNING, format="  [trainer] %(message)s")
    logging.getLogger("adamwatch.remediation").setLevel(logging.INFO)

    workdir = tempfile.mkdtemp(prefix="adamwatch-demo-")
    sock = os.path.join(workdir, "adamwatch.sock")
    audit = os.path.join(workdir, "audit.jsonl")
    config = os.path.join(workdir, "sidecar.yaml")
    with open(config, "w") as f:
        json.dump({"remediation": {"audit": {"path": audit}}, "log_level": "warning"}, f)  # JSON is YAML
    port = free_port(args.metrics_port)
    processes: list[subprocess.Popen] = []
    stop = threading.Event()
    printer: threading.Thread | None = None
    try:
        sidecar = subprocess.Popen(
            sidecar_command() + ["serve", "--listen", f"unix://{sock}", "--metrics-address", f"127.0.0.1:{port}",
                                 "--config", config],
            start_new_session=True,  # Ctrl-C reaches us; we stop the children ourselves, in order
        )
        processes.append(sidecar)
        wait_ready(f"http://127.0.0.1:{port}/readyz", sidecar)
        reference = subprocess.Popen(
            [sys.executable, __file__, "--reference", "--steps", str(args.steps), "--seed", str(args.seed)],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        processes.append(reference)
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        print(f"adamwatch demo: sidecar pid {sidecar.pid}, trainer socket unix://{sock}")
        print(f"adamwatch demo: metrics at {metrics_url}  (try: curl -s {metrics_url} | grep adamwatch_loss)")
        print(f"adamwatch demo: status page at http://127.0.0.1:{port}/  (open it in a browser: live charts, "
              f"the incident and its repair)")
        print(f"adamwatch demo: training TinyGPT for {args.steps} steps on CPU; an undisturbed run with the same "
              f"seed trains in process {reference.pid}; Ctrl-C stops cleanly")
        live = LivePrinter(metrics_url, args.job)

        def print_live() -> None:
            while not stop.wait(args.interval):
                try:
                    print("\n".join(live.line()), flush=True)
                except Exception as exc:  # the demo keeps going; say why a line is missing
                    print(f"(could not read {metrics_url}: {exc})", flush=True)

        printer = threading.Thread(target=print_live, daemon=True)
        printer.start()
        result = watched_run(args, f"unix://{sock}", os.path.join(workdir, "checkpoints"), stop)
        stop.set()
        printer.join(args.interval + 1)
        print("\n".join(live.line()))
        out, _ = reference.communicate(timeout=300)
        undisturbed = json.loads(out.strip().splitlines()[-1])["eval_loss"]
        print(f"adamwatch demo: done: {result['steps']} optimizer steps ({result['iterations']} iterations) "
              f"in {result['seconds']:.1f}s")
        print_audit(audit)
        gap = (result["eval_loss"] - undisturbed) / undisturbed
        label = "undisturbed" if args.no_incident else "with the incident, repaired by adamwatch"
        print(f"adamwatch demo: eval loss, undisturbed run (same seed):      {undisturbed:.4f}")
        print(f"adamwatch demo: eval loss, {label}: {result['eval_loss']:.4f}  "
              f"({gap:+.1%}; learning-rate scale left {result['lr_scale']:g})")
        return 0
    except KeyboardInterrupt:
        print("\nadamwatch demo: interrupted, stopping trainer, reference run and sidecar")
        return 130
    finally:
        stop.set()
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
