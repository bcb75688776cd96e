"""The README's commands run as written: every fenced ``bash`` command and ``python`` snippet of the README
and of every page it links (``docs/*.md``), and every command the README writes in running text (a code span
such as ``make demo SHAPES_OPTS=...``), in a fresh process from the root of a copy of the repository:
the README's in order, then each linked page's in the order the README first links them (later commands
use what earlier ones made, as a reader's would). A command that ran already, word for word, is not run
again: a page repeats the README's short path in full.

Only sizes are shrunk, through the overrides the README documents, and the table below lists each;
commands that need a GPU, the COCO dataset or the network, or that would act on this test run itself,
are skipped with the reason. What stands for the reader's own files is made in the copy (``clip.mp4``, a
generated video). A service (``tools/serve.py``) runs in the background, on loopback, while the commands
after it talk to it, and is stopped at the end. A documented command that no longer runs fails this test,
and so does a link to a page that does not exist.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Pages the README links that are written on other branches; until they land, their links may point nowhere.

# Command prefix -> documented settings appended to it (make variables or key.sub=value overrides).
SHRUNK = {
    "make demo": 'SHAPES_OPTS="--num-train 16 --num-val 4 --max-size 160" '
                 'DEMO_OVERRIDES="solver.max_iter=4 solver.warmup_iters=2 train.log_period=2"',
    "python tools/load_test.py": "--requests 4 --concurrency 1 2 --max-seconds 60",
}

# Command prefix -> the URL that answers once it serves: a service runs in the background until the end.
SERVICES = {"python tools/serve.py": "http://127.0.0.1:8000/health"}

OWN_DATA = "the reader's own photos; tests/test_own_data.py runs this walkthrough on a generated labelme folder"

# Command prefix -> why it is not run here.
SKIPPED = {
    "make test": "runs this suite",
    "make transfer": "trains the demo configuration twice for 300 iterations; tests/test_transfer.py runs its "
                     "comparison end to end at a tiny size",
    ".venv/bin/python -m pytest": "runs a file of this suite",
    "pip install -e": "would reinstall the package this suite imports",
    "python tools/train.py --config configs/maskrcnn_R50_FPN.yaml": "needs COCO (data/coco) and a GPU",
    "torchrun": "needs COCO (data/coco) and GPUs",
    "python -c \"import torch, torchvision; w = torchvision": "downloads torchvision's COCO weights (network)",
    "python tools/convert_torchvision.py maskrcnn_resnet50_fpn_coco": "needs the downloaded COCO weights",
    "python tools/convert_torchvision.py TORCHVISION.pth": "needs the downloaded COCO weights",
    "python tools/eval.py --checkpoint output/tv_coco.pth": "needs COCO val2017 and the converted weights",
    "python tools/convert_torchvision.py maskrcnn_resnet50_fpn_v2_coco": "needs the downloaded v2 COCO weights",
    "python tools/eval.py --checkpoint output/tv_v2_coco.pth": "needs COCO val2017 and the converted v2 weights",
    "python tools/convert_dataset.py --from labelme my_photos": OWN_DATA,
    "python tools/convert_dataset.py --from cvat annotations.xml": OWN_DATA,
    "python tools/convert_dataset.py --from yolo my_yolo_dataset": OWN_DATA,
    "python tools/check_dataset.py --ann data/mine/": OWN_DATA,
    "python tools/train.py --config configs/maskrcnn_R50_FPN_finetune.yaml model.weights=output/tv_coco.pth":
        "needs the downloaded COCO weights; " + OWN_DATA,
    "python tools/eval.py --checkpoint output/mine/": OWN_DATA,
    "python tools/infer.py --checkpoint output/mine/": OWN_DATA,
    "python tools/predict_batch.py --input data/shapes/val --checkpoint output/demo/model_final.pth "
    "--output output/rows_ray --engine ray": "starts a Ray instance; tests/test_predict_batch_ray.py runs the Ray "
                                              "engine on a loopback test cluster",
    "ray start": "starts a node of a Ray cluster",
    "python tools/predict_batch.py --input paths.parquet": "needs a Ray cluster and a shared file system",
}


# A command in running text: a code span that starts with a program and gives it arguments (`make setup`,
# `python tools/x.py A B`, `tools/x.py --input y`), not one that only names a tool (`tools/train.py`).
INLINE_COMMAND = r"`((?:python3?|make|pip|torchrun|curl|source|bash|\.venv/bin/\S+|tools/\S+\.py) [^`\n]+)`"


def readme_commands(text: str, inline: bool = False):
    """(kind, command) for each command of the fenced bash blocks (continuation lines joined) and each
    python block of a Markdown page, and with ``inline`` each command in its running text (as bash), in
    page order. Blocks of other kinds (output, plain text) are passed over, code spans inside them too."""
    pattern = r"^```(\w*)\n(.*?)^```" + (f"|{INLINE_COMMAND}" if inline else "")
    for match in re.finditer(pattern, text, flags=re.S | re.M):
        kind, body = match.group(1, 2)
        if body is None:
            yield "bash", match.group(3)
            continue
        if kind == "python":
            yield kind, body
            continue
        if kind != "bash":
            continue
        for command in re.sub(r"\\\n\s*", "", body).splitlines():
            command = re.sub(r"\s+# .*$", "", command).strip()  # a trailing comment explains the command
            if command and not command.startswith("#"):
                yield kind, command


def _matches(command: str, table: dict):
    return next((prefix for prefix in table if command.startswith(prefix)), None)


def linked_pages(page: Path):
    """The Markdown files of this repository that ``page`` links, in order of first link."""
    targets = re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text())
    return list(dict.fromkeys((page.parent / target).resolve().relative_to(REPO).as_posix() for target in targets
                              if "://" not in target))


# Linked page -> the test that runs its commands as written instead (with sizes of its own).
RUN_ELSEWHERE = {"docs/labelling-loop.md": "tests/test_labelling_loop.py"}

PAGES = ["README.md", *linked_pages(REPO / "README.md")]
COMMANDS = list(dict.fromkeys(command for page in PAGES if (REPO / page).is_file() and page not in RUN_ELSEWHERE
                              for command in readme_commands((REPO / page).read_text(), inline=page == "README.md")))


def test_the_readme_links_every_page_and_every_linked_page_exists():
    missing = [page for page in PAGES if not (REPO / page).is_file()]
    assert not missing, f"the README links pages that do not exist: {missing}"
    unlinked = sorted({f"docs/{path.name}" for path in (REPO / "docs").glob("*.md")} - set(PAGES))
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    for page, test in RUN_ELSEWHERE.items():
        assert page in PAGES and (REPO / test).is_file(), (page, test)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the repository's tracked files (modification times kept, so make sees the environment
    as up to date) with the environment linked in, and the reader's own video (``clip.mp4``); a new shell
    there has the environment activated."""
    from test_video import write_clip

    root = tmp_path_factory.mktemp("readme")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    for name in ("setup.cfg", "pyproject.toml"):  # older than the environment: make does not reinstall it
        os.utime(root / name, (0, 0))
    write_clip(root / "clip.mp4")
    return root


