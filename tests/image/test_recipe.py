"""Image recipes: the shipped ones load; errors name the file, line and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tdxvm.image.cache import StepCache, step_key
from tdxvm.image.recipe import KERNEL_SUITES, Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["smoke", "llama2", "model-smoke"])
def test_shipped_recipes_load(name):
    loaded = load_recipe(ROOT / "images" / f"{name}.yaml")
    assert loaded.recipe.name == name
    assert "root=/dev/mapper/root" in loaded.recipe.cmdline
    assert loaded.recipe.kernel.suite == "bookworm-backports"  # Linux >= 6.9 measures into RTMR2


@pytest.mark.parametrize(
    ("suite", "kernel_suite"),
    [("bookworm", "bookworm-backports"), ("trixie", "trixie"), ("forky", "forky"), ("sid", "sid")],
)
def test_default_kernel_suite_carries_a_measuring_kernel(tmp_path, suite, kernel_suite):
    """Left out, kernel.suite is where the recipe's suite has Linux >= 6.9, not the suite itself
    (Debian 12's own 6.1 would leave the command line and initrd out of RTMR2)."""
    recipe = load_recipe(_write(tmp_path, f"name: x\nsuite: {suite}\n")).recipe
    assert recipe.kernel.suite == kernel_suite and recipe.kernel_suite == kernel_suite
    assert recipe.kernel.package == "linux-image-cloud-amd64"
    kept = load_recipe(_write(tmp_path, f"name: x\nsuite: {suite}\nkernel:\n  omit_modules: [sound]\n")).recipe
    assert kept.kernel.suite == kernel_suite and kept.kernel.omit_modules == ("sound",)
    assert Recipe(name="x", suite=suite).kernel.suite == kernel_suite  # built in code, too


def test_default_recipe_kernel_is_from_bookworm_backports(tmp_path):
    assert load_recipe(_write(tmp_path, "name: x\n")).recipe.kernel_suite == "bookworm-backports"


def test_explicit_kernel_suite_is_kept(tmp_path):
    recipe = load_recipe(_write(tmp_path, "name: x\nkernel:\n  suite: bookworm\n")).recipe
    assert recipe.kernel_suite == "bookworm"  # loads; the build refuses its 6.1 kernel (test_kernel_floor.py)
    other = load_recipe(_write(tmp_path, "name: x\nsuite: noble\nkernel:\n  suite: noble-proposed\n")).recipe
    assert other.kernel_suite == "noble-proposed"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: x\nsuite: noble\n", "r.yaml:1: kernel: no default kernel suite for suite 'noble'"),
        (
            "name: x\nsuite: bullseye\nkernel:\n  package: linux-image-amd64\n",
            "r.yaml:4: kernel: no default kernel suite for suite 'bullseye'",
        ),
    ],
)
def test_unknown_suite_needs_a_kernel_suite(tmp_path, text, where):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, text))
    assert where in str(err.value) and "set kernel.suite" in str(err.value) and "Linux >= 6.9" in str(err.value)


def test_docs_list_the_default_kernel_suites():
    """docs/images.md and the recipe module say what KERNEL_SUITES says."""
    import tdxvm.image.recipe as recipe_module

    docs = (ROOT / "docs/images.md").read_text()
    for suite, kernel_suite in KERNEL_SUITES.items():
        assert f"`{suite}` → `{kernel_suite}`" in docs or (suite == kernel_suite and f"`{suite}`" in docs), suite
        assert f"``{suite}``" in recipe_module.__doc__, suite


def test_llama2_is_a_model_server():
    recipe = load_recipe(ROOT / "images/llama2.yaml").recipe
    assert recipe.profile == "model-server" and recipe.service_port == 8443
    assert any(r.startswith("torch==") for r in recipe.python.requirements)


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: x\ndisk_size: 2GB\n", "r.yaml:2: disk_size: '2GB' is not a size"),
        ("name: x\npackages: [ok, 'Bad Name']\n", "r.yaml:2: packages: 'Bad Name' is not a Debian package name"),
        ("name: x\nkernel:\n  pakage: linux\n", "r.yaml:3: kernel.pakage: unknown key"),
        ("name: x\nfiles:\n  - src: a\n    dest: etc/x\n", "r.yaml:4: files.0.dest: 'etc/x' must be an absolute path"),
        ("name: x\ncmdline: console=ttyS0\n", "r.yaml:2: cmdline: the command line must name the root device"),
        ("name: x\ncmdline: root=/dev/mapper/root\n", "r.yaml:2: cmdline: the command line must set panic="),
        ("name: x\nprofile: big\n", "r.yaml:2: profile: Input should be 'smoke' or 'model-server'"),
        ("name: X Y\n", "r.yaml:1: name: String should match pattern"),
        ("name: x\ndisk_size: 1MiB\n", "r.yaml:2: disk_size: the disk must be at least 64MiB"),
        ("name: [x\n", "r.yaml:2: not valid YAML"),
    ],
)
def test_recipe_errors_name_file_line_field(tmp_path, text, where):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, text))
    assert where in str(err.value)


