"""`python -m cortex.cli`: the `cortex` command, for a venv whose scripts are not on PATH."""

from cortex.cli.main import main

main()
