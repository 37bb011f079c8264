"""The image recipes cannot drift from the package: same dependencies, matching CUDA, one version.

No Docker daemon or Apptainer is needed: the Dockerfile, the Apptainer definition and
the conda environment are parsed, and the workflow is loaded to see each rule's image.
tests/test_container_image.py builds the image and runs it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from tinystudy import REPO, tiny_study

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]
# Build tooling the Dockerfile may install besides torch and the project.
TOOLS = {"pip"}


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(s) for s in specs]
    return {r.name.lower(): r for r in reqs}


class Dockerfile:
    """Stages of a Dockerfile: instructions with continuations joined, ARG defaults substituted."""

    def __init__(self, text: str) -> None:
        joined = re.sub(r"\\\n", " ", text)
        lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        self.args: dict[str, str] = {}
        self.stages: list[list[tuple[str, str]]] = []
        for line in lines:
            op, _, rest = line.partition(" ")
            op = op.upper()
            if op == "ARG" and "=" in rest:
                name, _, default = rest.partition("=")
                self.args[name.strip()] = default.strip()
            if op == "FROM":
                self.stages.append([])
            if self.stages or op != "ARG":
                self.stages[-1].append((op, self.expand(rest)))

    def expand(self, text: str) -> str:
        """ARG defaults substituted, also inside other defaults (BASE_IMAGE names CUDA_VERSION)."""
        while (expanded := re.sub(r"\$\{(\w+)\}", lambda m: self.args.get(m.group(1), m.group(0)), text)) != text:
            text = expanded
        return text

    def commands(self, stage: list[tuple[str, str]]) -> list[list[str]]:
        """Each shell command of a stage's RUN instructions, split into words."""
        out: list[list[str]] = []
        for op, rest in stage:
            if op == "RUN":
                out.append([])
                for word in shlex.split(rest):
                    if word in ("&&", "||", ";"):
                        out.append([])
                    else:
                        out[-1].append(word.strip("()"))
        return [words for words in out if words]

    def pip_installs(self) -> list[str]:
        """Every requirement or path given to `pip install` in any stage."""
        out = []
        for stage in self.stages:
            for words in self.commands(stage):
                if len(words) < 2 or Path(words[0]).name != "pip" or words[1] != "install":
                    continue
                skip_next = False
                for word in words[2:]:
                    if skip_next:
                        skip_next = False
                    elif word in ("--index-url", "--extra-index-url", "-i", "-c", "-r"):
                        skip_next = True
                    elif not word.startswith("-"):
                        out.append(word)
        return out


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile((REPO / "containers" / "Dockerfile").read_text())


def test_image_installs_exactly_the_project_and_a_pinned_torch(dockerfile: Dockerfile) -> None:
    installs = dockerfile.pip_installs()
    runs = " ".join(rest for stage in dockerfile.stages for op, rest in stage if op == "RUN")
    copied = " ".join(rest for stage in dockerfile.stages for op, rest in stage if op == "COPY")
    assert "pyproject.toml" in copied and "src" in copied
    # the dependencies are pyproject's own list, and nothing else is installed unpinned
    assert re.search(r"tomllib\.load\(open\('/src/pyproject\.toml'.*\['project'\]\['dependencies'\]", runs)
    assert "pip install -r /src/requirements.txt" in runs
    # the project itself: its wheel, built from the copied source, then checked against them
    assert re.search(r"pip wheel .*--no-deps --wheel-dir /wheels /src\b", runs)
    wheels = [s for s in installs if s.endswith("/sar3d-*.whl")]
    assert wheels, "the project itself must be installed (its dependencies come from pyproject)"
    assert "pip check" in runs
    pinned = _requirements([s for s in installs if s not in wheels])
    extra = set(pinned) - TOOLS - {"torch"}
    assert not extra, f"the Dockerfile installs packages outside pyproject.toml: {sorted(extra)}"
    torch = pinned["torch"]
    (spec,) = torch.specifier
    assert spec.operator == "==", f"torch must be pinned in the image, got {torch}"
    declared = _requirements(PYPROJECT["dependencies"])["torch"]
    assert declared.specifier.contains(spec.version), f"image torch {spec.version} outside pyproject's {declared}"
    for name, req in pinned.items():
        assert all(s.operator == "==" for s in req.specifier), f"{name} is installed unpinned: {req}"


