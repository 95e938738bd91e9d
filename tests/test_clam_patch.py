"""patches/ and `clam-mcmkd patch-clam`, without a CLAM checkout.

The scratch "CLAM" each test patches is built from the patches' own pre-image lines (context and
removed lines) at their hunk line numbers, with unique filler lines in between, so the patches
meet exactly the text they were made against, wherever it sits in the real files.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from clam_mcmkd.clam import patch as clam_patch
from clam_mcmkd.clam.formats import ClamFormatError
from clam_mcmkd.clam.patch import (
    APPLIED,
    APPLIES,
    CONFLICT,
    PatchError,
    load_patches,
    parse_patch,
    patch_clam,
)
from clam_mcmkd.clam_compat import CLAM_TASKS, ClamTaskError, clam_task, get_clam_encoder
from clam_mcmkd.cli import main

REPO = Path(__file__).resolve().parents[1]
PATCHES_DIR = REPO / "patches"
PATCHED_FILES = {
    "models/builder.py",
    "utils/constants.py",
    "extract_features_fp.py",
    "main.py",
    "create_splits_seq.py",
    "eval.py",
}


@pytest.fixture(scope="module")
def patches():
    return load_patches(PATCHES_DIR)


def build_scratch_clam(root: Path, patches) -> Path:
    """Write each patched file as the hunks' pre-images placed at their line numbers."""
    for patch in patches:
        for fp in patch.files:
            lines: list[str] = []
            for hunk in fp.hunks:
                while len(lines) < hunk.old_start - 1:
                    lines.append(f"# filler {fp.path} line {len(lines) + 1}\n")
                lines += hunk.image(new=False)
            if lines[-1].endswith("\n"):
                lines.append(f"# filler {fp.path} tail\n")
            target = root / fp.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes("".join(lines).encode())
    (root / "main.py").chmod(0o755)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def scratch(tmp_path, patches) -> Path:
    return build_scratch_clam(tmp_path / "CLAM", patches)


# ----------------------------------------------------------------------------- the patch files


def test_patch_files_parse_and_cover_the_issue(patches):
    assert len(patches) >= 3
    assert {p for patch in patches for p in patch.paths} == PATCHED_FILES
    for patch in patches:
        assert patch.description, f"{patch.name} has no description"
        for fp in patch.files:
            for hunk in fp.hunks:
                assert len(hunk.image(new=False)) == hunk.old_len
                assert len(hunk.image(new=True)) == hunk.new_len
    added = {
        fp.path: "".join(t for h in fp.hunks for tag, t in h.lines if tag == "+")
        for patch in patches
        for fp in patch.files
    }
    assert "mcmkd_resnet50" in added["models/builder.py"]
    assert "MCMKD_CKPT_PATH" in added["models/builder.py"]
    assert "get_clam_encoder" in added["models/builder.py"]
    for path in ("models/builder.py", "extract_features_fp.py"):  # every clam-mcmkd encoder
        assert "clam_mcmkd_encoders()" in added[path], path
    assert "mcmkd_resnet50" in added["utils/constants.py"]
    assert "mcmkd_resnet50" in added["extract_features_fp.py"]
    for script in ("main.py", "eval.py", "create_splits_seq.py"):
        for word in ("camelyon16", "tcga_nsclc", "--csv_path", "clam_task"):
            assert word in added[script], (script, word)


def test_parser_keeps_missing_final_newline(patches):
    constants = next(fp for p in patches for fp in p.files if fp.path == "utils/constants.py")
    last = constants.hunks[-1]
    assert not last.image(new=False)[-1].endswith("\n")
    assert not last.image(new=True)[-1].endswith("\n")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("just words\n", "not a unified diff"),
        ("--- a/x.py\n+++ b/x.py\n@@ -1,3 +1,3 @@\n a\n-b\n+c\n", "ends early"),
        ("--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n a\n+b\n", "longer than its header"),
        ("--- /dev/null\n+++ b/x.py\n@@ -0,0 +1 @@\n+a\n", "only in-place edits"),
        ("--- a/x.py\n+++ b/x.py\n@@ nonsense @@\n", "malformed hunk header"),
        ("--- a/../x.py\n+++ b/../x.py\n@@ -1 +1 @@\n-a\n+b\n", "leaves the CLAM directory"),
    ],
)
def test_parser_rejects_broken_diffs(text, problem):
    with pytest.raises(PatchError, match=problem):
        parse_patch(text, "broken.patch")


