"""``python -m safellava`` runs the command-line tool."""

from .cli import main

if __name__ == "__main__":  # not again in the processes vLLM and Ray spawn, which import __main__
    raise SystemExit(main())
