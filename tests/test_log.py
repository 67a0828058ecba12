"""Loggers (bscale/log.py) and run plots (bscale/plot.py)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import pickle
import re
import sys
import types
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bscale.log import (
    JSONLLogger,
    LightningCallback,
    Logger,
    PrintLogger,
    SupportsLog,
    TensorBoardLogger,
    WandbLogger,
    format_noise_scale,
    read_jsonl,
)
from bscale.plot import _build_figure, plot_run

NAN = math.nan
STATS = {
    "noise_scale": 1234.5,
    "noise_scale_stderr": 98.0,
    "grad_sq": NAN,
    "trace_sigma": math.inf,
    "batch_size": 256.0,
    "lr_scale": 1.5,
    "layer/fc1/noise_scale": 17.25,
}
FINITE_KEYS = {"noise_scale", "noise_scale_stderr", "batch_size", "lr_scale", "layer/fc1/noise_scale"}


def _strict_json(line: str) -> dict:
    """Parse as strict JSON: the non-standard NaN / Infinity tokens raise."""

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


# ------------------------------------------------------------------------------------------------------------
# Protocol and argument checks


def test_every_logger_satisfies_the_protocol(tmp_path):
    loggers = [JSONLLogger(tmp_path / "a.jsonl"), TensorBoardLogger(_FakeWriter()), WandbLogger(_FakeRun())]
    loggers.append(PrintLogger())
    for logger in loggers:
        assert isinstance(logger, SupportsLog) and isinstance(logger, Logger)
        logger.close()
    assert not isinstance(object(), SupportsLog)


def test_base_logger_requires_log_and_closes_on_exit():
    closed = []

    class Recorder(Logger):
        def log(self, stats, step):
            pass

        def close(self):
            closed.append(True)

    with pytest.raises(NotImplementedError, match="must implement log"):
        Logger().log({}, 0)
    with pytest.raises(KeyError), Recorder() as rec:
        assert isinstance(rec, Recorder)
        raise KeyError("boom")
    assert closed == [True]  # closed although the block raised


@pytest.mark.parametrize(
    ("stats", "step", "message"),
    [
        ({"a": 1.0}, 1.5, "step must be an integer"),
        ({"a": 1.0}, True, "step must be an integer"),
        ({"a": 1.0}, -1, "step must be >= 0"),
        ([("a", 1.0)], 1, "stats must be a mapping"),
        ({1: 1.0}, 1, "keys must be strings"),
        ({"a": "high"}, 1, r"stats\['a'\] must be a number"),
    ],
)
def test_bad_log_arguments_name_the_fix(tmp_path, stats, step, message):
    with JSONLLogger(tmp_path / "x.jsonl") as logger:
        with pytest.raises(ValueError, match=message):
            logger.log(stats, step)
    assert (tmp_path / "x.jsonl").read_text() == ""  # nothing half-written


def test_numpy_step_and_tensor_values_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    with JSONLLogger(tmp_path / "x.jsonl") as logger:
        logger.log({"noise_scale": torch.tensor(3.5)}, np.int64(7))
    assert read_jsonl(tmp_path / "x.jsonl") == [{"step": 7, "noise_scale": 3.5}]


# ------------------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_lines_are_strict_json_with_null_for_nonfinite(tmp_path):
    path = tmp_path / "sub" / "run.jsonl"  # parent folder created
    logger = JSONLLogger(path)
    logger.log(STATS, 10)
    logger.log({**STATS, "noise_scale": 2000.0}, 20)
    lines = path.read_text().splitlines()  # read before close: each line is flushed when written
    logger.close()
    assert len(lines) == 2
    first = _strict_json(lines[0])
    assert next(iter(first)) == "step" and first["step"] == 10
    assert first["grad_sq"] is None and first["trace_sigma"] is None
    assert first["noise_scale"] == 1234.5 and first["layer/fc1/noise_scale"] == 17.25
    assert _strict_json(lines[1])["noise_scale"] == 2000.0


def test_jsonl_step_argument_wins_over_a_step_key(tmp_path):
    with JSONLLogger(tmp_path / "x.jsonl") as logger:
        logger.log({"step": 99.0, "steps": 5.0}, 5)
    assert read_jsonl(tmp_path / "x.jsonl") == [{"step": 5, "steps": 5.0}]


def test_jsonl_appends_on_resume_and_truncates_when_asked(tmp_path):
    path = tmp_path / "run.jsonl"
    with JSONLLogger(path) as logger:
        logger.log({"a": 1.0}, 1)
    with JSONLLogger(path) as logger:
        logger.log({"a": 2.0}, 2)
    assert [r["a"] for r in read_jsonl(path)] == [1.0, 2.0]
    with JSONLLogger(path, append=False) as logger:
        logger.log({"a": 3.0}, 3)
    assert [r["a"] for r in read_jsonl(path)] == [3.0]


def test_jsonl_writes_to_a_pipe():
    # Not a regular file (a pipe, /dev/stdout): appending needs no repair of a cut last line, and must not seek.
    read_end, write_end = os.pipe()
    try:
        with JSONLLogger(f"/proc/self/fd/{write_end}") as logger:
            logger.log({"noise_scale": 2.0}, 1)
        assert json.loads(os.read(read_end, 4096)) == {"step": 1, "noise_scale": 2.0}
    finally:
        os.close(read_end)
        os.close(write_end)


def test_jsonl_fsync_writes_the_same_lines(tmp_path):
    with JSONLLogger(tmp_path / "a.jsonl", fsync=True) as logger:
        logger.log(STATS, 1)
    with JSONLLogger(tmp_path / "b.jsonl") as logger:
        logger.log(STATS, 1)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_jsonl_misuse(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        JSONLLogger(tmp_path)
    with pytest.raises(ValueError, match="file path"):
        JSONLLogger(3)
    logger = JSONLLogger(tmp_path / "x.jsonl")
    logger.close()
    logger.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log({"a": 1.0}, 1)


def test_read_jsonl_round_trip_and_truncated_tail(tmp_path):
    path = tmp_path / "run.jsonl"
    with JSONLLogger(path) as logger:
        logger.log(STATS, 3)
    records = read_jsonl(path)
    assert len(records) == 1
    assert math.isnan(records[0]["grad_sq"]) and math.isnan(records[0]["trace_sigma"])
    assert {k: v for k, v in records[0].items() if k in FINITE_KEYS} == {k: STATS[k] for k in FINITE_KEYS}

    with path.open("a") as f:
        f.write('{"step": 4, "noise_sc')  # a crash in the middle of a write
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        assert len(read_jsonl(path)) == 1
    # The run resumes and appends to the same log: the cut line is removed first, so the log stays readable
    # (the new line used to be glued onto it, a malformed line in the middle that read_jsonl refuses).
    with pytest.warns(RuntimeWarning, match="removed a last line cut short"), JSONLLogger(path) as logger:
        logger.log({"noise_scale": 4.0}, 4)
    assert [r["step"] for r in read_jsonl(path)] == [3, 4]
    path.write_text('{"step": 1, "no')  # a crash in the log's first line
    with pytest.warns(RuntimeWarning, match="removed a last line"), JSONLLogger(path) as logger:
        logger.log({"noise_scale": 1.0}, 1)
    assert read_jsonl(path) == [{"step": 1, "noise_scale": 1.0}]
    # A crash between a whole record and its newline: the record is kept, only the newline is added.
    path.write_text('{"step": 1, "noise_scale": 1.0}\n{"step": 2, "noise_scale": 2.0}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with JSONLLogger(path) as logger:
            logger.log({"noise_scale": 3.0}, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    # A cut last line longer than any record (2 MiB) is removed without being held whole.
    with path.open("a") as f:
        f.write('{"step": 4, "note": "' + "x" * (2 << 20))
    with pytest.warns(RuntimeWarning, match="removed a last line cut short"), JSONLLogger(path) as logger:
        logger.log({"noise_scale": 5.0}, 5)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 5]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_jsonl(bad)


# ------------------------------------------------------------------------------------------------------------
# TensorBoard


class _FakeWriter:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []
        self.flushes = 0
        self.closed = False

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_tensorboard_writes_readable_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardLogger(tmp_path / "tb") as logger:
        logger.log(STATS, 10)
        logger.log({**STATS, "noise_scale": 2500.0, "grad_sq": 0.5}, 20)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"bscale/" + k for k in FINITE_KEYS | {"grad_sq"}}
    # Event files store float32: compare at that precision.
    assert [(e.step, e.value) for e in acc.Scalars("bscale/noise_scale")] == [(10, 1234.5), (20, 2500.0)]
    assert [(e.step, e.value) for e in acc.Scalars("bscale/grad_sq")] == [(20, 0.5)]  # NaN at step 10 skipped
    assert acc.Scalars("bscale/layer/fc1/noise_scale")[0].value == pytest.approx(17.25, rel=1e-7)


def test_tensorboard_shared_writer_is_flushed_not_closed():
    writer = _FakeWriter()
    logger = TensorBoardLogger(writer, prefix="gns/")
    assert logger.writer is writer
    logger.log(STATS, 4)
    assert sorted(writer.scalars) == sorted(("gns/" + k, STATS[k], 4) for k in FINITE_KEYS)
    assert writer.flushes == 1
    logger.close()
    logger.close()
    assert not writer.closed and writer.flushes == 2
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log(STATS, 5)


def test_tensorboard_bad_arguments():
    with pytest.raises(ValueError, match="folder path or a SummaryWriter"):
        TensorBoardLogger(42)
    with pytest.raises(ValueError, match="prefix must be a string"):
        TensorBoardLogger(_FakeWriter(), prefix=None)


# ------------------------------------------------------------------------------------------------------------
# Weights & Biases


class _FakeRun:
    def __init__(self):
        self.calls: list[tuple[dict, dict]] = []

    def log(self, data, **kwargs):
        self.calls.append((dict(data), kwargs))


def test_wandb_logs_finite_values_with_step_to_given_run():
    run = _FakeRun()
    logger = WandbLogger(run)
    logger.log(STATS, 12)
    logger.close()
    ((data, kwargs),) = run.calls
    assert data == {"bscale/" + k: STATS[k] for k in FINITE_KEYS}
    assert kwargs == {"step": 12}


def test_wandb_without_step_and_with_commit():
    run = _FakeRun()
    WandbLogger(run, prefix="", pass_step=False, commit=False).log({"noise_scale": 5.0}, 3)
    assert run.calls == [({"noise_scale": 5.0, "step": 3}, {"commit": False})]


def test_wandb_uses_the_current_run_when_none_given(monkeypatch):
    fake = types.ModuleType("wandb")
    fake.run = None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = WandbLogger()  # created before wandb.init(): the run is looked up at log time
    with pytest.raises(RuntimeError, match=r"call wandb.init\(\) first"):
        logger.log(STATS, 1)
    fake.run = _FakeRun()
    logger.log(STATS, 2)
    assert fake.run.calls[0][1] == {"step": 2}


def test_wandb_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbLogger()
    WandbLogger(_FakeRun())  # a given run needs no wandb import
    with pytest.raises(ValueError, match="log method"):
        WandbLogger(run=object())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(dir=str(tmp_path), project="bscale-test")
    try:
        with WandbLogger() as logger:
            logger.log(STATS, 1)
            logger.log(STATS, 2)
        assert run.summary["bscale/noise_scale"] == STATS["noise_scale"]
    finally:
        run.finish()
    assert any(tmp_path.rglob("*.wandb"))


# ------------------------------------------------------------------------------------------------------------
# Lightning (fake trainer and module: Lightning is not installed in CI)


class _StatsOptimizer:
    def __init__(self):
        self.stats = dict(STATS)


class _Trainer:
    def __init__(self, optimizers=()):
        self.global_step = 0
        self.optimizers = list(optimizers)


class _Module:
    def __init__(self):
        self.logged: list[tuple[dict, dict]] = []

    def log_dict(self, values, **kwargs):
        self.logged.append((dict(values), kwargs))


def _run_batches(callback, trainer, module, steps_after_each_batch):
    """Call the hook once per batch, with global_step as Lightning has it after that batch."""
    for batch_idx, step in enumerate(steps_after_each_batch):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, batch_idx)


def test_lightning_logs_once_per_optimizer_step_under_accumulation():
    opt = _StatsOptimizer()
    trainer, module = _Trainer([object(), opt]), _Module()  # found among several optimizers by its .stats
    callback = LightningCallback()
    # Two batches accumulated per step: global_step moves every second batch.
    _run_batches(callback, trainer, module, [0, 1, 1, 2, 2, 3])
    assert len(module.logged) == 3
    values, kwargs = module.logged[0]
    assert values == {"bscale/" + k: STATS[k] for k in FINITE_KEYS}
    assert kwargs == {"on_step": True, "on_epoch": False, "prog_bar": False, "logger": True}


def test_lightning_every_n_steps_and_explicit_optimizer():
    opt, module = _StatsOptimizer(), _Module()
    callback = LightningCallback(opt, every_n_steps=3, prefix="x/")
    steps = []
    trainer = _Trainer()  # no optimizers listed: the given one is used
    for step in range(1, 10):
        opt.stats["noise_scale"] = float(step)
        _run_batches(callback, trainer, module, [step])
        if module.logged and module.logged[-1][0]["x/noise_scale"] == step:
            steps.append(step)
    assert steps == [3, 6, 9]


def test_lightning_getter_and_wrapped_optimizer():
    opt, module = _StatsOptimizer(), _Module()
    LightningCallback(lambda: opt).on_train_batch_end(_Trainer(), module, None, None, 0)
    assert module.logged == []  # step 0: no optimizer step yet
    trainer = _Trainer([types.SimpleNamespace(_optimizer=opt)])  # as a LightningOptimizer wraps it
    _run_batches(LightningCallback(), trainer, module, [1])
    assert module.logged[0][0]["bscale/noise_scale"] == STATS["noise_scale"]
    _run_batches(LightningCallback(lambda: opt), _Trainer(), module, [1])
    assert len(module.logged) == 2


def test_lightning_misuse():
    with pytest.raises(ValueError, match="every_n_steps"):
        LightningCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="optimizer_or_getter"):
        LightningCallback(optimizer_or_getter=3)
    with pytest.raises(RuntimeError, match=r"found no optimizer with \.stats"):
        _run_batches(LightningCallback(), _Trainer([object()]), _Module(), [1])
    with pytest.raises(RuntimeError, match=r"getter returned an object without \.stats"):
        _run_batches(LightningCallback(lambda: object()), _Trainer(), _Module(), [1])


def test_lightning_subclasses_callback_when_installed(monkeypatch):
    class Callback:  # stands in for lightning.pytorch.Callback
        def on_train_batch_end(self, *args):
            raise AssertionError("the base hook must be overridden")

    package = types.ModuleType("lightning")
    sub = types.ModuleType("lightning.pytorch")
    sub.Callback = Callback
    package.pytorch = sub
    monkeypatch.setitem(sys.modules, "lightning", package)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", sub)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)

    callback = LightningCallback(every_n_steps=2)
    assert isinstance(callback, Callback) and isinstance(callback, LightningCallback)
    assert callback.every_n_steps == 2
    module = _Module()
    _run_batches(callback, _Trainer([_StatsOptimizer()]), module, [2])
    assert len(module.logged) == 1
    copy = pickle.loads(pickle.dumps(callback))
    assert isinstance(copy, Callback) and copy.every_n_steps == 2 and copy._last_step == 2


def test_lightning_is_plain_without_lightning(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    callback = LightningCallback(prefix="p/")
    assert type(callback) is LightningCallback
    assert pickle.loads(pickle.dumps(callback)).prefix == "p/"


# ------------------------------------------------------------------------------------------------------------
# PrintLogger and formatting


@pytest.mark.parametrize(
    ("value", "stderr", "expected"),
    [
        (1234.0, 98.0, "1.23k ± 0.10k"),
        (950.0, 12.3, "950 ± 12"),
        (12.345, 0.5, "12.3 ± 0.5"),
        (999.6, None, "1.00k"),
        (1.5e6, 2e5, "1.50M ± 0.20M"),
        (2.0e13, NAN, "20.0T"),
        (4.2e16, None, "42000T"),
        (0.5, NAN, "0.500"),
        (0.0, 1.0, "0.00 ± 1.00"),
        (-1234.0, None, "-1.23k"),
        (NAN, 3.0, "n/a"),
        (None, None, "n/a"),  # opt.noise_scale before its first estimate
        (math.inf, None, "inf"),
        (100.0, math.inf, "100 ± inf"),
        (5123.0, 4.0, "5.12k ± 0.004k"),  # an error below the last digit: one digit of it, never "± 0.00k"
        (99.96, 0.4, "100 ± 0.4"),
        (3e6, 1e-3, "3.00M ± <0.01M"),
    ],
)
def test_format_noise_scale(value, stderr, expected):
    assert format_noise_scale(value, stderr) == expected


_SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1e-3, max_value=1e14), st.floats(min_value=0.0, max_value=1e14))
def test_format_noise_scale_reads_back(value, stderr):
    match = re.fullmatch(r"([0-9.]+)([kMGT]?) ± (<?)([0-9.]+)([kMGT]?)", format_noise_scale(value, stderr))
    assert match is not None
    number, unit, bound, err, err_unit = match.groups()
    assert unit == err_unit  # both in one unit, comparable at a glance
    assert len(number.replace(".", "").lstrip("0")) == 3  # three significant digits
    # Three significant digits: the value is off by at most half a unit in the last place.
    assert float(number) * _SCALE[unit] == pytest.approx(value, rel=5e-3)
    if bound:  # an error too small for one digit without an exponent
        assert 0 < stderr < float(err) * _SCALE[unit]
        return
    assert (float(err) > 0) == (stderr > 0)  # a nonzero error never reads as zero
    # The error to the value's decimals, or (below its last digit) to its own first digit: off by at most half a
    # unit in its last place, plus a few float64 ulps (a large stderr's digits are beyond double precision).
    half_ulp = 0.5 * 10 ** -(len(err.split(".")[1]) if "." in err else 0) * _SCALE[unit]
    assert abs(float(err) * _SCALE[unit] - stderr) <= half_ulp * (1 + 1e-9) + 4 * math.ulp(stderr)


def test_print_logger_line(caplog):
    stats = {**STATS, "layer/fc1/noise_scale_stderr": NAN, "loss": 2.0}
    logger = PrintLogger(keys=("noise_scale", "lr_scale", "batch_size", "grad_sq", "absent", "loss"))
    with caplog.at_level(logging.INFO, logger="bscale"):
        logger.log(stats, 120)
    assert caplog.records[0].name == "bscale"
    line = "step 120: B_noise 1.23k ± 0.10k | lr scale 1.5 | batch 256 | grad_sq n/a | loss 2"
    assert caplog.messages == [line]
    layer_line = PrintLogger(keys=["layer/fc1/noise_scale"]).format(stats, 1)
    assert layer_line == "step 1: layer/fc1/noise_scale 17.2"  # its stderr is NaN: value alone
    # peak_batch is inf under the SGD law: printed, not an OverflowError raised from inside opt.step().
    assert PrintLogger(keys=["peak_batch", "x"]).format({"peak_batch": math.inf, "x": -math.inf}, 2) == (
        "step 2: peak_batch inf | x -inf"
    )


def test_print_logger_levels_and_names(caplog):
    named = PrintLogger("train.gns", level=logging.DEBUG)
    with caplog.at_level(logging.INFO):
        named.log(STATS, 1)  # below the level: nothing
    assert caplog.messages == []
    with caplog.at_level(logging.DEBUG, logger="train.gns"):
        named.log(STATS, 2)
    assert caplog.records[0].name == "train.gns" and caplog.messages[0].startswith("step 2: B_noise")
    own = logging.getLogger("mine")
    assert PrintLogger(own).logger is own
    with pytest.raises(ValueError, match="single string"):
        PrintLogger(keys="noise_scale")
    with pytest.raises(ValueError, match=r"logging\.Logger"):
        PrintLogger(logger=3)


# ------------------------------------------------------------------------------------------------------------
# Plots


def _synthetic_run(n: int = 60) -> list[dict]:
    """Records as a run writes them: no estimate for the first steps, then B_noise rising and the batch
    doubling behind it."""
    records, examples, batch = [], 0.0, 32.0
    for step in range(1, n + 1):
        examples += batch
        early = step <= 5
        noise = NAN if early else 50.0 * step**0.8
        if not early and batch < noise / 2:
            batch *= 2
        records.append(
            {
                "step": step,
                "examples": examples,
                "noise_scale": noise,
                "noise_scale_stderr": NAN if early else (0.3 if step < 10 else 1.5) * noise / step**0.5,
                "batch_size": batch,
                "lr_scale": NAN if early else math.sqrt(batch / 32.0),
                "loss": 3.0 * math.exp(-step / 30.0),
            }
        )
    return records


def _png_is_drawn(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # axes, lines and labels; a blank canvas of this size is about 2 KB
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[1] == 800  # 8 in at 100 dpi
    assert pixels[..., :3].std() > 0.05  # not a blank image


def test_plot_run_from_jsonl_with_nan_only_early_rows(tmp_path):
    path = tmp_path / "run.jsonl"
    with JSONLLogger(path) as logger:
        for record in _synthetic_run():
            logger.log({k: v for k, v in record.items() if k != "step"}, record["step"])
    out = plot_run(path, tmp_path / "plots" / "run.png", title="synthetic")
    assert out == tmp_path / "plots" / "run.png"
    _png_is_drawn(out)


def test_plot_panels_and_data():
    records = _synthetic_run()
    fig = _build_figure(records, "t")
    assert len(fig.axes) == 3
    top, loss_ax, lr_ax = fig.axes
    assert top.get_yscale() == "log" and lr_ax.get_ylabel() == "lr scale" and loss_ax.get_ylabel() == "loss"
    assert top.get_xlabel() == "" and lr_ax.get_xlabel() == "examples seen"
    noise_line, batch_line = top.get_lines()
    expected = [(r["examples"], r["noise_scale"]) for r in records if not math.isnan(r["noise_scale"])]
    assert list(zip(*noise_line.get_data(), strict=True)) == expected  # NaN rows left out, none invented
    assert len(batch_line.get_xdata()) == len(records) + 1  # and where the first record's step began
    assert len(top.collections) == 1  # the ± stderr band
    # The band never reaches zero (cannot be drawn on a log axis) even where stderr exceeds the value.
    band_y = top.collections[0].get_paths()[0].vertices[:, 1]
    assert band_y.min() > 0


def test_plot_draws_each_batch_over_the_examples_of_its_step():
    # A record holds the examples seen after its step and the batch that step used.
    records, seen = [], 0
    for step, batch in enumerate([16, 16, 16, 32, 32], start=1):
        seen += batch
        records.append({"step": step, "examples": seen, "batch_size": batch, "noise_scale": 100.0})
    batch_line = _build_figure(records, None).axes[0].get_lines()[1]
    path = batch_line.get_path()  # the drawn staircase, in data coordinates
    xs, ys = path.vertices[:, 0], path.vertices[:, 1]
    # Step 4 took examples 49..80 at batch 32: the staircase is at 32 from x = 48 on; step 1 took 1..16.
    assert ys[(xs > 48) & (xs <= 80)].min() == 32
    assert ys[xs < 48].max() == 16 and xs.min() == 0


def test_loggers_read_none_as_no_value(tmp_path):
    path = tmp_path / "log.jsonl"
    with JSONLLogger(path) as logger:
        logger.log({"noise_scale": None, "loss": 1.5}, 1)
    (record,) = read_jsonl(path)
    assert math.isnan(record["noise_scale"]) and record["loss"] == 1.5


def test_plot_per_coordinate_columns():
    records = _synthetic_run()
    for i, r in enumerate(records):
        r["coord/frac_small_batch"] = NAN if i < 2 else 0.9 - 0.01 * i
        r["adam_preconditioned/noise_scale"] = NAN if i < 3 else 2.0 * r["noise_scale"]
    fig = _build_figure(records, None)
    assert len(fig.axes) == 4
    top, regime_ax = fig.axes[0], fig.axes[3]
    precond = top.get_lines()[-1]
    expected = [(r["examples"], r["adam_preconditioned/noise_scale"]) for r in records[3:]]
    expected = [(x, y) for x, y in expected if y > 0]
    assert list(zip(*precond.get_data(), strict=True)) == expected
    (line,) = regime_ax.get_lines()
    assert list(line.get_ydata()) == [r["coord/frac_small_batch"] for r in records[2:]]
    assert regime_ax.get_ylim() == (0.0, 1.0)
    # With the pure-noise level in the records, it is drawn beside the share (dotted).
    for r in records[2:]:
        r["coord/frac_small_batch_noise_only"] = 0.7
    _, noise_only = _build_figure(records, None).axes[3].get_lines()
    assert list(noise_only.get_ydata()) == [0.7] * len(records[2:]) and noise_only.get_linestyle() == ":"


def test_plot_without_optional_columns_and_without_estimates(tmp_path):
    records = [{"step": s, "noise_scale": NAN, "batch_size": 64.0} for s in range(1, 6)]
    fig = _build_figure(records, None)
    assert len(fig.axes) == 1  # no loss, no lr_scale
    assert any("no B_noise estimate yet" in t.get_text() for t in fig.axes[0].texts)
    assert fig.axes[0].get_xlabel() == "optimizer step"  # no examples column
    _png_is_drawn(plot_run(records, tmp_path / "empty.png"))


def test_plot_keeps_last_record_of_a_resumed_step():
    records = [
        {"step": 1, "examples": 10, "noise_scale": 100.0},
        {"step": 2, "examples": 20, "noise_scale": 200.0},
        {"step": 2, "examples": 20, "noise_scale": 250.0},  # written again after a resume
        {"step": 3, "examples": 30, "noise_scale": 300.0},
    ]
    (line,) = _build_figure(records, None).axes[0].get_lines()
    assert list(line.get_ydata()) == [100.0, 250.0, 300.0]


def test_plot_draws_only_the_last_of_two_runs_in_one_log():
    # A script run twice with the same JSONLLogger file: the second, shorter run starts over at the first step.
    # Merging by step would draw the new run for steps 10-20 and the old one after: only the last run is drawn.
    old = [{"step": s, "examples": 10 * s, "noise_scale": 1.0} for s in (10, 20, 30, 40)]
    new = [{"step": s, "examples": 10 * s, "noise_scale": 2.0} for s in (10, 20)]
    with pytest.warns(RuntimeWarning, match="4 records of an earlier run .* line 5.* append=False"):
        (line,) = _build_figure(old + new, None).axes[0].get_lines()
    assert list(line.get_xdata()) == [100, 200] and list(line.get_ydata()) == [2.0, 2.0]
    # A resume goes back to its checkpoint, after the log's first step: one run, no warning.
    resumed = [{"step": s, "examples": 10 * s, "noise_scale": 3.0} for s in (20, 30, 40, 50)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (line,) = _build_figure(old + resumed, None).axes[0].get_lines()
    assert list(line.get_ydata()) == [1.0, 3.0, 3.0, 3.0, 3.0]


def test_plot_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        plot_run([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="not a single dict"):
        plot_run({"step": 1}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="every record must be a dict"):
        plot_run([1, 2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="title must be a string"):
        plot_run([{"step": 1}], tmp_path / "x.png", title=3)
