"""`python -m loop.launch ARGS`: `accelerate launch ARGS`, without torch's traceback when a worker fails.

`loop ... --processes N` runs its workers through accelerate (torchrun underneath). When a worker exits with an
error, the worker has already said why in one line (or with its own traceback under --debug); torchrun then
raises ChildFailedError in the launcher, whose ~40-line traceback says nothing more. This exits with the first
failed worker's code instead (2 for a mistake, 130 for an interrupt, 128+N for a signal), as one process would.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        launch_command(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else code  # -9: killed by SIGKILL -> 137, as a shell says it
    return 0


if __name__ == "__main__":
    sys.exit(main())
