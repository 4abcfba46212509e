"""Command line: ``critlayers scan`` and ``critlayers compare``.

``critlayers scan`` runs :func:`critlayers.scan.scan` and writes its results;
``critlayers compare`` correlates the shift curves of two saved scans (the same model on two
prompt sets measures how data-oblivious the critical layers are).

A mistake in the input (a missing model, an unreadable prompt file, an option out of range)
ends the program with exit status 2 and a single line on standard error naming the input and
what would work; ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

# Errors that mean "the input is wrong", reported in one line with exit status 2.
_INPUT_ERRORS = (ValueError, OSError, ImportError, json.JSONDecodeError)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) with exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _n_prompts(text: str) -> int | None:
    if text.lower() == "all":
        return None
    return _positive_int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``critlayers`` argument parser with its ``scan`` and ``compare`` subcommands."""
    parser = _Parser(
        prog="critlayers",
        description="Find the critical layers of a language model from the CKA "
        "between its blocks (arXiv:2506.00382).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "scan",
        help="scan a model and write its critical layers",
        description="Capture every block's state on a prompt set, compute the "
        "all-pairs CKA matrix and each layer's shift score, and "
        "write scan.json, cka.csv, cka.png, shift.png and "
        "report.html.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model folder, .gguf file or hub id (with "
        "--allow-download); default: the embedded Gemma 3 270M",
    )
    p.add_argument(
        "--data",
        default=None,
        help="prompt file (JSONL, JSON, CSV, TXT), a datasets folder or "
        "builtin:NAME; default: the bundled instruction prompts",
    )
    p.add_argument(
        "--n",
        type=_n_prompts,
        default=300,
        help="number of prompts, sampled with --seed, or 'all' (default 300)",
    )
    p.add_argument(
        "--token",
        choices=("last", "mean", "all"),
        default="last",
        help="which token's state: last prompt token (default), mean over "
        "tokens, or all tokens (minibatch estimator)",
    )
    p.add_argument(
        "--window", type=_positive_int, default=5, help="odd window of the shift score (default 5)"
    )
    p.add_argument(
        "--top-k", type=_positive_int, default=5, help="number of critical layers (default 5)"
    )
    p.add_argument(
        "--estimator",
        choices=("biased", "unbiased"),
        default=None,
        help="biased full-batch CKA (the paper's; default) or unbiased minibatch "
        "CKA (default for --token all)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="prompts per forward pass (default 8)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--dtype", default="float32", help="weight dtype: float32 (default), bfloat16 or float16"
    )
    p.add_argument(
        "--out", default="critlayers-results", help="output folder (default ./critlayers-results)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for prompt sampling and the bootstrap (default 0)"
    )
    p.add_argument(
        "--bootstrap",
        type=_count,
        default=0,
        metavar="B",
        help="bootstrap the prompts B times for intervals and top-k frequencies",
    )
    p.add_argument(
        "--ci",
        type=_fraction,
        default=0.95,
        help="coverage of the bootstrap interval (default 0.95)",
    )
    p.add_argument(
        "--angular-n",
        type=_positive_int,
        default=1,
        help="block span of the angular-distance score (default 1)",
    )
    p.add_argument(
        "--max-length",
        type=_positive_int,
        default=None,
        help="truncate prompts to this many tokens (default: model context)",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="allow downloading a hub id from the Hugging Face Hub",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own Python code to run"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")

    c = sub.add_parser(
        "compare",
        help="correlate the shift curves of two saved scans",
        description="Compare two scans of one model (for example on two prompt "
        "sets): Pearson and Spearman correlation of their shift "
        "curves and the overlap of their critical layers.",
    )
    c.add_argument("first", help="scan.json or the folder holding it")
    c.add_argument("second", help="scan.json or the folder holding it")
    c.add_argument(
        "--out", default=None, help="folder for compare.json and compare.png (default: print only)"
    )
    c.add_argument("--debug", action="store_true", help="full tracebacks")
    return parser


def _fmt(value, digits: int = 5) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _run_scan(args) -> int:
    from .scan import scan

    result = scan(
        args.model,
        args.data,
        n=args.n,
        token=args.token,
        window=args.window,
        top_k=args.top_k,
        estimator=args.estimator,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        bootstrap=args.bootstrap,
        ci=args.ci,
        angular_n=args.angular_n,
        max_length=args.max_length,
        allow_download=args.allow_download,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )
    paths = result.save(args.out)
    t = result.timings
    print(
        f"{result.model['name']}: {result.n_layers} layers, {result.prompts['count']} "
        f"prompts ({result.prompts['name']}), {result.settings['token']} token, "
        f"{result.settings['estimator']} CKA, window {result.settings['window']}"
    )
    print(result.table())
    print(
        f"critical layers (k={len(result.critical_layers)}): "
        f"{', '.join(map(str, result.critical_layers))}"
    )
    print(
        f"time: load {t['load']:.1f} s, forward {t['forward']:.1f} s, "
        f"CKA {t['cka']:.2f} s, total {t['total']:.1f} s"
    )
    for path in paths.values():
        print(f"wrote {path}")
    return EXIT_OK


def _run_compare(args) -> int:
    from .report import figure_png, plot_compare
    from .scan import compare_results

    out = compare_results(args.first, args.second)
    a, b = out["a"], out["b"]
    print(f"A: {args.first} ({a['prompts'].get('name')}, {a['prompts'].get('count')} prompts)")
    print(f"B: {args.second} ({b['prompts'].get('name')}, {b['prompts'].get('count')} prompts)")
    print(f"{'layer':>5}  {'delta A':>8}  {'delta B':>8}")
    for layer, (x, y) in enumerate(zip(a["shift"], b["shift"], strict=True)):
        print(f"{layer:>5}  {_fmt(x):>8}  {_fmt(y):>8}")
    print(
        f"pearson {_fmt(out['pearson'], 3)}, spearman {_fmt(out['spearman'], 3)} over "
        f"{out['n_layers_compared']} layers"
    )
    print(
        f"critical A: {a['critical_layers']}, B: {b['critical_layers']}, "
        f"shared: {out['critical_overlap']}"
    )
    if args.out:
        from ._io import commit_files
        from .scan import _json_safe

        text = json.dumps(_json_safe(out), indent=1, allow_nan=False)
        paths = commit_files(
            args.out,
            {
                "compare.png": lambda: figure_png(plot_compare(out)),
                "compare.json": lambda: (text + "\n").encode("utf-8"),
            },
        )
        for path in paths.values():
            print(f"wrote {path}")
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"critlayers: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``critlayers`` command.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 for bad input, 1 for an unexpected failure.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not debug:
        warnings.showwarning = _show_warning
    run = {"scan": _run_scan, "compare": _run_compare}[args.command]
    prog = f"critlayers {args.command}"
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _INPUT_ERRORS as exc:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        print(
            f"{prog}: error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for "
            f"the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
