"""The main job: `bscale demo` trains the character transformer with live B_noise and writes its log and plot."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from bscale.demo import run_demo


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.parametrize("per_coordinate", [False, True], ids=["default", "per_coordinate"])
def test_demo_logs_live_noise_scale_and_plots_it(tmp_path, per_coordinate):
    stats = run_demo(steps=30, out=tmp_path, progress=False, per_coordinate=per_coordinate)
    records = _records(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    # Two microbatches per step from the first: an estimate from the first steps on, and the batch it grows to.
    assert math.isfinite(stats["noise_scale"]) and stats["noise_scale_stderr"] >= 0
    assert all(r["batch_size"] % 256 == 0 for r in records)  # whole microbatches of 4 × 64 tokens
    assert math.isfinite(stats["val_loss"]) and stats["loss"] < records[0]["loss"]
    coord = [k for k in records[-1] if k.startswith("coord/")]
    assert bool(coord) == per_coordinate
    if per_coordinate:
        assert 0.0 <= records[-1]["coord/frac_small_batch"] <= 1.0
        assert records[-1]["adam_preconditioned/noise_scale"] is not None
    _png(tmp_path / "noise_scale.png")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be a positive whole number of steps, got '0'"),
        (["--accum", "0"], "--accum must be a positive whole number of microbatches"),
        (["--microbatch", "-2"], "--microbatch must be a positive whole number of sequences"),
        (["--lr", "-1"], "--lr must be a finite positive learning rate"),
        (["--max-accum", "1"], r"--max-accum \(1\) must be at least --accum \(2\), or pass --no-grow"),
    ],
)
def test_demo_refuses_bad_options_before_training(tmp_path, capsys, args, message):
    from bscale.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["demo", *args, "--quiet", "--out", str(out)]))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing trained, nothing written


def test_demo_command_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bscale", "demo", "--steps", "3", "--quiet", "--no-grow", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(_records(out / "log.jsonl")) == 3
    _png(out / "noise_scale.png")