def test_torch_wheel_matches_cuda_base_and_the_makefile_pin(dockerfile: Dockerfile) -> None:
    major, minor, *_ = dockerfile.args["CUDA_VERSION"].split(".")
    assert dockerfile.args["TORCH_CUDA"] == f"cu{major}{minor}"
    # offline builds override the index (containers/build-local.sh); users get PyTorch's for that CUDA
    assert dockerfile.expand(dockerfile.args["TORCH_INDEX_URL"]) == f"https://download.pytorch.org/whl/cu{major}{minor}"
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={dockerfile.args['TORCH_VERSION']}" in makefile


def test_final_stage_is_cuda_runtime_without_build_tools_and_not_root(dockerfile: Dockerfile) -> None:
    final = dockerfile.stages[-1]
    base_names = {stage[0][1].split(" AS ")[-1].strip(): stage for stage in dockerfile.stages if " AS " in stage[0][1]}
    chain = [final]
    while chain[-1][0][1].split()[0] in base_names:  # FROM <earlier stage>
        chain.append(base_names[chain[-1][0][1].split()[0]])
    assert re.match(r"nvidia/cuda:\d+\.\d+(\.\d+)?-runtime-ubuntu", chain[-1][0][1]), chain[-1][0]
    installed = {w for stage in chain for words in dockerfile.commands(stage) for w in words}
    assert not installed & {"build-essential", "python3-dev", "gcc", "g++"}
    users = [rest for op, rest in final if op == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_versions_agree_everywhere() -> None:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["container"].endswith(f"/sar3d:{VERSION}")
    definition = (REPO / "containers" / "sar3d.def").read_text()
    assert re.search(rf"^\s*IMAGE=\S+/sar3d:{re.escape(VERSION)}$", definition, re.M)
    assert re.search(r"^From:\s*\{\{\s*IMAGE\s*\}\}", definition, re.M)
    assert re.search(rf"image.version {re.escape(VERSION)}$", definition, re.M)
    dockerfile = Dockerfile((REPO / "containers" / "Dockerfile").read_text())
    assert dockerfile.args["SAR3D_VERSION"] == VERSION


def test_conda_env_lists_exactly_the_package_dependencies() -> None:
    env = yaml.safe_load((REPO / "envs" / "sar3d.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e .." in pip
    listed = {str(Requirement(s)) for s in pip if not s.startswith("-")}
    assert listed == {str(Requirement(s)) for s in PYPROJECT["dependencies"]}
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python.split("=", 1)[1] + ".0")


def _rule_images(workdir: Path, overrides: dict[str, Any]) -> dict[str, str | None]:
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[workdir / "config.yaml"], config=overrides),
            storage_settings=StorageSettings(),
            workdir=workdir,
            snakefile=REPO / "Snakefile",
        )
        # Parsing the Snakefile is what applies the global `container:`; there is no
        # public accessor for a rule's image, so read the parsed workflow's rules.
        return {rule.name: rule.container_img for rule in workflow._workflow.rules}


def test_every_rule_runs_in_the_configured_image_or_none(tmp_path: Path) -> None:
    config = tiny_study(Path("results"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    images = _rule_images(tmp_path, {})
    assert {"tracking_init", "pretrain", "finetune", "evaluate"} <= set(images)
    assert set(images.values()) == {config["container"]}, images
    images = _rule_images(tmp_path, {"container": None})
    assert set(images.values()) == {None}, images
