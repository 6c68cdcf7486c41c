"""Build hook: ship the top-level model_card.md (the one source of the card template) inside the package.

Everything else about the package is in pyproject.toml. An installed hf_txl finds the template at
``hf_txl/training/model_card.md``;
a source checkout reads the top-level file (``hf_txl.training.model_card.TEMPLATE_PATH``).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithModelCard(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "hf_txl" / "training" / "model_card.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).parent / "model_card.md", target)


setup(cmdclass={"build_py": BuildPyWithModelCard})
