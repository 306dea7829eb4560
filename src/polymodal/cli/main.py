"""The ``polymodal`` command: train | eval | export | report | generate | embed | search | configs | data.

Errors a user can fix (a bad config key, a missing or damaged file, a run folder in use, a full
disk) end with one line on stderr and exit status 2, no traceback. A training run stopped by a
signal exits with 128 + its number, after a checkpoint of the step under way: 130 for SIGINT
(Ctrl-C), 143 for SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from polymodal.errors import ConfigError, DataError, RunError, RunInterrupted

EXIT_USAGE = 2
EXIT_SIGINT = 130  # 128 + SIGINT, the shell's status for Ctrl-C


class OneLineParser(argparse.ArgumentParser):
    """Command-line mistakes as one line (argparse prints the whole usage before its error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        """As argparse's, but ``key=value`` overrides may also follow an option (``train
        run_dir=R --resume train.steps=9``): argparse fills a ``nargs="*"`` positional from its
        first run of values only and refuses the rest, so later ones join ``overrides`` in order."""
        parsed, extra = self.parse_known_args(args, namespace)
        overrides = getattr(parsed, "overrides", None)
        stray = [a for a in extra if overrides is None or a.startswith("-") or "=" not in a]
        if stray:
            self.error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            parsed.overrides = [*overrides, *extra]
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from polymodal.cli import configs, data, embed, export, generate, report, search, train
    from polymodal.cli import eval as eval_cmd

    parser = OneLineParser(
        prog="polymodal",
        description="Build, train, diagnose and run multimodal (image, text, audio) models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        "train": (train, "train a model (default: the any-to-any preset on the built-in data)"),
        "eval": (eval_cmd, "evaluate a run folder's latest checkpoint and save eval.json"),
        "export": (export, "write a run's weights (an FSDP run's shards included) as one whole model.safetensors"),
        "report": (report, "write a run's report (or two runs' side by side) as one self-contained HTML page"),
        "generate": (generate, "generate text, an image (PNG) or speech (WAV) with an any-to-any run"),
        "embed": (embed, "embed a manifest's items of one modality with a CLIP run into a safetensors index"),
        "search": (search, "search an embedding index with a text, image or audio query"),
        "configs": (configs, "list the shipped presets, or print one"),
        "data": (data, "build a config's dataset, print its statistics, write sample PNG/WAVs"),
    }
    for name, (module, help_text) in commands.items():
        doc = (module.__doc__ or help_text).strip()
        sub_parser = sub.add_parser(
            name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.run(args) or 0)
    # OSError: a full disk, a read-only or missing folder; its message names the file.
    except (ConfigError, DataError, RunError, OSError) as exc:
        print(f"polymodal {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return EXIT_USAGE
    except RunInterrupted as exc:
        print(f"polymodal {args.command}: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"polymodal {args.command}: interrupted; resume with --resume", file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
