"""The ``bscale`` command line.

Subcommands live in ``_COMMANDS``: each entry is a function that adds one parser to the subparsers and
sets ``func`` (called with the parsed arguments, returning the exit status). Adding a subcommand is writing
one such function and listing it there.

``bscale lr`` prints the learning rate for a new batch size under each scaling rule (linear, square root,
noise-aware) and, given a noise scale, the law's optimal LR and its peak / balance batch.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from . import laws

__all__ = ["main"]


# ------------------------------------------------------------------------------------------ argument types


def _positive_whole(name: str, what: str = "examples") -> Callable[[str], int]:
    """An argparse type: a whole number of `what` > 0 (``"256"``, ``"1e3"``, ``"256.0"``)."""

    def parse(text: str) -> int:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        # The batch sizes on this command are those of actual runs, hence whole numbers of examples.
        if not (math.isfinite(value) and value > 0 and value == int(value)):
            raise argparse.ArgumentTypeError(f"{name} must be a positive whole number of {what}, got {text!r}")
        return int(value)

    return parse


def _positive_real(name: str, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}")
        return value

    return parse


def _beta(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0.0 <= value < 1.0):
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, 1), got {text!r}")
        return value

    return parse


def _non_negative(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text!r}")
        return value

    return parse


# ------------------------------------------------------------------------------------------------ bscale lr


def _num(x: float) -> str:
    # Six significant digits: enough to copy into a config, short enough for a table.
    return f"{x:.6g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; the last column (notes) is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=True)] + [cells[-1]]
        return "  ".join(padded).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _lr_report(args: argparse.Namespace) -> list[str]:
    adam = args.optimizer == "adam"
    ref_lr, ref_b, b, noise = args.ref_lr, args.ref_batch, args.batch, args.noise_scale
    kappa = b / ref_b
    betas = (args.beta1, args.beta2)
    unchanged = [_num(args.beta1), _num(args.beta2), _num(args.eps)] if adam else []
    dashes = ["-"] * len(unchanged)

    header = ["rule", "factor", "lr", *(["beta1", "beta2", "eps"] if adam else []), "note"]
    rows: list[list[str]] = []

    factor = laws.lr_scale(b, ref_b, rule="linear")
    rows.append(["linear", _num(factor), _num(ref_lr * factor), *unchanged, "lr x kappa"])

    if adam:
        try:
            hp = laws.sqrt_rule(kappa, ref_lr, betas=betas, eps=args.eps)
        except ValueError as exc:  # kappa*(1-beta) >= 1: the rule cannot be applied literally
            rows.append(["sqrt", "-", "-", *dashes, str(exc)])
        else:
            cells = [_num(hp.lr / ref_lr), _num(hp.lr), _num(hp.betas[0]), _num(hp.betas[1]), _num(hp.eps)]
            rows.append(["sqrt", *cells, "lr x sqrt(kappa), beta -> 1-kappa(1-beta), eps / sqrt(kappa)"])
    else:
        factor = laws.lr_scale(b, ref_b, rule="sqrt")
        rows.append(["sqrt", _num(factor), _num(ref_lr * factor), "lr x sqrt(kappa) (Adam's rule)"])

    law = "Surge eq. 2" if adam else "McCandlish eq. 2.7"
    if noise is None:
        rows.append(["noise-aware", "-", "-", *dashes, "needs --noise-scale (a measured B_noise)"])
    else:
        factor = laws.lr_scale(b, ref_b, noise, rule="noise", optimizer=args.optimizer)
        note = f"ratio of the optimal-lr law ({law}) at B_noise = {_num(noise)}"
        rows.append(["noise-aware", _num(factor), _num(ref_lr * factor), *unchanged, note])

    lines = [
        f"bscale lr ({args.optimizer}): lr {_num(ref_lr)} at batch {ref_b} -> batch {b} (kappa = {_num(kappa)})",
        "",
        *_table(header, rows),
        "",
    ]
    if noise is None:
        lines.append(f"law ({law}): needs --noise-scale")
        return lines

    lr_max = laws.lr_max_from_reference(ref_lr, ref_b, noise, optimizer=args.optimizer)
    best = laws.optimal_lr(b, noise, lr_max, optimizer=args.optimizer)
    lines.append(
        f"law ({law}): optimal lr at batch {b} = {_num(best)}; lr_max = {_num(lr_max)}"
        f" (taking lr {_num(ref_lr)} as optimal at batch {ref_b})"
    )
    if adam:
        peak = laws.peak_batch(noise, optimizer="adam")
        lines.append(f"peak batch = {_num(peak)} (= B_noise): the optimal lr is highest there, lr_max")
        if b > peak:
            lines.append(f"batch {b} is past the peak: a larger batch lowers the optimal lr (the surge)")
    else:
        lines.append(
            f"balance batch = {_num(noise)} (= B_noise): 2x the fewest steps and 2x the fewest examples;"
            " SGD's optimal lr has no peak, it rises towards lr_max"
        )
    lines.append(
        "B_noise estimates the critical batch, it does not measure it: the two differ by up to ~10x"
        " across tasks (McCandlish table 1)"
    )
    return lines


def _run_lr(args: argparse.Namespace) -> int:
    print("\n".join(_lr_report(args)))
    return 0


def _add_lr_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lr",
        help="learning rate for a new batch size under each scaling rule",
        description=(
            "Rescale a tuned learning rate from --ref-batch to --batch under the linear, square-root and "
            "noise-aware rules, and print the optimal-LR law's prediction given --noise-scale. Batch sizes "
            "are whole numbers of examples (samples, or tokens for a language model), all in the same unit."
        ),
    )
    p.add_argument("--ref-lr", required=True, type=_positive_real("--ref-lr", "a finite positive learning rate"))
    p.add_argument("--ref-batch", required=True, type=_positive_whole("--ref-batch"), help="batch of --ref-lr")
    p.add_argument("--batch", required=True, type=_positive_whole("--batch"), help="the new batch size")
    p.add_argument(
        "--noise-scale",
        type=_positive_real("--noise-scale", "a finite positive number of examples (a measured B_noise)"),
        default=None,
        help="B_noise, in the unit of the batch sizes (default: none; the noise-aware row then needs one)",
    )
    p.add_argument("--optimizer", choices=laws._OPTIMIZERS, default="adam", help="(default: adam)")
    p.add_argument("--beta1", type=_beta("--beta1"), default=0.9, help="Adam's beta1 (default: 0.9)")
    p.add_argument("--beta2", type=_beta("--beta2"), default=0.999, help="Adam's beta2 (default: 0.999)")
    p.add_argument("--eps", type=_non_negative("--eps"), default=1e-8, help="Adam's eps (default: 1e-8)")
    p.set_defaults(func=_run_lr)


# ---------------------------------------------------------------------------------------------------- main


def _add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    from . import demo  # torch-heavy: imported only when the parser is built, which is cheap next to training

    p = subparsers.add_parser(
        "demo",
        help="train a small character transformer on Python's docs with live B_noise (the main job)",
        description=demo.__doc__.splitlines()[0],
    )
    demo.add_arguments(p)
    p.set_defaults(func=demo.run_from_args)


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_lr_command, _add_demo_command)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bscale", description="Gradient noise scale, optimal learning rate and batch size."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bscale`` command line.

    Args:
        argv: the arguments after the program name (default: ``None``, meaning ``sys.argv[1:]``).

    Returns:
        The exit status. Bad arguments exit through ``SystemExit(2)`` with argparse's message.
    """
    args = _build_parser().parse_args(argv)
    return int(args.func(args))
