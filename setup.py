"""Builds the C runtime with CMake when the package is built, so that an installed EdgeMoE (a
wheel, `pip install .`) carries libedgemoe.so and edgemoe_run in edgemoe/_native/ and never
builds anything at first use; and lists the packages. Everything else about the package is in pyproject.toml."""
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

NATIVE = ("libedgemoe.so", "edgemoe_run")


class BuildWithRuntime(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # a source checkout: the runtime is built under build/runtime on demand
            return
        root = Path(__file__).resolve().parent
        build = root / "build" / "wheel-runtime"
        for cmd in (["cmake", "-S", str(root), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", str(build), "-j", "2", "--target", "edgemoe", "edgemoe_run"]):
            subprocess.run(cmd, check=True)
        out = Path(self.build_lib) / "edgemoe" / "_native"
        out.mkdir(parents=True, exist_ok=True)
        for name in NATIVE:
            shutil.copy2(build / name, out / name)


class BinaryDistribution(Distribution):
    """The wheel holds machine code: tag it for this platform, not as pure Python."""

    def has_ext_modules(self):
        return True


def packages() -> list[str]:
    """The packages pyproject.toml's package-dir maps, with one per model family folder (models/families/*),
    so that adding a family is adding its folder."""
    root = Path(__file__).resolve().parent
    families = sorted(p.parent.name for p in (root / "models" / "families").glob("*/__init__.py"))
    return ["edgemoe", "edgemoe.compiler", "edgemoe.models", "edgemoe.models.families", "edgemoe.models.zoo",
            "edgemoe.targets"] + [f"edgemoe.models.families.{f}" for f in families]


setup(packages=packages(), cmdclass={"build_py": BuildWithRuntime}, distclass=BinaryDistribution)