def test_two_patches_on_one_file_are_refused(tmp_path):
    for name in ("a.patch", "b.patch"):
        (tmp_path / name).write_text("--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n")
    with pytest.raises(PatchError, match="both change x.py"):
        load_patches(tmp_path)


def test_patches_dir_from_environment(tmp_path, monkeypatch):
    shutil.copytree(PATCHES_DIR, tmp_path / "p")
    monkeypatch.setenv(clam_patch.PATCHES_DIR_ENV, str(tmp_path / "p"))
    assert clam_patch.default_patches_dir() == tmp_path / "p"
    monkeypatch.delenv(clam_patch.PATCHES_DIR_ENV)
    assert clam_patch.default_patches_dir() == PATCHES_DIR


# ----------------------------------------------------------------------------- apply / check / revert


def test_check_apply_idempotent_revert_round_trip(scratch, patches):
    before = snapshot(scratch)
    check = patch_clam(scratch, "check", PATCHES_DIR)
    assert [s.state for s in check.states] == [APPLIES] * len(patches)
    assert snapshot(scratch) == before

    run = patch_clam(scratch, "apply", PATCHES_DIR)
    assert sorted(run.changed) == sorted(PATCHED_FILES)
    patched = snapshot(scratch)
    for patch in patches:
        for fp in patch.files:
            text = patched[fp.path].decode()
            for hunk in fp.hunks:
                assert "".join(hunk.image(new=True)) in text
    assert (scratch / "main.py").stat().st_mode & stat.S_IXUSR, "file mode lost"
    assert not [p for p in scratch.rglob("*.tmp")], "staging files left behind"

    again = patch_clam(scratch, "apply", PATCHES_DIR)
    assert again.changed == []
    assert "nothing changed" in again.lines()[-1]
    assert snapshot(scratch) == patched
    assert [s.state for s in patch_clam(scratch, "check", PATCHES_DIR).states] == [APPLIED] * len(
        patches
    )

    reverted = patch_clam(scratch, "revert", PATCHES_DIR)
    assert sorted(reverted.changed) == sorted(PATCHED_FILES)
    assert snapshot(scratch) == before
    assert patch_clam(scratch, "revert", PATCHES_DIR).changed == []
    assert snapshot(scratch) == before


def test_cli_patch_clam(scratch):
    runner = CliRunner()
    before = snapshot(scratch)
    args = ["patch-clam", str(scratch), "--patches-dir", str(PATCHES_DIR)]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "applied now" in first.output
    second = runner.invoke(main, args)
    assert second.exit_code == 0 and "nothing changed" in second.output
    check = runner.invoke(main, [*args, "--check"])
    assert check.exit_code == 0 and "3/3 patches applied" in check.output
    revert = runner.invoke(main, [*args, "--revert"])
    assert revert.exit_code == 0 and "reverted" in revert.output
    assert snapshot(scratch) == before


def test_shifted_lines_still_apply_and_revert(scratch):
    main_py = scratch / "main.py"
    main_py.write_text("# a local note\n# and another\n" + main_py.read_text())
    before = snapshot(scratch)
    patch_clam(scratch, "apply", PATCHES_DIR)
    assert "camelyon16" in main_py.read_text()
    patch_clam(scratch, "revert", PATCHES_DIR)
    assert snapshot(scratch) == before