def _environment(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PATH"] = f"{root / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(root / ".venv")
    return env


def test_every_command_is_run_or_skipped_for_a_reason():
    assert COMMANDS, "the README has no commands"
    for prefix in [*SHRUNK, *SKIPPED, *SERVICES]:
        assert any(cmd.startswith(prefix) for _, cmd in COMMANDS), f"no documented command starts with {prefix!r}"


def _start_service(command: str, health: str, workdir: Path) -> subprocess.Popen:
    """Start a README service command in the background and wait until ``health`` answers."""
    service = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=workdir, env=_environment(workdir),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise AssertionError(f"README service exited ({service.returncode}):\n{command}\n{service.stdout.read()}")
        try:
            with urllib.request.urlopen(health, timeout=2):
                return service
        except OSError:
            time.sleep(0.5)
    service.kill()
    raise AssertionError(f"README service did not answer {health} within 180 s:\n{command}")


@pytest.mark.slow
def test_readme_commands_run_as_written(workdir):
    ran, skipped, services = [], [], []
    try:
        for kind, command in COMMANDS:
            if kind == "bash" and _matches(command, SKIPPED):
                skipped.append((command, SKIPPED[_matches(command, SKIPPED)]))
                continue
            if kind == "bash" and _matches(command, SERVICES):
                services.append(_start_service(command, SERVICES[_matches(command, SERVICES)], workdir))
                ran.append(command)
                continue
            if kind == "python":
                argv = [sys.executable, "-c", command]
            else:
                shrunk = _matches(command, SHRUNK)
                argv = ["bash", "-c", f"{command} {SHRUNK[shrunk]}" if shrunk else command]
            result = subprocess.run(argv, cwd=workdir, env=_environment(workdir), capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, (f"README command failed ({result.returncode}):\n{command}\n"
                                            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")
            ran.append(command)
    finally:
        for service in services:
            service.terminate()
            service.wait(timeout=30)
    assert ran and skipped
    print(f"ran {len(ran)} README commands; skipped {len(skipped)}:",
          *[f"  {cmd[:70]}: {why}" for cmd, why in skipped], sep="\n")
