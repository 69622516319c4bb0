"""`peftkit push`: publish a run's adapter (or a merged model) to the Hugging Face Hub."""

from __future__ import annotations

from rich.markup import escape

from peftkit.cli.common import RUN_HELP, add_command, make_console
from peftkit.run.hub import push

HELP = ("publish a run's adapter (or a merged model) to the Hugging Face Hub with a model "
        "card")
EXAMPLES = """\
examples:
  peftkit push runs/demo --repo-id me/demo-lora --dry-run   # writes runs/demo/push/ only
  HF_TOKEN=hf_... peftkit push runs/demo --repo-id me/demo-lora --private
  peftkit push runs/demo --repo-id me/demo-merged --merged merged/demo --revision v1
  peftkit train demo hub.repo_id=me/demo-lora hub.push_at_end=true"""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "push", cmd_push, HELP, EXAMPLES)
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--repo-id", dest="repo_id", default="", metavar="OWNER/NAME",
                   help="Hub repository, created if missing (default: the recipe's hub.repo_id)")
    p.add_argument("--private", action="store_true", default=None,
                   help="create the repository private (default: hub.private)")
    p.add_argument("--merged", default=None, metavar="DIR",
                   help="publish this `peftkit merge` output instead of the adapter")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="branch to push to, created if missing (default: hub.revision or main)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="only write the folder that would be uploaded (RUN/push/) and list "
                        "it; needs no token and no network")


def cmd_push(args) -> int:
    console = make_console()
    push(args.run, args.repo_id, args.private, args.merged, args.revision, args.dry_run,
         say=lambda line: console.print(escape(line)))
    return 0
