"""The `semid` command's entry point, and `python -m semid` (e.g. under torchrun:
`torchrun --nproc-per-node 8 -m semid train ...`)."""
import sys


def run() -> int:
    """Run the command line. A Ctrl-C while its modules are still importing ends as one at any later moment
    does (one line, exit 130), not with a traceback: `semid.cli.main` sets its own handlers only once loaded."""
    try:
        from semid.cli import main
    except KeyboardInterrupt:
        print("\nsemid: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
