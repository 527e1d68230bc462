"""Build hook: the installed package carries what its commands need outside a clone.

The repository's top-level ``experiments/`` (the named configs: the files that define ``get_config``)
and ``weights/demo`` (the demo checkpoint) stay the source; ``build_py`` copies them into the wheel as
``cerebrum_jax/_data/experiments`` and ``cerebrum_jax/_data/weights/demo``, which
``cerebrum_jax.shipped`` finds through ``importlib.resources``. Metadata: pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def shipped_files() -> dict[str, Path]:
    """{path under cerebrum_jax/_data: source file} of the configs and the demo weights."""
    files = {}
    for config in sorted((ROOT / "experiments").glob("*.py")):
        if "def get_config" in config.read_text(encoding="utf-8"):
            files[f"experiments/{config.name}"] = config
    for f in sorted((ROOT / "weights" / "demo").rglob("*")):
        if f.is_file():
            files[f"weights/demo/{f.relative_to(ROOT / 'weights' / 'demo').as_posix()}"] = f
    return files


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the repository's own folders
            return
        target = Path(self.build_lib) / "cerebrum_jax" / "_data"
        for name, source in shipped_files().items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / name)


setup(cmdclass={"build_py": BuildPyWithData})
