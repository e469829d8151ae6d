"""Results of a benchmark run: samples per metric and configuration, the table, the JSON and the chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    section: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 1


METRICS = [
    Metric("blob_mb_s", "1. Blob GET (one client, curl -o /dev/null)", "throughput", "MB/s", True, 0),
    Metric("blob_ttfb_ms", "1. Blob GET (one client, curl -o /dev/null)", "time to first byte", "ms", False, 1),
    Metric("blob_proxy_cpu_s_per_gib", "1. Blob GET (one client, curl -o /dev/null)", "proxy CPU", "s/GiB", False, 2),
    Metric(
        "blob_registry_cpu_s_per_gib", "1. Blob GET (one client, curl -o /dev/null)", "registry CPU", "s/GiB", False, 2
    ),
    Metric("blob_peak_rss_mb", "1. Blob GET (one client, curl -o /dev/null)", "proxy peak RSS (max)", "MB", False, 0),
    Metric(
        "blob_peak_rss_sum_mb", "1. Blob GET (one client, curl -o /dev/null)", "proxy peak RSS (sum)", "MB", False, 0
    ),
    Metric("blob2_mb_s", "1b. Two blob GETs at once (aggregate)", "aggregate throughput", "MB/s", True, 0),
    Metric("head_seq_p50_ms", "2. Manifest HEAD, sequential, one keep-alive connection", "p50", "ms", False, 2),
    Metric("head_seq_p99_ms", "2. Manifest HEAD, sequential, one keep-alive connection", "p99", "ms", False, 2),
    Metric("head_seq_rps", "2. Manifest HEAD, sequential, one keep-alive connection", "requests/s", "req/s", True, 0),
    Metric(
        "head_seq_server_cpu_ms",
        "2. Manifest HEAD, sequential, one keep-alive connection",
        "proxy CPU",
        "ms/req",
        False,
        2,
    ),
    Metric(
        "head_seq_loadgen_cpu_ms",
        "2. Manifest HEAD, sequential, one keep-alive connection",
        "load generator CPU",
        "ms/req",
        False,
        3,
    ),
    Metric("head_conc_rps", "2b. Manifest HEAD, 16 concurrent connections", "requests/s", "req/s", True, 0),
    Metric("head_conc_p50_ms", "2b. Manifest HEAD, 16 concurrent connections", "p50", "ms", False, 1),
    Metric("head_conc_p99_ms", "2b. Manifest HEAD, 16 concurrent connections", "p99", "ms", False, 1),
    Metric(
        "head_conc_loadgen_cpu_ms",
        "2b. Manifest HEAD, 16 concurrent connections",
        "load generator CPU",
        "ms/req",
        False,
        3,
    ),
    Metric("token_seq_rps", "3. Token endpoint (anonymous upstream)", "sequential req/s", "req/s", True, 0),
    Metric("token_seq_p50_ms", "3. Token endpoint (anonymous upstream)", "sequential p50", "ms", False, 2),
    Metric("token_seq_p99_ms", "3. Token endpoint (anonymous upstream)", "sequential p99", "ms", False, 2),
    Metric("token_conc_rps", "3. Token endpoint (anonymous upstream)", "16 concurrent req/s", "req/s", True, 0),
    Metric("token_conc_p50_ms", "3. Token endpoint (anonymous upstream)", "16 concurrent p50", "ms", False, 1),
    Metric("token_conc_p99_ms", "3. Token endpoint (anonymous upstream)", "16 concurrent p99", "ms", False, 1),
    Metric(
        "ping_token_p50_ms",
        "3b. Cost of checking a token (GET /v2/, answered by the proxy)",
        "with token p50",
        "ms",
        False,
        2,
    ),
    Metric(
        "ping_none_p50_ms",
        "3b. Cost of checking a token (GET /v2/, answered by the proxy)",
        "no token p50",
        "ms",
        False,
        2,
    ),
    Metric(
        "ping_check_ms", "3b. Cost of checking a token (GET /v2/, answered by the proxy)", "difference", "ms", False, 2
    ),
    Metric("pull_token_s", "4. skopeo copy, 5 layers, token-auth upstream", "pull time", "s", False, 2),
    Metric(
        "pull_token_blob_mb", "4. skopeo copy, 5 layers, token-auth upstream", "blob bytes via proxy", "MB", False, 2
    ),
    Metric(
        "pull_redirect_s", "4b. skopeo copy, 5 layers, upstream redirecting blobs (307)", "pull time", "s", False, 2
    ),
    Metric(
        "pull_redirect_blob_mb",
        "4b. skopeo copy, 5 layers, upstream redirecting blobs (307)",
        "blob bytes via proxy",
        "MB",
        False,
        4,
    ),
]
BY_KEY = {m.key: m for m in METRICS}


class Results:
    """samples[metric][config] = one value per round (or per repetition)."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.raw: list[dict[str, Any]] = []

    def add(self, key: str, config: str, value: float | None) -> None:
        if value is None:
            return
        if key not in BY_KEY:
            raise KeyError(key)
        self.samples.setdefault(key, {}).setdefault(config, []).append(float(value))

    def note(self, **fields: Any) -> None:
        self.raw.append(fields)

    def median(self, key: str, config: str) -> float | None:
        vals = self.samples.get(key, {}).get(config)
        return statistics.median(vals) if vals else None

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for key, per in self.samples.items():
            m = BY_KEY[key]
            out[key] = {}
            direct = self.median(key, "direct")
            stock = self.median(key, "mitmdump")
            for config, vals in per.items():
                med = statistics.median(vals)
                out[key][config] = {
                    "unit": m.unit,
                    "median": med,
                    "min": min(vals),
                    "max": max(vals),
                    "samples": vals,
                    "vs_direct": _ratio(med, direct),
                    "vs_mitmdump": _ratio(med, stock),
                }
        return out


