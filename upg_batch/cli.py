"""`upg-batch`: run or validate a job file, summarize an output folder, or write a model
folder as one GGUF file (`quantize`).

Exit status: 0 when the job finished (error rows are results, not failures, up to
max_error_fraction); 2 for a job that cannot start (config, dataset, output folder, model,
metrics port; for `quantize`, a model folder or argument it cannot use); 1 when a started job could not finish, or stopped over its error budget (and
for `validate`, when the rows it would reject are over it); 130 on Ctrl-C, 143 on SIGTERM.
Every failure prints one line naming what is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from typing import Sequence

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_JOB, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds as Ctrl-C does. Ray re-raises an interrupt that arrives while it waits
    as a plain KeyboardInterrupt, so the handler also sets `_sigterm`."""


_sigterm = False


def _job_options(p: argparse.ArgumentParser) -> None:
    """Options that change the job file's fields (applied after it is read, then validated)."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a job field, e.g. --set sampling.max_tokens=8 (dotted key; the value is read as YAML; repeatable)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N rows, for a smoke test (input.limit)")
    p.add_argument(
        "--max-error-fraction", type=float, metavar="F",
        help="stop when more than this fraction of the rows are error rows (max_error_fraction; default 0.1)",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.limit is not None:
        out.append(f"input.limit={args.limit}")
    if args.max_error_fraction is not None:
        out.append(f"max_error_fraction={args.max_error_fraction!r}")
    return out


def _parser() -> argparse.ArgumentParser:
    from upg_batch import __version__

    p = argparse.ArgumentParser(
        prog="upg-batch",
        description="Distributed batch inference: Parquet prompts in, Arrow completions out, over a Ray cluster.",
    )
    p.add_argument("--version", action="version", version=f"upg-batch {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser(
        "run",
        help="run a job (resumes a job interrupted earlier)",
        description="Run JOB.yaml: shard the prompts over Ray engine actors and commit each shard's "
        "completions exactly once under output.path. Running it again resumes.",
    )
    run.add_argument("job", metavar="JOB.yaml", help="the job file (docs/config.md)")
    run.add_argument("--overwrite", action="store_true", help="replace output of a different job in output.path")
    _job_options(run)
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    val = sub.add_parser(
        "validate",
        help="check a job without generating",
        description="Check JOB.yaml: the config, every input file's schema and that the model loads; "
        "count rows and report rows that cannot run (too long for the context, empty, ...).",
    )
    val.add_argument("job", metavar="JOB.yaml", help="the job file (docs/config.md)")
    val.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    val.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _job_options(val)
    show = sub.add_parser(
        "show",
        help="summarize an output folder",
        description="Summarize OUT (a job's output.path, complete or not): the summary, each node's share, "
        "error rows by kind with examples, and a few sample completions.",
    )
    show.add_argument("out", metavar="OUT", help="the output folder")
    show.add_argument("--samples", type=int, default=3, metavar="N", help="sample completions to print (default 3)")
    show.add_argument("--json", action="store_true", help="print it as JSON on stdout")
    show.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from upg_batch.quantize import DEFAULT_FORMAT, FORMATS

    quant = sub.add_parser(
        "quantize",
        help="write a model folder as one GGUF file",
        description="Write MODEL_DIR (a Hugging Face LlamaForCausalLM or Qwen2ForCausalLM folder: config.json, "
        "safetensors, tokenizer.json) as OUT.gguf with its matrices in FORMAT, a file this engine and llama.cpp "
        "both load: quantize once, copy one file to every node. Matrices whose rows are not whole blocks of "
        "their format are written f16 (listed).",
    )
    quant.add_argument("model_dir", metavar="MODEL_DIR", help="the Hugging Face model folder")
    quant.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (replaced if it exists)")
    quant.add_argument(
        "--format", default=DEFAULT_FORMAT, choices=FORMATS, metavar="FMT",
        help=f"weight format: {', '.join(FORMATS)} (default {DEFAULT_FORMAT}: llama.cpp's mix of q4_k and q6_k)",
    )
    quant.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    quant.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("upg_batch").setLevel(logging.DEBUG if verbose else logging.INFO)


def _fail(code: int, message: str) -> int:
    print(f"upg-batch: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    # imported here so `--help` answers at once
    from upg_batch.budget import ErrorBudgetError
    from upg_batch.commit import OutputError
    from upg_batch.config import ConfigError, load_config
    from upg_batch.plan import DatasetError
    from upg_batch.runner import JobError, MetricsPortError, ModelError

    # SIGTERM unwinds like Ctrl-C: actors are killed, the output folder's lock released
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.command == "quantize":
            from upg_batch.quantize import QuantizeError, quantize

            if not args.verbose:  # the gguf package's writer reports every step at INFO
                logging.getLogger("gguf").setLevel(logging.WARNING)
            try:
                summary = quantize(args.model_dir, args.out, args.format)
            except QuantizeError as e:
                return _fail(EXIT_BAD_JOB, str(e))
            print(json.dumps(summary.as_dict(), indent=1) if args.json else summary.format_text())
            return EXIT_OK
        if args.command == "show":
            from upg_batch.show import format_show, show

            info = show(args.out, samples=args.samples)
            print(json.dumps(info, indent=1, default=str) if args.json else format_show(info))
            return EXIT_OK
        cfg = load_config(args.job, _overrides(args))
        if args.command == "validate":
            from upg_batch.validate import budget_error, format_report, validate

            report = validate(cfg)
            print(json.dumps(report, indent=1) if args.json else format_report(report))
            if cfg.input.unique_ids and report.get("ids_problem"):
                return _fail(EXIT_BAD_JOB, f"{report['ids_problem']}; input.unique_ids is set")
            problem = budget_error(report)
            return _fail(EXIT_FAILED, problem) if problem else EXIT_OK
        from upg_batch.progress import format_summary
        from upg_batch.runner import Runner

        # Ray prints notices of its own to stdout from a thread ("(raylet) A worker died ...",
        # which the runner's own log line already says): stdout is kept for the summary
        with contextlib.redirect_stdout(sys.stderr):
            summary = Runner(cfg, overwrite=args.overwrite).run()
        print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
        return EXIT_OK
    except (ConfigError, DatasetError, OutputError, ModelError, MetricsPortError) as e:
        return _fail(EXIT_BAD_JOB, str(e))
    except (JobError, ErrorBudgetError) as e:
        return _fail(EXIT_FAILED, str(e))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (_Terminated, or as Ray re-raises it)
        if _sigterm:
            return _fail(EXIT_TERMINATED, "terminated (SIGTERM); committed shards are kept, run the job again to resume")
        return _fail(EXIT_INTERRUPTED, "interrupted; committed shards are kept, run the job again to resume")
    except Exception as e:  # anything unforeseen: still one line (the traceback with -v)
        logging.getLogger("upg_batch").debug("unexpected error", exc_info=True)
        return _fail(EXIT_FAILED, f"{type(e).__name__}: {e}")


def _raise_terminated(signum: int, frame: object) -> None:
    # the first SIGTERM unwinds (actors killed, lock released, Ray stopped); more while that
    # runs would cut it short, so they are ignored
    global _sigterm
    _sigterm = True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
