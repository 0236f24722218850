"""`python -m trtconv` is the `trtconv` command."""

from trtconv.cli.app import main

main()
