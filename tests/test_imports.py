"""The import layers (core <- pretrain | finetune | detection | segmentation <- tools), as `make test` checks them
with import-linter's layers contract from pyproject.toml."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = str(Path(sys.executable).with_name("lint-imports"))


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=cwd, capture_output=True, text=True
    )


def test_the_suite_keeps_its_layers():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_the_contract_catches_upward_and_sideways_imports(tmp_path):
    # the suite's six packages, empty, plus one import of each forbidden kind
    for pkg in ("core", "pretrain", "finetune", "detection", "segmentation", "tools"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "core" / "vit.py").write_text("import pretrain.model\n")  # core importing a task
    (tmp_path / "pretrain" / "model.py").write_text("")
    (tmp_path / "segmentation" / "model.py").write_text("from tools import table\n")  # a task importing tools
    (tmp_path / "tools" / "table.py").write_text("")
    (tmp_path / "finetune" / "model.py").write_text("import detection\n")  # a task importing another task
    (tmp_path / "tools" / "convert.py").write_text("import core, pretrain, finetune\n")  # allowed: downward
    proc = lint(tmp_path)
    assert proc.returncode != 0 and "0 kept, 1 broken" in proc.stdout, proc.stdout[-3000:]
    for broken in ("core.vit -> pretrain.model", "segmentation.model -> tools.table", "finetune.model -> detection"):
        assert broken in proc.stdout, broken
    assert "tools.convert" not in proc.stdout
