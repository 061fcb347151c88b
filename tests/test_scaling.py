import dataclasses
import json

import pytest

from gpt_jax import config
from gpt_jax.scaling import Hardware, Workload, allreduce_seconds, estimate, from_run, max_devices_before_comm_dominates, presets

from conftest import run_script, tiny_overrides


def test_gpt3_compute_matches_the_published_figure():
    gpt3 = presets()["gpt3_175b"]
    assert abs(gpt3.compute / 3.14e23 - 1) < 0.05
    assert abs(gpt3.tokens * gpt3.flops_per_token_6n / 3.14e23 - 1) < 0.01  # the published figure counts 6N


def test_shakespeare_flops_per_token_by_hand():
    w = presets()["shakespeare_char"]
    assert w.n_params == 10_646_784
    assert w.flops_per_token == 6 * 10_646_784 + 12 * 6 * 256 * 384
    assert w.tokens == 5000 * 64 * 256


def test_allreduce_term_by_hand():
    assert allreduce_seconds(1e9, 1, 1e10, 1e-5) == 0.0
    assert allreduce_seconds(1e9, 2, 1e10, 1e-5) == pytest.approx(1e-5 + 1.0 * 0.1)
    assert allreduce_seconds(1e9, 4, 1e10, 1e-5) == pytest.approx(1e-5 + 1.5 * 0.1)
    w = Workload("w", n_params=1e6, flops_per_token=6e6, tokens=1e9, tokens_per_step=1e5)
    e = estimate(w, Hardware(devices=8, bandwidth=1e9, latency=0.0, grad_bytes=2))
    assert e["allreduce_s_per_step"] == pytest.approx(2 * 7 / 8 * 2e6 / 1e9)


def test_time_is_monotone_in_each_input():
    w = Workload("w", n_params=1e8, flops_per_token=6e8, tokens=1e10, tokens_per_step=5e5)
    hw = Hardware(devices=16)

    def total(w=w, **kw):
        return estimate(w, dataclasses.replace(hw, **kw))["total_s_no_overlap"]

    assert total(dataclasses.replace(w, tokens=2e10)) > total()
    assert total(dataclasses.replace(w, n_params=2e8, flops_per_token=1.2e9)) > total()
    assert total(bandwidth=hw.bandwidth * 10) < total() < total(bandwidth=hw.bandwidth / 10)
    assert total(latency=1e-3) > total()
    assert total(mfu=0.5) < total() and total(peak_flops=1e15) < total()
    steps = [estimate(w, dataclasses.replace(hw, devices=p)) for p in (1, 2, 4, 8, 16)]
    assert all(a["compute_s_per_step"] > b["compute_s_per_step"] for a, b in zip(steps, steps[1:]))
    assert all(a["allreduce_s_per_step"] <= b["allreduce_s_per_step"] for a, b in zip(steps, steps[1:]))
    assert max_devices_before_comm_dominates(w, dataclasses.replace(hw, bandwidth=1e8)) < \
        max_devices_before_comm_dominates(w, hw)


def test_from_run_reads_a_tiny_training(corpus, tmp_path):
    out = tmp_path / "out"
    assert run_script("train.py", *tiny_overrides(corpus, out)).returncode == 0
    bench = tmp_path / "results.json"
    bench.write_text(json.dumps({"allreduce_fit": {"alpha_s": 1e-4, "bandwidth_bytes_per_s": 2e9}}))
    w, measured = from_run(out, str(bench))
    assert w.tokens == 10 * 8 * 16 and w.tokens_per_step == 8 * 16
    assert measured["tokens_per_s"] > 0 and measured["latency"] == 1e-4 and measured["bandwidth"] == 2e9
    result = run_script("-m", "gpt_jax.scaling", f"--from_run={out}", f"--allreduce_json={bench}",
                        f"--json={tmp_path / 'est.json'}", f"--plot={tmp_path / 'plot.png'}")
    assert result.returncode == 0, result.stderr
    assert "tokens seen" in result.stdout and "gpt3_175b vs run" in result.stdout
    estimates = json.loads((tmp_path / "est.json").read_text())["estimates"]
    assert {e["link"] for e in estimates} == {"nvlink", "infiniband", "100gbe", "10gbe", "1gbe"}
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_scaling_bad_option():
    result = run_script("-m", "gpt_jax.scaling", "--link=carrier-pigeon")
    assert result.returncode == 2 and result.stderr.startswith("error: unknown --link=carrier-pigeon")
