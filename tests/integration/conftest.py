"""Reference runs several files compare against, each trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_hftk


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The tiny T5 in one process at the global batch of test_parallel's and test_multinode's launches."""
    from tests.integration.test_parallel import BATCH, recipe_file

    tmp_path = tmp_path_factory.mktemp("reference")
    result = run_hftk("finetune", str(recipe_file(tmp_path, "single", 2 * BATCH)))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "single"


@pytest.fixture(scope="session")
def one_process(tmp_path_factory) -> Path:
    """The tiny Llama in one process at the global batch of the tensor-parallel launches."""
    from tests.integration.test_tensor_parallel import GLOBAL_BATCH, recipe_file

    tmp_path = tmp_path_factory.mktemp("one")
    run = run_hftk("finetune", str(recipe_file(tmp_path, "single", GLOBAL_BATCH)))
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path / "single"


@pytest.fixture(scope="session")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 2-process DDP launch of test_interruptions' recipe: what a stopped or restarted
    launch of it must end as."""
    from tests.conftest import accelerate_launch
    from tests.integration.test_interruptions import recipe_path

    tmp_path = tmp_path_factory.mktemp("straight")
    launched = run_hftk("finetune", str(recipe_path(tmp_path, "straight")), launcher=accelerate_launch("ddp.yaml"),
                        env={"ACCELERATE_USE_CPU": "false"})
    assert launched.returncode == 0, launched.stderr[-3000:]
    return tmp_path / "straight"
