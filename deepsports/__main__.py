"""``python -m deepsports ...`` (and ``torchrun --nproc_per_node N -m deepsports train ...``)."""

from deepsports.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
