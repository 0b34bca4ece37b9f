"""``python -m deepsports.cli ...`` (what the MLproject, the SLURM templates and the tests run)."""

from deepsports.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