@pytest.mark.parametrize("make_dir", ["empty", "missing", "file"])
def test_refuses_a_directory_that_is_not_clam(tmp_path, make_dir):
    target = tmp_path / "not_clam"
    if make_dir == "empty":
        target.mkdir()
        (target / "main.py").write_text("print('hello')\n")
    elif make_dir == "file":
        target.write_text("x")
    result = CliRunner().invoke(main, ["patch-clam", str(target)])
    assert result.exit_code != 0
    message = result.output.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("Error:"), result.output
    assert str(target) in message[0]
    if make_dir == "empty":
        assert "not a CLAM checkout" in message[0] and "models/builder.py" in message[0]
        assert (target / "main.py").read_text() == "print('hello')\n"


def test_refuses_a_clam_that_differs_and_changes_nothing(scratch, patches):
    main_py = scratch / "main.py"
    text = main_py.read_text()
    assert "'task_2_tumor_subtyping'])" in text
    main_py.write_text(text.replace("'task_2_tumor_subtyping'])", "'task_2_subtypes'])"))
    before = snapshot(scratch)
    states = patch_clam(scratch, "check", PATCHES_DIR).states
    assert [s.state for s in states].count(CONFLICT) == 1
    conflict = next(s for s in states if s.state == CONFLICT)
    assert "main.py" in conflict.detail and "hunk" in conflict.detail

    # The other patches would apply, but nothing is written while one conflicts.
    with pytest.raises(PatchError, match="main.py differs"):
        patch_clam(scratch, "apply", PATCHES_DIR)
    assert snapshot(scratch) == before
    result = CliRunner().invoke(main, ["patch-clam", str(scratch), "--check"])
    assert result.exit_code != 0 and "conflict" in result.output
    assert snapshot(scratch) == before


def test_partly_applied_patch_is_a_conflict(scratch):
    original_eval = (scratch / "eval.py").read_bytes()
    patch_clam(scratch, "apply", PATCHES_DIR)
    (scratch / "eval.py").write_bytes(original_eval)
    states = {s.patch.name: s for s in patch_clam(scratch, "check", PATCHES_DIR).states}
    tasks = next(s for name, s in states.items() if "camelyon16" in name)
    assert tasks.state == CONFLICT and "partly applied" in tasks.detail
    with pytest.raises(PatchError, match="partly applied"):
        patch_clam(scratch, "revert", PATCHES_DIR)


