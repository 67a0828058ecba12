"""Tests for the ``bscale lr`` command: printed numbers, alignment, bad arguments, ``python -m bscale``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bscale.cli import main
from bscale.laws import lr_max_from_reference, lr_scale, optimal_lr

ROOT = Path(__file__).resolve().parents[1]
BASE = ["lr", "--ref-lr", "1e-3", "--ref-batch", "64", "--batch", "256"]


def run(capsys, argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table by rule name, split on whitespace (the note keeps its words)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rule"))
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def line_with(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))


def number_after(text: str, marker: str) -> float:
    return float(text.split(marker, 1)[1].split()[0].rstrip(";,"))


def test_adam_table_numbers(capsys):
    out = run(capsys, [*BASE, "--noise-scale", "1000", "--optimizer", "adam"])
    rows = table(out)
    assert rows["rule"][:5] == ["factor", "lr", "beta1", "beta2", "eps"]
    assert [float(x) for x in rows["linear"][:5]] == [4.0, 0.004, 0.9, 0.999, 1e-8]
    assert [float(x) for x in rows["sqrt"][:5]] == pytest.approx([2.0, 0.002, 0.6, 0.996, 5e-9], rel=1e-12)
    factor = lr_scale(256, 64, 1000, optimizer="adam")  # 2·1064/1256
    noise_row = rows["noise-aware"]
    assert float(noise_row[0]) == pytest.approx(factor, rel=1e-5)
    assert float(noise_row[1]) == pytest.approx(1e-3 * factor, rel=1e-5)
    assert [float(x) for x in noise_row[2:5]] == [0.9, 0.999, 1e-8]  # only the LR changes
    law = line_with(out, "law (Surge eq. 2)")
    lr_max = lr_max_from_reference(1e-3, 64, 1000, "adam")
    assert number_after(law, "at batch 256 = ") == pytest.approx(optimal_lr(256, 1000, lr_max, "adam"), rel=1e-5)
    assert number_after(law, "lr_max = ") == pytest.approx(lr_max, rel=1e-5)
    assert number_after(line_with(out, "peak batch"), "peak batch = ") == 1000.0
    assert "past the peak" not in out
    assert "estimates the critical batch" in out


def test_table_is_aligned(capsys):
    out = run(capsys, [*BASE, "--noise-scale", "1000"])
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rule"))
    block = lines[start : start + 4]
    header = block[0]
    for name in ("factor", "lr", "beta1", "beta2", "eps", "note"):
        col = header.index(f" {name}") + 1
        for row in block[1:]:
            # Every cell starts in its header's column, after at least one space.
            assert row[col - 1] == " " and row[col] != " ", (name, row)


def test_adam_default_optimizer_and_custom_betas(capsys):
    out = run(capsys, [*BASE, "--beta1", "0.8", "--beta2", "0.99", "--eps", "1e-6"])
    rows = table(out)
    assert [float(x) for x in rows["sqrt"][:5]] == pytest.approx([2.0, 0.002, 0.2, 0.96, 5e-7], rel=1e-12)
    assert [float(x) for x in rows["linear"][2:5]] == [0.8, 0.99, 1e-6]


def test_adam_past_the_peak_and_sqrt_not_applicable(capsys):
    out = run(capsys, ["lr", "--ref-lr", "1e-3", "--ref-batch", "64", "--batch", "2048", "--noise-scale", "1000"])
    rows = table(out)
    assert rows["sqrt"][:5] == ["-"] * 5
    sqrt_line = line_with(out, "sqrt")
    assert "kappa*(1-beta1) = 32*(1-0.9) = 3.2 >= 1" in sqrt_line
    assert "re-base the reference run at a larger batch" in sqrt_line
    assert float(rows["linear"][1]) == pytest.approx(0.032)
    assert float(rows["noise-aware"][0]) == pytest.approx(lr_scale(2048, 64, 1000), rel=1e-5)
    assert "batch 2048 is past the peak" in out


def test_sqrt_not_applicable_through_beta2(capsys):
    argv = ["lr", "--ref-lr", "1e-3", "--ref-batch", "64", "--batch", "128000", "--beta1", "0.9999"]
    out = run(capsys, argv)  # κ = 2000: κ(1 - β1) = 0.2 fits, κ(1 - β2) = 2 does not
    assert "kappa*(1-beta2)" in line_with(out, "sqrt")


def test_sgd_table(capsys):
    argv = ["lr", "--ref-lr", "0.1", "--ref-batch", "64", "--batch", "256", "--noise-scale", "1000"]
    out = run(capsys, [*argv, "--optimizer", "sgd"])
    rows = table(out)
    assert rows["rule"][:2] == ["factor", "lr"] and "beta1" not in rows["rule"]
    assert [float(x) for x in rows["linear"][:2]] == [4.0, 0.4]
    assert [float(x) for x in rows["sqrt"][:2]] == [2.0, 0.2]
    factor = lr_scale(256, 64, 1000, optimizer="sgd")  # 4·1064/1256
    assert float(rows["noise-aware"][0]) == pytest.approx(factor, rel=1e-5)
    assert float(rows["noise-aware"][1]) == pytest.approx(0.1 * factor, rel=1e-5)
    law = line_with(out, "law (McCandlish eq. 2.7)")
    assert number_after(law, "lr_max = ") == pytest.approx(0.1 * (1 + 1000 / 64), rel=1e-5)
    assert number_after(line_with(out, "balance batch"), "balance batch = ") == 1000.0
    assert "peak batch" not in out


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_without_noise_scale(capsys, optimizer):
    out = run(capsys, [*BASE, "--optimizer", optimizer])
    rows = table(out)
    assert rows["noise-aware"][0] == "-" and rows["noise-aware"][1] == "-"
    assert "needs --noise-scale" in line_with(out, "noise-aware")
    assert "needs --noise-scale" in line_with(out, "law (")
    assert float(rows["linear"][1]) == 0.004


@pytest.mark.parametrize("batch", ["1e3", "1000.0", "1000"])
def test_whole_batches_in_any_spelling(capsys, batch):
    out = run(capsys, ["lr", "--ref-lr", "1e-3", "--ref-batch", "250", "--batch", batch])
    assert "-> batch 1000 (kappa = 4)" in out


BAD_ARGS = [
    (["lr", "--ref-lr", "1e-3", "--ref-batch", "64", "--batch", "2.5"],
     "--batch must be a positive whole number of examples, got '2.5'"),
    (["lr", "--ref-lr", "1e-3", "--ref-batch", "64", "--batch", "0"],
     "--batch must be a positive whole number of examples, got '0'"),
    (["lr", "--ref-lr", "1e-3", "--ref-batch", "-64", "--batch", "256"],
     "--ref-batch must be a positive whole number of examples, got '-64'"),
    (["lr", "--ref-lr", "1e-3", "--ref-batch", "sixty", "--batch", "256"],
     "--ref-batch must be a positive whole number of examples, got 'sixty'"),
    (["lr", "--ref-lr", "1e-3", "--ref-batch", "64", "--batch", "nan"],
     "--batch must be a positive whole number of examples, got 'nan'"),
    ([*BASE[:2], "0", *BASE[3:]], "--ref-lr must be a finite positive learning rate, got '0'"),
    ([*BASE[:2], "inf", *BASE[3:]], "--ref-lr must be a finite positive learning rate, got 'inf'"),
    ([*BASE, "--noise-scale", "-1"], "--noise-scale must be a finite positive number of examples"),
    ([*BASE, "--noise-scale", "inf"], "--noise-scale must be a finite positive number of examples"),
    ([*BASE, "--beta1", "1.0"], "--beta1 must be a number in [0, 1), got '1.0'"),
    ([*BASE, "--beta2", "nan"], "--beta2 must be a number in [0, 1), got 'nan'"),
    ([*BASE, "--eps=-1e-8"], "--eps must be a finite number >= 0, got '-1e-8'"),
    ([*BASE, "--optimizer", "adamw"], "invalid choice: 'adamw'"),
    (["lr", "--ref-lr", "1e-3", "--ref-batch", "64"], "the following arguments are required: --batch"),
    ([], "the following arguments are required: COMMAND"),
    (["fit"], "invalid choice: 'fit'"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD_ARGS)
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main(["lr", "--help"])
    assert info.value.code == 0
    assert "--noise-scale" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "bscale", *BASE, "--noise-scale", "1000", "--optimizer", "adam"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    factor = lr_scale(256, 64, 1000, optimizer="adam")
    assert float(table(proc.stdout)["noise-aware"][1]) == pytest.approx(1e-3 * factor, rel=1e-5)
    bad = subprocess.run(
        [sys.executable, "-m", "bscale", "lr", "--ref-lr", "1e-3", "--ref-batch", "64", "--batch", "2.5"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2
    assert "--batch must be a positive whole number of examples" in bad.stderr
