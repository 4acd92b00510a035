"""`python -m v4compile` is the same command group as `v4compile`."""

from v4compile.cli import main

main()
