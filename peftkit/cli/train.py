"""`peftkit train`: train a recipe's adapter in this process, or start N workers through
`accelerate launch`; and the command line that resumes a stopped run."""

from __future__ import annotations

import os
import shlex

from peftkit.cli.common import add_command, add_recipe_args, make_console, resolve_recipe
from peftkit.errors import UserError
from peftkit.run import rundir
from peftkit.training import launcher

HELP = "train a recipe's adapter; writes runs/<name>/"
EXAMPLES = """\
examples:
  peftkit train demo
  peftkit train demo train.max_steps=50 adapter.r=8
  peftkit train qwen2.5-7b-lora model.tiny=true data.train=my.jsonl
  peftkit train demo --resume
  peftkit train demo --nproc 2            # 2 processes via accelerate launch
  peftkit train demo --nproc 2 --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1
  accelerate launch -m peftkit train demo
  peftkit train demo --report-to tensorboard   # logs to runs/demo/tb/
  peftkit train demo adapter.use_dora=true adapter.loraplus_lr_ratio=16"""


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "train", cmd_train, HELP, EXAMPLES)
    add_recipe_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory of the same name")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint (or the one given)")
    p.add_argument("--report-to", dest="report_to", default=None,
                   choices=("none", "tensorboard", "wandb", "mlflow"),
                   help="experiment tracker (= train.report_to=...); tensorboard writes to "
                        "runs/<name>/tb/")
    launch = p.add_argument_group(
        "multi-process", "start N workers through `accelerate launch` (the command is printed); "
        "inside `accelerate launch`/torchrun these are ignored")
    launch.add_argument("--nproc", type=int, default=0, metavar="N",
                        help="processes per machine (default: the recipe's launch.num_processes)")
    launch.add_argument("--num_machines", type=int, default=1, metavar="M",
                        help="machines, each running --nproc processes (world size N x M)")
    launch.add_argument("--machine_rank", type=int, default=0, metavar="R",
                        help="this machine's rank, 0..M-1 (0 holds the run directory)")
    launch.add_argument("--main_process_ip", default=None, metavar="IP",
                        help="address of machine rank 0 (with --num_machines > 1)")
    launch.add_argument("--main_process_port", type=int, default=None, metavar="PORT")
    launch.add_argument("--accelerate-config", dest="accelerate_config", default=None,
                        metavar="FILE", help="an accelerate config file (accelerate config)")


def cmd_train(args) -> int:
    if args.report_to:  # the same as the override, so workers of --nproc get it too
        args.overrides = [*args.overrides, f"train.report_to={args.report_to}"]
    entry, recipe = resolve_recipe(args)
    if args.nproc < 0 or args.num_machines < 1:
        raise UserError("--nproc and --num_machines must be positive")
    nproc = args.nproc or recipe.launch.num_processes
    # imports torch (seconds): kept out of CLI start-up, and after bad input is reported
    from peftkit.training import distributed

    strategy = distributed.check(recipe)  # its refusals come before N workers start
    sharded = strategy != "ddp"
    if (nproc * args.num_machines > 1 or sharded) and not launcher.in_distributed_worker():
        import torch  # loaded already by `distributed`

        cuda = torch.cuda.is_available()
        if sharded and not cuda and nproc * args.num_machines < 2:
            raise UserError(f"launch.strategy={strategy} shards the training state across "
                            "processes: on CPU run it with --nproc 2 or more, or use "
                            "launch.strategy=ddp")
        # Fail now, not in N workers after 10 s of imports each. Only on machine rank 0: with a
        # shared filesystem, the others may start after its workers created the directory.
        if not args.resume and args.machine_rank == 0:
            rundir.check_target(rundir.run_dir(recipe), args.overwrite)
        topology = launcher.Topology(nproc, args.num_machines, args.machine_rank,
                                     args.main_process_ip, args.main_process_port,
                                     args.accelerate_config, strategy, recipe.launch.zero_stage)
        return launcher.run(topology, _worker_args(args), cuda=cuda)

    # transformers, peft, accelerate (many seconds): only a run in this process needs them
    from peftkit.training.loop import train

    result = train(recipe, str(entry.path), overwrite=args.overwrite, resume=args.resume)
    if result.path.exists():
        _print_summary(result)
    return 0


def _worker_args(args) -> list[str]:
    """The `peftkit train` arguments each worker gets (launch flags stripped)."""
    argv = [args.recipe, *args.overrides]
    if args.overwrite:
        argv.append("--overwrite")
    if args.resume:
        argv += ["--resume"] + ([args.resume] if isinstance(args.resume, str) else [])
    return argv


def _print_summary(result) -> None:
    from accelerate import PartialState  # loaded already by the loop; heavy at start-up

    if not PartialState().is_main_process:
        return
    console = make_console()
    before, after = result.evals.get("before", {}), result.evals.get("after", {})
    if "eval_loss" in after:
        was = f"{before['eval_loss']:.4f} -> " if "eval_loss" in before else ""
        console.print(f"held-out loss: {was}{after['eval_loss']:.4f}")
    if "exact_match" in after:
        was = f"{100 * before['exact_match']:.1f}% -> " if "exact_match" in before else ""
        console.print(f"held-out exact match: {was}[bold]{100 * after['exact_match']:.1f}%[/]")
        # The same prompts come first before and after: show how each answer changed.
        first = {prompt: answer for prompt, answer, _ in before.get("samples", [])}
        for prompt, answer, ref in after.get("samples", []):
            mark = "[green]ok[/]" if answer == ref else "[red]x[/]"
            was = f"{first[prompt]!r} -> " if prompt in first else ""
            console.print(f"  {mark} {prompt!r}: {was}{answer!r} (expected {ref!r})")
    if result.forgetting is not None:
        f = result.forgetting
        console.print(f"general-text loss (forgetting meter): base {f.before:.4f} -> adapted "
                      f"{f.after:.4f} ({100 * f.rise:+.1f}%)")
    console.print(f"run directory: {result.path}  (adapter: {result.path / 'adapter'})")


def resume_command(args) -> str:
    """The `peftkit train` command that continues this run from its newest checkpoint."""
    argv = ["peftkit", "train", args.recipe, *args.overrides, "--resume"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if getattr(args, "nproc", 0):
        argv += ["--nproc", str(args.nproc)]
    elif world > 1:  # a worker of `--nproc N`
        argv += ["--nproc", str(per_machine)]
    if world > per_machine:  # one line per machine: the same, with its own --machine_rank
        argv += ["--num_machines", str(world // per_machine), "--machine_rank", "R",
                 "--main_process_ip", os.environ.get("MASTER_ADDR", "IP")]
    return shlex.join(argv)