def test_missing_file_named(tmp_path):
    with pytest.raises(RecipeError, match=r"files\.0\.src: nothere does not exist"):
        load_recipe(_write(tmp_path, "name: x\nfiles:\n  - {src: nothere, dest: /etc/x}\n"))
    (tmp_path / "adir").mkdir()
    with pytest.raises(RecipeError, match=r"files\.0\.src: adir is a folder; list each file to copy"):
        load_recipe(_write(tmp_path, "name: x\nfiles:\n  - {src: adir, dest: /etc/x}\n"))


def test_an_absurd_disk_size_is_refused_with_its_line(tmp_path):
    with pytest.raises(RecipeError, match=r":2: disk_size: .*99999999999999999999TiB is more than 64TiB"):
        load_recipe(_write(tmp_path, "name: x\ndisk_size: 99999999999999999999TiB\n"))


def test_step_cache_publishes_only_finished_entries(tmp_path):
    cache = StepCache(tmp_path)
    inputs = {"suite": "bookworm", "packages": ["a", "b"]}
    key = step_key("rootfs", inputs)
    assert key != step_key("rootfs", {**inputs, "packages": ["a"]})
    assert key != step_key("python", inputs)
    with pytest.raises(RuntimeError), cache.put("rootfs", key, inputs) as staging:
        (staging / "rootfs.tar").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert cache.get("rootfs", key) is None
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
    with cache.put("rootfs", key, inputs) as staging:
        (staging / "rootfs.tar").write_bytes(b"whole")
    assert (cache.get("rootfs", key) / "rootfs.tar").read_bytes() == b"whole"


def test_every_tdxvm_module_the_guest_imports_ships_with_it():
    """tdxvm/image/configure.GUEST_MODULES is what the image carries: a guest module that
    imports another tdxvm module not in it would fail inside the guest."""
    import ast

    from tdxvm.image.configure import guest_module_files

    shipped = {rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for _, rel in guest_module_files()}
    shipped |= {m.rsplit(".", 1)[0] for m in shipped}  # tdxvm.guest is a namespace package (a folder)

    def imports(tree):  # every import statement, except those only for type checkers
        for node in ast.iter_child_nodes(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            yield node
            yield from imports(node)

    for src, rel in guest_module_files():
        for node in imports(ast.parse(src.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            )
            for name in names:
                if name.startswith("tdxvm"):
                    assert name in shipped, f"{rel} imports {name}, which the guest image does not carry"


def test_recipe_null_and_duplicate_keys_are_refused(tmp_path):
    path = _write(tmp_path, "name: x\nsuite: bookworm\npackages: [curl, ~]\nkernel:\n  omit_modules:\nsuite: sid\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).splitlines()[1:] == [
        f"{path}:3: packages.1: null list item",
        f"{path}:5: kernel.omit_modules: null is not allowed; remove the key to allow any value",
        f"{path}:6: suite: duplicate key (first at line 2)",
    ]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("python:\n  requirements: ['--no-binary=:all:', evilpkg]\n", "is not a requirement like torch==2.13.0"),
        ("python:\n  requirements: ['torch==2.13.0 --index-url http://evil']\n", "is not a requirement"),
        ("security_mirror: '[trusted=yes] http://evil.example/debian-security'\n", "is not a plain http(s) URL"),
        ("mirror: 'http://deb.debian.org/debian main\\ndeb [trusted=yes] http://evil/ x'\n", "is not a plain http(s)"),
        ("files:\n  - {src: /etc/hostname, dest: /etc/x}\n", "must be a path inside the recipe's folder"),
        ("files:\n  - {src: ../../etc/passwd, dest: /etc/x}\n", "must be a path inside the recipe's folder"),
    ],
)
def test_a_recipe_cannot_reach_outside_its_data(tmp_path, text, said):
    """The build runs as root: a recipe's strings are data, never pip or apt options, and its
    files come from its own folder (not the build host's secrets)."""
    with pytest.raises(RecipeError, match=re.escape(said)):
        load_recipe(_write(tmp_path, "name: x\n" + text))


def test_requirements_in_their_usual_forms_are_taken(tmp_path):
    text = (
        "name: x\npython:\n  requirements: [torch==2.13.0+cpu, 'transformers>=4.40,<5', 'uvicorn[standard]', numpy]\n"
    )
    assert load_recipe(_write(tmp_path, text)).recipe.python.requirements[0] == "torch==2.13.0+cpu"
