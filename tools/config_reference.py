"""Write the configuration reference (every field, its default and meaning) into docs/configuration.md.

    python tools/config_reference.py          # rewrite the section between the config-reference markers
    python tools/config_reference.py --check  # exit 1 if docs/configuration.md is out of date

The table is generated from the dataclasses in maskrcnn/config.py, so it cannot drift from the code.
"""

import argparse
from pathlib import Path

from maskrcnn.cli import run
from maskrcnn.config import readme_with_config_reference
from maskrcnn.fileio import atomic_write

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that docs/configuration.md is up to date")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    updated = readme_with_config_reference(text)
    if args.check:
        if updated != text:
            print(f"{PAGE}'s configuration reference is out of date: run python tools/config_reference.py")
            raise SystemExit(1)
        return
    atomic_write(PAGE, lambda f: f.write(updated.encode()))
    print(f"updated {PAGE}")


if __name__ == "__main__":
    run(main)
