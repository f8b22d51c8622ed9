"""`kvroute serve` flags of the autoscaler and the cost reports (fields of `RouterConfig`)."""

from __future__ import annotations

import argparse
from typing import Any

# (flag, config field, type, help); every default is None so unset flags fall through to env/file/defaults.
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--autoscale-scaler", "autoscale_scaler", str, "sim | command | kubernetes (default sim)"),
    ("--autoscale-interval-s", "autoscale_interval_s", float, "seconds between decisions (default 10)"),
    ("--autoscale-window-s", "autoscale_window_s", float, "seconds of traffic a decision reads (default 30)"),
    ("--autoscale-up-window-s", "autoscale_up_window_s", float, "shorter rate window for growth (10)"),
    ("--autoscale-min-prefill", "autoscale_min_prefill", int, "prefill workers at least (default 1)"),
    ("--autoscale-max-prefill", "autoscale_max_prefill", int, "prefill workers at most (default 8)"),
    ("--autoscale-min-decode", "autoscale_min_decode", int, "decode workers at least (default 1)"),
    ("--autoscale-max-decode", "autoscale_max_decode", int, "decode workers at most (default 8)"),
    ("--autoscale-up-cooldown-s", "autoscale_up_cooldown_s", float, "seconds before a pool grows again"),
    ("--autoscale-down-cooldown-s", "autoscale_down_cooldown_s", float, "seconds before a pool shrinks"),
    ("--autoscale-hysteresis", "autoscale_hysteresis", float, "rate margin a shrink must hold (default 0.2)"),
    ("--autoscale-down-intervals", "autoscale_down_intervals", int, "decisions in a row before a shrink"),
    ("--autoscale-max-step-down", "autoscale_max_step_down", int, "workers one shrink removes at most (1)"),
    ("--autoscale-profile", "autoscale_profile", str, "GPU cost profile of the planner"),
    ("--autoscale-max-utilization", "autoscale_max_utilization", float, "prefill utilisation planned for"),
    (
        "--autoscale-ttft-attainment",
        "autoscale_ttft_attainment",
        float,
        "share of requests the prefill pool is sized to bring within --slo-ttft-s (default 0.95)",
    ),
    (
        "--autoscale-shrink-min-samples",
        "autoscale_shrink_min_samples",
        int,
        "prompt samples needed before a pool shrinks (default 200; 0 = none)",
    ),
    ("--autoscale-command", "autoscale_command", str, "scaler=command: the hook (JSON on stdin)"),
    ("--autoscale-command-timeout-s", "autoscale_command_timeout_s", float, "hook time limit (s)"),
    ("--autoscale-k8s-namespace", "autoscale_k8s_namespace", str, "scaler=kubernetes: namespace"),
    ("--autoscale-k8s-prefill-deployment", "autoscale_k8s_prefill_deployment", str, "prefill Deployment"),
    ("--autoscale-k8s-decode-deployment", "autoscale_k8s_decode_deployment", str, "decode Deployment"),
    ("--autoscale-sim-startup-s", "autoscale_sim_startup_s", float, "scaler=sim: engine start-up (s)"),
    ("--autoscale-sim-time-scale", "autoscale_sim_time_scale", float, "scaler=sim: wall s per engine s"),
    ("--slo-ttft-s", "slo_ttft_s", float, "TTFT target (s) for the planner and cost reports (default 1)"),
    ("--slo-itl-s", "slo_itl_s", float, "mean ITL target (s) for the planner and cost reports (0.05)"),
    ("--gpu-hour-cost", "gpu_hour_cost", float, "price of one GPU-hour in cost reports (0 = unknown)"),
    ("--gpus-per-prefill-worker", "gpus_per_prefill_worker", int, "GPUs per prefill engine (default 1)"),
    ("--gpus-per-decode-worker", "gpus_per_decode_worker", int, "GPUs per decode engine (default 1)"),
    ("--gpus-per-worker", "gpus_per_worker", int, "GPUs per regular engine (default 1)"),
]


def add_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("autoscaling and cost (docs/autoscale.md)")
    g.add_argument(
        "--autoscale", action="store_true", default=None, help="scale the PD pools from live demand"
    )
    for flag, dest, typ, help_ in FLAGS:
        g.add_argument(flag, dest=dest, type=typ, default=None, help=help_)


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {dest: getattr(args, dest, None) for _, dest, _, _ in FLAGS}
    out["autoscale"] = getattr(args, "autoscale", None)
    return out
