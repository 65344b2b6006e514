"""``python -m zoo.hub``: list, table, pull, export and push published models."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .format import HubError
from .load import list_pretrained, read_published
from .publish import export, markdown_table, push
from .sources import MANIFEST


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zoo.hub", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the published models of the manifest")
    sub.add_parser("table", help="the manifest as a Markdown table (docs/hub.md)")
    pull = sub.add_parser("pull", help="fetch and verify a published model (for offline use); print its directory")
    pull.add_argument("name", help="a manifest name, directory, http(s) URL or hf://owner/repo[@revision]")
    pull.add_argument("--cache_dir", default=None, help="default: $ZOO_HUB_CACHE or ~/.cache/zoo/hub")
    ex = sub.add_parser("export", help="write the published files of a Lightning checkpoint")
    ex.add_argument("checkpoint", help="a .ckpt written by train.py fit")
    ex.add_argument("directory", help="where to write model.safetensors, config.json, README.md")
    ex.add_argument("--config", default=None, help="the run's resolved config.yaml (default: found beside the run)")
    ex.add_argument("--name", default=None, help="the model's name (default: the run's name, '/' -> '-')")
    ex.add_argument("--command", default=None, help="the command that reproduces the training, for the card")
    ex.add_argument(
        "--training_time_s",
        type=float,
        default=None,
        help="wall time of the training command (default: a Timer's time up to the checkpoint)",
    )
    ex.add_argument("--hardware", default=None, help="what it was trained on (default: this machine)")
    ex.add_argument("--data_dir", default=None, help="override the config's data_dir for the evaluation")
    push_ = sub.add_parser("push", help="publish an exported directory to a local directory or hf://owner/repo")
    push_.add_argument("directory", help="an exported model directory")
    push_.add_argument("target", help="hf://<owner>/<repo> or a local directory")
    push_.add_argument("--name", default=None, help="the manifest name (default: the card's name)")
    push_.add_argument("--source", default=None, help="the source to record (e.g. the URL serving the directory)")
    push_.add_argument("--manifest", default=None, help=f"record the entry in this manifest (e.g. {MANIFEST.name})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a `HubError` is printed as one line and exits with status 1."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "list":
            for e in list_pretrained():
                size = f"{e.size / 1e6:.2f} MB"
                print(f"{e.name:24} {e.task:24} {e.variant:10} {e.metric} {e.value:.4f}  {size}  {e.dataset}")
        elif args.action == "table":
            print(markdown_table())
        elif args.action == "pull":
            print(read_published(args.name, cache_dir=args.cache_dir).directory)
        elif args.action == "export":
            overrides = {"data_dir": args.data_dir} if args.data_dir else None
            card = export(
                args.checkpoint,
                args.directory,
                args.config,
                args.name,
                args.command,
                args.training_time_s,
                args.hardware,
                overrides,
            )
            print(json.dumps({"name": card.name, "metrics": card.metrics, "training_time_s": card.training_time_s}))
        else:
            entry = push(args.directory, args.target, args.name, args.source, args.manifest)
            print(json.dumps(asdict(entry), indent=2))
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
