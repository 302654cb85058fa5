"""Every command and Python snippet of README.md and docs/*.md runs (issue 30), so the docs cannot
drift from the code.

The fenced ```bash and ```python blocks are extracted in document order (README first) and run in
one workspace holding the checkout's configs/ and data/, with tiny settings: training on
configs/demo.yaml gets TINY (a random tiny CLIP, 24 images a split, one epoch), placeholder paths
are mapped to tiny data trees (PLACEHOLDERS), and SKIPPED lists, with the reason, each command that
needs what a test cannot have (real datasets, CLIP weights, the network, torchrun). A skipped
``capnet`` command is still parsed, so its flags must exist.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import _write_jpeg, write_folder_tree
import capnet
from capnet.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Appended to every `capnet train|demo` on configs/demo.yaml (and to the README's train_run snippet).
TINY = ["model.backbone=clip_tiny_vit.random", "data.subset=24", "train.epochs=1", "model.gcn.hidden=16"]

SKIPPED: Dict[str, str] = {  # command as written (comments dropped) -> why it cannot run in a test
    'pip install -e ".[offline]"': "installs packages (the test runs inside that installation)",
    'pip install -e ".[test]"': "installs packages (the test runs inside that installation)",
    "python -m pytest -q": "the test suite itself (this file is part of it)",
    "capnet train --config configs/voc_lt_vit_b16.yaml --set data.root=/data/VOCdevkit "
    "--set model.weights=/weights/ViT-B-16.pt --out runs/voc_vit": "needs PASCAL VOC and the ViT-B/16 weights",
    "capnet eval --run runs/voc_vit --data-dir /data/VOCdevkit --reader voc --split-dir data/splits/voc_lt":
        "needs PASCAL VOC and the run trained on it",
    "capnet predict --run copied/voc_vit --weights /models/ViT-B-16.pt img.jpg": "needs the ViT-B/16 weights and run",
    "torchrun --nproc_per_node 4 -m capnet train --config configs/coco_lt_rn50.yaml --out runs/coco":
        "needs torchrun with 4 processes and COCO",
    "CAPNET_CACHE=/tmp/ovcache python benchmarks/open_vocab.py --seeds 0 1 2":
        "a benchmark: six demo trainings on all 3,426 bundled images (tens of minutes on 2 cores)",
    "capnet data lt-split /data/nus_wide --reader nus_wide --max-count 1200 --seed 0 --out data/splits/nus_wide_lt":
        "needs NUS-WIDE (and writes into the checkout's data/splits)",
    "capnet data lt-split datasets/nus_wide --reader nus_wide --max-count 1200 --seed 0 --out data/splits/nus_wide_lt":
        "needs NUS-WIDE (and writes into the checkout's data/splits)",
    "capnet train --config configs/nus_wide_vit_b16.yaml --set data.root=datasets/nus_wide --out runs/nus":
        "needs NUS-WIDE and the ViT-B/16 weights",
    "capnet reproduce main --data-root /data --weights rn50=/weights/RN50.pt --weights vit_b16=/weights/ViT-B-16.pt "
    "--out runs/main": "needs VOC, COCO and the CLIP weights (a paper table)",
    'capnet reproduce ablation --data-root /data --out runs/ablation --rows "voc_lt.vit_b16.*"':
        "needs PASCAL VOC and the ViT-B/16 weights (a paper table)",
    'capnet reproduce peft --data-root /data --out runs/peft --set "*.vit_b16.*:data.batch_size=64"':
        "needs the datasets and the ViT-B/16 weights (a paper table)",
    "export HF_HUB_CACHE=/tmp/capnet-hub": "prepares downloads (network)",
    "hf download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors": "a download (network)",
    "hf download laion/CLIP-ViT-B-16-laion2B-s34B-b88K open_clip_model.safetensors": "a download (network)",
    "rsync -a /tmp/capnet-hub/ offline-host:/data/hf-hub/": "copies to another machine",
    "capnet predict --run runs/voc_vit --weights /models/ViT-B-16.pt img.jpg": "needs the ViT-B/16 weights and run",
    "capnet eval --run runs/voc_vit --weights /models/ViT-B-16.pt --data-dir /data/VOCdevkit --reader voc":
        "needs PASCAL VOC, the ViT-B/16 weights and run",
    "CAPNET_WEIGHTS_DIR=/models capnet export --run runs/voc_vit --format onnx --out voc_vit.onnx":
        "needs the ViT-B/16 weights and run",
}

# Placeholder paths of the docs -> what stands for them in the workspace (made by _workspace).
PLACEHOLDERS = {
    "path/to/mydata": "tiny_folder", "path/to/newdata": "tiny_voc_classes", "/data/coco": "tiny_coco",
    "path/to/image.jpg": "photo.jpg", "path/to/folder/": "photos/", "path/to/mydata_lt": "tiny_folder_lt",
}
FRESH_OUTPUTS = {"tiny_folder_lt"}  # outputs a documented command refuses to overwrite (two docs run it)
PYTHON_EDITS = {  # snippet text -> what runs instead (tiny settings for a training snippet)
    '["train.epochs=5"]': repr(["train.epochs=2", *[t for t in TINY if not t.startswith("train.epochs")]]),
}


def _blocks() -> List[Tuple[str, str, str]]:
    """(where, language, code) of every fenced bash / python block, README first."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.S | re.M):
            line = text[:m.start()].count("\n") + 1
            out.append((f"{doc.relative_to(REPO)}:{line}", m.group(1), m.group(2)))
    return out


