"""Entry point of the `bevcache` command.

Importing `bevcache` registers its components in mmdet3d's registries, which imports torch and
mmdet3d (~5-8 s). This module marks the start as light, so the package skips that; the commands
that build models register on their own (bevcache.cli), and `--help`, `info` and `verify` start
in well under a second.
"""

LIGHT_START = True


def main() -> None:
    from bevcache.cli import main as cli_main

    cli_main(prog_name="bevcache")  # also under `python -m bevcache_cli`, as the tests start it


if __name__ == "__main__":
    main()
