"""Scaling calculator: how training time grows with parameters, data, devices and link bandwidth.

    python -m gpt_jax.scaling                                  # the report for the presets
    python -m gpt_jax.scaling --preset=gpt3_175b --devices=1024 --link=infiniband
    python -m gpt_jax.scaling --config=configs/shakespeare_char.toml --mfu=0.3 --peak_tflops=312
    python -m gpt_jax.scaling --from_run=out-shakespeare-char [--allreduce_json=results.json]
    options: --params=N --tokens=N --compute_optimal --link=NAME --bandwidth_gbps=X --latency_us=X
             --grad_bytes=2|4 --json=FILE --plot=FILE

Model: compute C = tokens x FLOPs/token, FLOPs/token = 6N + 12 L T D (N without position embeddings).
Time per optimizer step on p data-parallel devices = compute / (p x peak x MFU) plus a ring all-reduce of
the gradients, t = alpha + 2(p-1)/p x bytes / bandwidth, bytes = N x grad_bytes; with overlap the step takes
the larger of the two, without it their sum.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

from gpt_jax import config
from gpt_jax.cli import run_main
from gpt_jax.config import ModelConfig
from gpt_jax.errors import ConfigError
from gpt_jax.fileio import write_atomic

# Link presets: (bytes/s per direction, latency in s). Bandwidths from the vendors' specs; latencies are
# assumed round figures for a collective's start-up cost, to be replaced by measurements (--allreduce_json).
LINKS = {
    "nvlink": (300e9, 10e-6),  # A100 NVLink 3: 600 GB/s bidirectional per GPU
    "infiniband": (50e9, 20e-6),  # NDR 400 Gb/s per port
    "100gbe": (12.5e9, 30e-6),
    "10gbe": (1.25e9, 50e-6),
    "1gbe": (0.125e9, 100e-6),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is trained: model size, FLOPs per token, tokens in all and per optimizer step."""

    name: str
    n_params: float  # N, non-embedding (position embeddings excluded)
    flops_per_token: float  # 6N + 12 L T D
    tokens: float
    tokens_per_step: float
    source: str = ""

    @property
    def flops_per_token_6n(self) -> float:
        return 6 * self.n_params

    @property
    def compute(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def steps(self) -> float:
        return self.tokens / self.tokens_per_step


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Where it is trained: device count and speed, link bandwidth and latency."""

    devices: int = 8
    peak_flops: float = 312e12  # A100 bf16 datasheet
    mfu: float = 0.4
    bandwidth: float = LINKS["nvlink"][0]  # bytes/s
    latency: float = LINKS["nvlink"][1]  # s
    grad_bytes: int = 4  # per parameter: 4 float32, 2 bf16


def model_workload(name: str, cfg: ModelConfig, tokens: float, tokens_per_step: float, source: str = "") -> Workload:
    from gpt_jax.model import count_params, flops_per_token, init_params
    import jax

    n = count_params(jax.eval_shape(lambda k: init_params(k, cfg), jax.random.key(0)))
    return Workload(name, n, flops_per_token(cfg), tokens, tokens_per_step, source)


def presets() -> dict[str, Workload]:
    """The project's recipe, nanoGPT's GPT-2 124M run and GPT-3 175B, with their sources."""
    shakespeare = config.load(config.REPO_ROOT / "configs" / "shakespeare_char.toml")
    t, tokens_per_step = shakespeare.train, shakespeare.tokens_per_step
    gpt2 = ModelConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
    gpt3 = ModelConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288, bias=True)
    return {
        "shakespeare_char": model_workload(
            "shakespeare_char", dataclasses.replace(shakespeare.model, vocab_size=65), t.max_iters * tokens_per_step,
            tokens_per_step, "configs/shakespeare_char.toml (nanoGPT's recipe: 5000 steps x 64 x 256 tokens)"),
        "gpt2_124m": model_workload(
            "gpt2_124m", gpt2, 600_000 * 491_520, 491_520,
            "nanoGPT train_gpt2 config: 600k steps x 491,520 tokens; about 4 days on 8 A100 40GB (nanoGPT README)"),
        "gpt3_175b": model_workload(
            "gpt3_175b", gpt3, 300e9, 3.2e6,
            "Brown et al. 2020: 300B tokens, 3.2M-token batches; published compute 3.14e23 FLOPs"),
    }


def allreduce_seconds(n_bytes: float, devices: int, bandwidth: float, latency: float) -> float:
    """Ring all-reduce time: alpha + 2(p-1)/p x bytes / bandwidth (0 on one device)."""
    if devices <= 1:
        return 0.0
    return latency + 2 * (devices - 1) / devices * n_bytes / bandwidth


def estimate(w: Workload, hw: Hardware) -> dict:
    """Per-step and total times, and which side bounds the step."""
    compute_step = w.tokens_per_step * w.flops_per_token / (hw.devices * hw.peak_flops * hw.mfu)
    comm_step = allreduce_seconds(w.n_params * hw.grad_bytes, hw.devices, hw.bandwidth, hw.latency)
    return {
        "workload": w.name, "devices": hw.devices, "compute_flops": w.compute, "compute_flops_6n": w.tokens * w.flops_per_token_6n,
        "steps": w.steps, "compute_s_per_step": compute_step, "allreduce_s_per_step": comm_step,
        "total_s_no_overlap": w.steps * (compute_step + comm_step),
        "total_s_overlap": w.steps * max(compute_step, comm_step),
        "bound": "communication" if comm_step > compute_step else "compute",
    }


def max_devices_before_comm_dominates(w: Workload, hw: Hardware, limit: int = 2**20) -> int:
    """The largest power-of-two device count at which the all-reduce still takes no longer than the compute."""
    best, p = 1, 1
    while p <= limit:
        e = estimate(w, dataclasses.replace(hw, devices=p))
        if e["allreduce_s_per_step"] > e["compute_s_per_step"]:
            break
        best, p = p, p * 2
    return best


def from_run(out_dir: str | Path, allreduce_json: str | None = None) -> tuple[Workload, dict]:
    """A workload and measured hardware figures (tokens/s, MFU; all-reduce alpha and bandwidth) from a run."""
    from gpt_jax import checkpoint
    from gpt_jax.metrics import MetricsLog

    _, meta = checkpoint.read_meta(out_dir)
    cfg = config.load(**meta["config"])
    records = [r for r in MetricsLog(Path(out_dir) / "metrics.jsonl").read() if r.get("kind") == "train"]
    if not records:
        raise ConfigError(f"{out_dir}/metrics.jsonl has no training records; train first")
    last = records[-1]
    w = model_workload(f"run:{out_dir}", cfg.model, last["tokens_seen"], cfg.tokens_per_step, f"metrics of {out_dir}")
    measured = {"tokens_per_s": last["tokens_per_s"], "mfu": last["mfu"], "tokens_seen": last["tokens_seen"]}
    if allreduce_json:
        data = json.loads(Path(allreduce_json).read_text())
        fit = data.get("allreduce_fit", data)
        measured["latency"] = max(0.0, fit["alpha_s"])  # a fit can put a tiny start-up cost below zero
        measured["bandwidth"] = fit["bandwidth_bytes_per_s"]
    return w, measured


def report(workloads: dict[str, Workload], hw: Hardware, baseline: str = "shakespeare_char") -> str:
    """Plain-words answers with numbers."""
    base = workloads[baseline]
    lines = ["Compute per token is linear in N: 6N + 12 L T D FLOPs (the attention term adds a few percent)."]
    for w in workloads.values():
        e = estimate(w, hw)
        lines.append(
            f"  {w.name}: N = {w.n_params:.4g}, {w.flops_per_token:.4g} FLOPs/token (6N alone: {w.flops_per_token_6n:.4g}), "
            f"{w.tokens:.4g} tokens -> C = {w.compute:.4g} FLOPs (6N only: {e['compute_flops_6n']:.4g}) [{w.source}]")
    for name, w in workloads.items():
        if name == baseline:
            continue
        lines.append(
            f"{w.name} vs {base.name}: {_x(w.n_params / base.n_params)} the parameters, {_x(w.tokens / base.tokens)} "
            f"the tokens, {w.compute / base.compute:.3g}x the compute. Time grows with N x tokens, not with N alone; "
            f"at compute-optimal data (20 tokens/parameter) compute grows as N^2.")
    lines.append(f"Time on {hw.devices} devices at {hw.peak_flops / 1e12:.3g} TFLOP/s peak and {100 * hw.mfu:.0f}% MFU, "
                 f"gradients in {hw.grad_bytes}-byte words, per link:")
    for w in workloads.values():
        for link, (bw, lat) in LINKS.items():
            h = dataclasses.replace(hw, bandwidth=bw, latency=lat)
            e = estimate(w, h)
            lines.append(
                f"  {w.name:<17} {link:<10} step: compute {_t(e['compute_s_per_step'])}, all-reduce "
                f"{_t(e['allreduce_s_per_step'])} ({e['bound']}-bound); total {_t(e['total_s_overlap'])} with overlap, "
                f"{_t(e['total_s_no_overlap'])} without; all-reduce stays below compute up to "
                f"{max_devices_before_comm_dominates(w, h)} devices")
    return "\n".join(lines)


def _x(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.3g}x"


def _t(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60), ("s", 1), ("ms", 1e-3)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds * 1e6:.3g} us"


def plot(workload: Workload, hw: Hardware, path: str | Path) -> None:
    """Training time (with overlap) against device count, one line per link type, as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [2**i for i in range(0, 15)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for link, (bw, lat) in LINKS.items():
        times = [estimate(workload, dataclasses.replace(hw, devices=p, bandwidth=bw, latency=lat))["total_s_no_overlap"] / 3600
                 for p in counts]
        ax.loglog(counts, times, "o-", ms=3, label=link)
    ideal = [estimate(workload, dataclasses.replace(hw, devices=p, latency=0, bandwidth=math.inf))["total_s_overlap"] / 3600
             for p in counts]
    ax.loglog(counts, ideal, "k--", lw=1, label="no communication")
    ax.set_xlabel("data-parallel devices")
    ax.set_ylabel("training time, hours (no overlap)")
    ax.set_title(f"{workload.name}: {workload.compute:.3g} FLOPs at {100 * hw.mfu:.0f}% MFU")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main(argv: list[str]) -> int:
    opts = config.parse_overrides(argv)
    known = {"preset", "config", "params", "tokens", "compute_optimal", "devices", "peak_tflops", "mfu", "link",
             "bandwidth_gbps", "latency_us", "grad_bytes", "from_run", "allreduce_json", "json", "plot"}
    unknown = set(opts) - known
    if unknown:
        raise ConfigError(f"unknown option --{sorted(unknown)[0]}; options: {', '.join('--' + k for k in sorted(known))}")
    try:
        link_bw, link_lat = LINKS[opts.get("link", "nvlink")]
        hw = Hardware(devices=int(opts.get("devices", 8)), peak_flops=float(opts.get("peak_tflops", 312)) * 1e12,
                      mfu=float(opts.get("mfu", 0.4)),
                      bandwidth=float(opts["bandwidth_gbps"]) * 1e9 / 8 if "bandwidth_gbps" in opts else link_bw,
                      latency=float(opts["latency_us"]) * 1e-6 if "latency_us" in opts else link_lat,
                      grad_bytes=int(opts.get("grad_bytes", 4)))
    except KeyError:
        raise ConfigError(f"unknown --link={opts['link']}; choose one of {', '.join(LINKS)}") from None
    except ValueError as e:
        raise ConfigError(f"a numeric option has a bad value ({e})") from None
    workloads = presets()
    if "from_run" in opts:
        run, measured = from_run(opts["from_run"], opts.get("allreduce_json"))
        hw = dataclasses.replace(hw, mfu=measured["mfu"] if measured["mfu"] > 0 else hw.mfu,
                                 latency=measured.get("latency", hw.latency), bandwidth=measured.get("bandwidth", hw.bandwidth))
        print(f"from {opts['from_run']}: {measured['tokens_seen']:,} tokens seen at {measured['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {100 * measured['mfu']:.1f}% (used for the estimates below)")
        workloads = {"run": run, **workloads}
        baseline = "run"
    else:
        baseline = "shakespeare_char"
    if "config" in opts or "params" in opts:
        cfg = config.load(opts["config"]) if "config" in opts else config.load()
        w = model_workload("custom", dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 65),
                           cfg.train.max_iters * cfg.tokens_per_step, cfg.tokens_per_step, opts.get("config", "defaults"))
        if "params" in opts:
            n = float(opts["params"])
            w = dataclasses.replace(w, n_params=n, flops_per_token=w.flops_per_token - w.flops_per_token_6n + 6 * n)
        workloads["custom"] = w
    if "tokens" in opts or "compute_optimal" in opts:
        workloads = {k: dataclasses.replace(w, tokens=20 * w.n_params if "compute_optimal" in opts else float(opts["tokens"]))
                     for k, w in workloads.items()}
    preset = opts.get("preset")
    if preset is not None and preset not in workloads:
        raise ConfigError(f"unknown --preset={preset}; choose one of {', '.join(workloads)}")
    chosen = {preset: workloads[preset]} if preset else workloads
    print(report({**chosen, baseline: workloads[baseline]}, hw, baseline))
    if "json" in opts:
        rows = [estimate(w, dataclasses.replace(hw, bandwidth=bw, latency=lat)) | {"link": link}
                for w in chosen.values() for link, (bw, lat) in LINKS.items()]
        write_atomic(opts["json"], json.dumps({"hardware": dataclasses.asdict(hw), "estimates": rows}, indent=1).encode())
    if "plot" in opts:
        focus = preset or next((k for k in ("custom", "run") if k in workloads), "gpt2_124m")
        plot(workloads[focus], hw, opts["plot"])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
