"""`python -m p2psl` is the same as the `p2psl` command."""

from p2psl.cli.commands import main

if __name__ == "__main__":
    main()
