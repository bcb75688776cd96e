"""Write the configuration reference (every field, its default and meaning) into README.md.

    python tools/config_reference.py          # rewrite the section between the config-reference markers
    python tools/config_reference.py --check  # exit 1 if README.md is out of date

The table is generated from the dataclasses in maskrcnn/config.py, so it cannot drift from the code.
"""

import argparse
from pathlib import Path

from maskrcnn.cli import run
from maskrcnn.config import readme_with_config_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    text = README.read_text()
    updated = readme_with_config_reference(text)
    if args.check:
        if updated != text:
            print("README.md's configuration reference is out of date: run python tools/config_reference.py")
            raise SystemExit(1)
        return
    README.write_text(updated)
    print(f"updated {README}")


if __name__ == "__main__":
    run(main)
