"""The ``dogbreed`` command line.

Every command reads the same settings flags (which override environment
variables, which override defaults). Errors that the user can fix print one
line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline import publish
from pipeline.artifact import DEPLOY_DEFINITION_NAME, read_definition
from pipeline.assets import ArtifactError
from pipeline.commands import UsageError, add_settings_arguments, settings_from_args
from pipeline.dag import DefinitionError, steps_of
from pipeline.definition import synth
from pipeline.files import write_atomically
from pipeline.graph import render_graph
from pipeline.local import command as local_run
from pipeline.settings import SettingsError
from pipeline.validate import iter_problems

__all__ = ["UsageError", "add_settings_arguments", "build_parser", "main", "settings_from_args"]

DEFAULT_OUT = Path("build") / "pipeline.json"


def _synth(args: argparse.Namespace) -> int:
    result = synth(settings_from_args(args))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, result.definition)
    deploy = out.parent / DEPLOY_DEFINITION_NAME
    write_atomically(deploy, result.deploy_definition)
    manifest = result.assets.write(out.parent)
    steps = len(steps_of(result.document))
    print(f"wrote {out} ({steps} steps), {deploy} (the deploy-only pipeline, {len(steps_of(result.deploy_document))} "
          f"steps) and {manifest}")
    return 0


def _graph(args: argparse.Namespace) -> int:
    sys.stdout.write(render_graph(synth(settings_from_args(args)).document, args.format))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Synth's checks on a definition file; exit 1 with one line per finding."""
    _, document = read_definition(args.file)
    problems = list(iter_problems(document))
    if problems:
        print(f"{args.file}: {len(problems)} problem{'s' if len(problems) > 1 else ''}", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: valid ({len(steps_of(document))} steps, {len(document.get('Parameters', []))} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dogbreed", description="Build, publish and run the dog-breed SageMaker pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth_parser = commands.add_parser("synth", help="write the pipeline definition JSON and its asset manifest, offline")
    synth_parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"definition path (default {DEFAULT_OUT})")
    add_settings_arguments(synth_parser)
    synth_parser.set_defaults(handler=_synth)

    validate_parser = commands.add_parser("validate", help="run synth's checks on a definition file; exit 1 with the findings")
    validate_parser.add_argument("file", type=Path, help="a pipeline definition JSON, e.g. build/pipeline.json")
    validate_parser.set_defaults(handler=_validate)

    graph_parser = commands.add_parser("graph", help="print the pipeline's DAG")
    graph_parser.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    add_settings_arguments(graph_parser)
    graph_parser.set_defaults(handler=_graph)

    for register in extra_commands():
        register(commands)
    return parser


def extra_commands() -> list[Callable]:
    """Commands defined in their own modules: each module's ``register(subparsers)``."""
    return [publish.register, local_run.register]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SettingsError, UsageError, DefinitionError, ArtifactError) as error:
        print(f"dogbreed {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dogbreed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