def _ratio(value: float, ref: float | None) -> float | None:
    if ref is None or ref == 0:
        return None
    return value / ref


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_tables(results: Results, configs: Sequence[str]) -> str:
    """One table per section: rows = configurations, columns = median [min-max] and the two ratios."""
    lines: list[str] = []
    sections: dict[str, list[Metric]] = {}
    for m in METRICS:
        if m.key in results.samples:
            sections.setdefault(m.section, []).append(m)
    for section, metrics in sections.items():
        lines.append("")
        lines.append(section)
        for m in metrics:
            per = results.samples[m.key]
            lines.append(f"  {m.label} [{m.unit}] ({'higher' if m.higher_is_better else 'lower'} is better)")
            lines.append(
                f"    {'configuration':<13} {'median':>10} {'min':>10} {'max':>10} {'x direct':>9} {'x mitmdump':>10}"
            )
            direct = results.median(m.key, "direct")
            stock = results.median(m.key, "mitmdump")
            for config in configs:
                vals = per.get(config)
                if not vals:
                    continue
                med = statistics.median(vals)
                rd, rs = _ratio(med, direct), _ratio(med, stock)
                lines.append(
                    f"    {config:<13} {_fmt(med, m.digits):>10} {_fmt(min(vals), m.digits):>10} "
                    f"{_fmt(max(vals), m.digits):>10} {_fmt(rd, 2) + 'x' if rd is not None else '-':>9} "
                    f"{_fmt(rs, 2) + 'x' if rs is not None else '-':>10}"
                )
    return "\n".join(lines)


# --- the machine -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _version(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (r.stdout + r.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _git_commit(repo: Path) -> str:
    try:
        r = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        commit = r.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        return commit + (" (with local changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info(repo: Path) -> dict[str, Any]:
    try:
        mitm = metadata.version("mitmproxy")
    except metadata.PackageNotFoundError:
        mitm = "unknown"
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_mem_total_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mitmproxy": mitm,
        "nginx": _version(["nginx", "-v"]),
        "haproxy": _version(["haproxy", "-v"]),
        "curl": _version(["curl", "--version"]),
        "registry": _version(["docker-registry", "--version"]),
        "skopeo": _version(["skopeo", "--version"]),
        "commit": _git_commit(repo),
        "loadavg_start": os.getloadavg(),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB RAM, Linux {info['kernel']}, "
        f"Python {info['python']}, mitmproxy {info['mitmproxy']}, commit {info['commit']}, "
        f"load average at start {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}"
    )


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


# --- the chart ---------------------------------------------------------------------------------

CHART_PANELS = [
    ("blob_mb_s", "Blob GET: MB/s (higher is better)"),
    ("blob_proxy_cpu_s_per_gib", "Proxy CPU per GiB streamed: s (lower is better)"),
    ("head_seq_p50_ms", "Manifest HEAD, sequential: p50 ms (lower is better)"),
    ("head_conc_rps", "Manifest HEAD, 16 connections: req/s (higher is better)"),
    ("token_seq_p50_ms", "Token endpoint, sequential: p50 ms (lower is better)"),
    ("pull_token_s", "skopeo pull, 5 layers, token upstream: s (lower is better)"),
]


def write_chart(path: Path, results: Results, configs: Sequence[str], title: str) -> bool:
    """A PNG of the main metrics (median bars, min-max whiskers). False if matplotlib is missing."""
    try:
        # Installed only by ./run.sh bench (tests/bench/requirements.txt), not for the tests' type check.
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -r tests/bench/requirements.txt)", file=sys.stderr)
        return False
    panels = [(k, t) for k, t in CHART_PANELS if k in results.samples]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.4 * rows), squeeze=False)
    colors = {
        "direct": "#4c72b0",
        "nginx": "#55a868",
        "nginx-256k": "#8fd19e",
        "mitmdump": "#c44e52",
        "rp-s": "#dd8452",
        "rp-run": "#937860",
        "rp-workers2": "#8172b3",
    }
    for ax, (key, panel_title) in zip(axes.flat, panels, strict=False):
        per = results.samples[key]
        names = [c for c in configs if c in per]
        meds = [statistics.median(per[c]) for c in names]
        lo = [m - min(per[c]) for m, c in zip(meds, names, strict=True)]
        hi = [max(per[c]) - m for m, c in zip(meds, names, strict=True)]
        bars = ax.bar(names, meds, yerr=[lo, hi], capsize=3, color=[colors.get(c, "#999999") for c in names])
        digits = BY_KEY[key].digits
        ax.bar_label(bars, labels=[f"{m:.{digits}f}" for m in meds], fontsize=8, padding=2)
        ax.set_title(panel_title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
