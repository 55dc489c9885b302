"""`opt plan`'s time model: its shipped constants are the fit the benchmark reports, and a
prediction never sees the throughput it predicts."""

from __future__ import annotations

import dataclasses

import pytest

from opt.plan.fit import fit, predict
from opt.plan.published import MEGATRON_2021, RUNS
from opt.plan.timing import A100_FIT


def test_the_shipped_constants_are_the_fit_on_megatrons_table():
    """A constant tuned by hand, or left stale when the model changes, fails here."""
    refit = fit([r for r in RUNS if r.source == MEGATRON_2021], "")
    assert (refit.peak_fraction, refit.half_width) == pytest.approx(
        (A100_FIT.peak_fraction, A100_FIT.half_width), abs=2e-3
    )


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.name)
def test_a_prediction_does_not_read_the_reported_throughput(run):
    told = predict(run, A100_FIT)
    lied_to = predict(dataclasses.replace(run, reported_tflops=run.reported_tflops * 3), A100_FIT)
    assert told == lied_to


def test_a_narrower_matmul_per_gpu_runs_slower():
    """The efficiency grows with d_model / tp and saturates: the fitted shape is physical."""
    widths = [A100_FIT.at(d, 8) for d in (2048, 6144, 12288, 25600)]
    assert widths == sorted(widths) and widths[-1] < A100_FIT.peak_fraction