def _commands(code: str) -> List[str]:
    """Shell commands of a bash block: continuations joined, comments dropped, `&&` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(shlex.join(words[:cut]).replace("'", '"'))
            words = words[cut + 1:]
    return commands


# Snippets that load the real offline backbone (EfficientNet-Lite0 + MiniLM: a minute on 2 cores): `slow`.
SLOW_NAMES = ("efficientnet_lite0_minilm.offline", "efficientnet_lite2_minilm.offline", "vgg19_minilm.offline")

CASES = []
for _where, _lang, _code in _blocks():
    if _lang == "python":
        marks = [pytest.mark.slow] if any(n in _code for n in SLOW_NAMES) else []
        CASES.append(pytest.param("python", _code, id=f"{_where} python", marks=marks))
    else:
        CASES += [pytest.param("bash", c, id=f"{_where} {c[:60]}") for c in _commands(_code)]


def _coco_val(root: Path) -> Path:
    """A COCO root with val2017 only, in COCO's class names (motorcycle, couch, tv: the README's class map)."""
    import json

    cats = [{"id": 1, "name": "person"}, {"id": 4, "name": "motorcycle"}, {"id": 18, "name": "dog"},
            {"id": 63, "name": "couch"}, {"id": 72, "name": "tv"}]
    anns = [(139, 1), (139, 63), (285, 4), (632, 72), (632, 1), (724, 18), (724, 63)]
    images = sorted({i for i, _ in anns})
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "categories": cats, "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in images],
        "annotations": [{"image_id": i, "category_id": c, "iscrowd": 0} for i, c in anns]}))
    for k, i in enumerate(images):
        _write_jpeg(root / "val2017" / f"{i:012d}.jpg", seed=k, size=40)
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/ and data/ of the checkout, tiny data trees for the placeholders, images to predict."""
    ws = tmp_path_factory.mktemp("docs")
    for name in ("configs", "data", "benchmarks"):
        (ws / name).symlink_to(REPO / name)
    write_folder_tree(ws / "tiny_folder")
    voc_rows = {"test": [("0101", "dog"), ("0102", "cat person"), ("0103", "person dog"), ("0104", "cat")]}
    write_folder_tree(ws / "tiny_voc_classes", voc_rows, ["cat", "dog", "person"])
    _coco_val(ws / "tiny_coco")
    _write_jpeg(ws / "photo.jpg", seed=3, size=40)
    for k in range(3):
        _write_jpeg(ws / "photos" / f"p{k}.jpg", seed=k, size=40)
    return ws


@pytest.fixture
def in_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("CAPNET_CACHE", str(workspace / ".cache"))
    if not (workspace / "runs" / "demo" / "metrics.json").is_file():  # what the later commands use
        assert main(["train", "--config", "configs/demo.yaml", "--out", "runs/demo", *_sets(TINY)]) == 0
    return workspace


def _sets(items: List[str]) -> List[str]:
    return [a for item in items for a in ("--set", item)]


def _tiny(argv: List[str]) -> List[str]:
    """Placeholders replaced; tiny settings for a training on the demo config."""
    argv = [PLACEHOLDERS.get(a, a) for a in argv]
    trains_demo = argv[:1] == ["demo"] or (argv[:1] == ["train"] and "configs/demo.yaml" in argv)
    return argv + _sets(TINY) if trains_demo else argv


def _python_env(workspace: Path) -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(capnet.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
            "CAPNET_CACHE": str(workspace / ".cache")}


@pytest.mark.parametrize("lang, code", CASES)
def test_documented_command_runs(lang: str, code: str, in_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if lang == "python":
        for old, new in PYTHON_EDITS.items():
            code = code.replace(old, new)
        done = subprocess.run([sys.executable, "-c", code], cwd=in_workspace, env=_python_env(in_workspace),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    words = shlex.split(code)
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if code in SKIPPED:
        if words[:1] == ["capnet"]:
            build_parser().parse_args(words[1:])  # still spelt right
        pytest.skip(SKIPPED[code])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if words[:1] == ["capnet"]:
        argv = _tiny(words[1:])
        for fresh in FRESH_OUTPUTS.intersection(argv):  # written by the command: as on a first run
            shutil.rmtree(in_workspace / fresh, ignore_errors=True)
        assert main(argv) == 0
    elif words[:1] == ["python"]:
        done = subprocess.run([sys.executable, *words[1:]], cwd=in_workspace, env=_python_env(in_workspace),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        pytest.fail(f"no way to run {code!r} in a test: run it, or list it in SKIPPED with the reason")


def test_every_skipped_command_is_still_in_the_docs() -> None:
    documented = {c for _, lang, code in _blocks() if lang == "bash" for c in _commands(code)}
    assert not set(SKIPPED) - documented, "SKIPPED lists commands the docs no longer have"