def test_a_failed_rename_rolls_back_the_files_already_replaced(scratch, monkeypatch):
    # Fault injection: the third rename fails (a full disk, a killed process).
    before = snapshot(scratch)
    real_replace = clam_patch.os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(clam_patch.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        patch_clam(scratch, "apply", PATCHES_DIR)
    assert snapshot(scratch) == before
    assert not [p for p in scratch.rglob("*.tmp")]


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_apply_agrees(scratch):
    patch_files = [str(p) for p in sorted(PATCHES_DIR.glob("*.patch"))]
    git = ["git", "apply", "--check"]
    subprocess.run([*git, *patch_files], cwd=scratch, check=True, capture_output=True)
    patch_clam(scratch, "apply", PATCHES_DIR)
    subprocess.run([*git, "-R", *patch_files], cwd=scratch, check=True, capture_output=True)


# ----------------------------------------------------------------------------- clam_compat


def test_get_clam_encoder_loads_the_checkpoint_from_the_environment(tmp_path, monkeypatch):
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms as tv

    from clam_mcmkd.encoders import (
        EncoderError,
        PatchTransforms,
        TimmCNNEncoder,
        save_student_checkpoint,
    )

    torch.manual_seed(3)
    student = TimmCNNEncoder("resnet18.tv_in1k", pretrained=False).eval()
    ckpt = save_student_checkpoint(
        tmp_path / "student.pt", student, arch="resnet18_trunc", transforms=PatchTransforms(64)
    )
    monkeypatch.delenv("MCMKD_CKPT_PATH", raising=False)
    with pytest.raises(EncoderError, match="MCMKD_CKPT_PATH"):
        get_clam_encoder("mcmkd_resnet50")
    monkeypatch.setenv("MCMKD_CKPT_PATH", str(ckpt))

    model, img_transforms = get_clam_encoder("mcmkd_resnet50", target_img_size=224)
    assert isinstance(img_transforms, tv.Compose)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    x = img_transforms(image).unsqueeze(0)
    assert x.shape == (1, 3, 64, 64)  # the checkpoint's input size wins
    assert torch.allclose(x[0], PatchTransforms(64)(image))
    with torch.no_grad():
        feats = model(x)
        expected = student(x)
    assert feats.shape == (1, 256)
    assert not model.training
    assert torch.allclose(feats, expected, atol=1e-5)


def write_task_csv(path: Path, labels: list[str]) -> Path:
    rows = ["case_id,slide_id,label"] + [f"p{i},s{i},{lab}" for i, lab in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_clam_task_from_arguments_and_environment(tmp_path, monkeypatch):
    csv = write_task_csv(tmp_path / "c16.csv", ["normal", "tumor", "tumor"])
    (tmp_path / "feats" / "pt_files").mkdir(parents=True)
    task = clam_task("camelyon16", csv_path=csv, data_root_dir=tmp_path / "feats")
    assert task.label_dict == CLAM_TASKS["camelyon16"] and task.n_classes == 2
    assert task.data_dir == str(tmp_path / "feats")

    nsclc = write_task_csv(tmp_path / "nsclc.csv", ["LUAD", "LUSC"])
    monkeypatch.setenv("CLAM_MCMKD_CSV", str(nsclc))
    monkeypatch.setenv("CLAM_MCMKD_FEAT_DIR", str(tmp_path / "feats"))
    from_env = clam_task("tcga_nsclc")
    assert from_env.csv_path == str(nsclc) and from_env.label_dict == {"LUAD": 0, "LUSC": 1}
    assert clam_task("tcga_nsclc", need_features=False).data_dir is None


def test_clam_task_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("CLAM_MCMKD_CSV", raising=False)
    monkeypatch.delenv("CLAM_MCMKD_FEAT_DIR", raising=False)
    with pytest.raises(ClamTaskError, match="CLAM_MCMKD_CSV"):
        clam_task("camelyon16")
    with pytest.raises(ClamTaskError, match="unknown task"):
        clam_task("task_3")
    csv = write_task_csv(tmp_path / "c16.csv", ["normal", "LUAD"])
    with pytest.raises(ClamFormatError, match=r"c16.csv.*LUAD"):
        clam_task("camelyon16", csv_path=csv, need_features=False)
    good = write_task_csv(tmp_path / "ok.csv", ["normal", "tumor"])
    with pytest.raises(ClamTaskError, match="--data_root_dir"):
        clam_task("camelyon16", csv_path=good)
    with pytest.raises(ClamTaskError, match="no pt_files"):
        clam_task("camelyon16", csv_path=good, data_root_dir=tmp_path)


def test_patch_clam_says_when_pandas_will_break_clams_main(scratch, monkeypatch):
    from importlib.metadata import version

    from clam_mcmkd.clam import patch as clam_patch

    assert clam_patch.installed_pandas() == version("pandas")
    assert clam_patch.pandas_warning("2.2.3") is None and clam_patch.pandas_warning(None) is None
    line = clam_patch.pandas_warning("3.0.1")
    assert "\n" not in line and "pandas 3.0.1" in line and "main.py" in line
    assert "pip install 'pandas<3'" in line and "future.infer_string" in line
    args = ["patch-clam", str(scratch), "--patches-dir", str(PATCHES_DIR)]
    monkeypatch.setattr(clam_patch, "installed_pandas", lambda: "3.0.1")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and line in result.output
    monkeypatch.setattr(clam_patch, "installed_pandas", lambda: "2.2.3")
    result = CliRunner().invoke(main, [*args, "--check"])
    assert result.exit_code == 0 and "pandas" not in result.output
