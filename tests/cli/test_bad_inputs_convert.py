"""`dsv3 convert` never destroys data: outputs that hold, lie in or are not checkpoints are
refused before any work, replacement is atomic, SIGTERM cleans up, killed runs' leftovers are found,
and only the regular files a checkpoint needs are copied, links leaving the source refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dsv3.checkpoint.write
from dsv3.api import TINY_CHECKPOINT
from dsv3.convert import convert_checkpoint
from dsv3.errors import CheckpointError, Dsv3Error, Terminated

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3", "convert", *args, "--quiet"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path) -> Path:
    """A copy of the tiny FP8 checkpoint in tmp/models/tiny, with a sibling that must survive."""
    models = tmp_path / "models"
    shutil.copytree(TINY_CHECKPOINT, models / "tiny")
    (models / "other-model").mkdir()
    (models / "other-model" / "notes.txt").write_text("keep me")
    return models / "tiny"


def test_output_that_contains_the_source_is_refused_and_nothing_is_deleted(source):
    before = snapshot(source.parent)
    result = convert_cli(str(source), str(source.parent), "--overwrite")
    assert_refused(result, "the output contains the source checkpoint")
    assert snapshot(source.parent) == before


def test_output_inside_the_source_is_refused(source):
    result = convert_cli(str(source), str(source / "bf16"))
    assert_refused(result, "lies inside the source checkpoint")
    assert not (source / "bf16").exists()


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(source):
    other = source.parent / "other-model"
    result = convert_cli(str(source), str(other), "--overwrite")
    assert_refused(result, "not empty and not a checkpoint", "--overwrite replaces only a checkpoint directory")
    assert (other / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_checkpoint_and_leaves_no_temporary_directories(source, tmp_path):
    out = tmp_path / "bf16"
    convert_checkpoint(source, out, progress=False)
    (out / "model-00009-of-00009.safetensors").write_text("a stale shard of an earlier checkpoint")
    convert_checkpoint(source, out, overwrite=True, progress=False)
    assert not (out / "model-00009-of-00009.safetensors").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "models"]


def test_overwrite_refuses_a_checkpoint_directory_holding_anything_else(source, tmp_path):
    out = tmp_path / "bf16"
    convert_checkpoint(source, out, progress=False)
    (out / "notes.txt").write_text("eval results")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (out / "README.md").write_text("ours; the source has no README")
    before = snapshot(out)
    result = convert_cli(str(source), str(out), "--overwrite")
    assert_refused(result, "holds .git, README.md, notes.txt, which a converted checkpoint does not")
    assert snapshot(out) == before


def test_a_signal_during_the_final_cleanup_does_not_fail_a_complete_result(source, tmp_path, monkeypatch):
    out = tmp_path / "bf16"
    convert_checkpoint(source, out, progress=False)
    real_rmtree = shutil.rmtree

    def rmtree_interrupted(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the old checkpoint is being deleted
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(dsv3.checkpoint.write.shutil, "rmtree", rmtree_interrupted)
    convert_checkpoint(source, out, overwrite=True, progress=False)  # returns: the result is whole
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "models"]  # no half-deleted copy aside


def test_replace_puts_the_old_checkpoint_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    target, new = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old").write_text("old checkpoint")
    new.mkdir()
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src) == new:
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(dsv3.checkpoint.write.os, "rename", rename)
    with pytest.raises(OSError):
        dsv3.checkpoint.write._replace(new, target)
    assert calls[0] == ("out", "out") and calls[1] == ("new", "out")  # aside first, then the new one in
    assert (target / "old").read_text() == "old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_sigterm_removes_the_partial_output(source, tmp_path):
    """A real SIGTERM in the middle of the conversion: exit 143, one line, nothing left behind."""
    out = tmp_path / "bf16"
    code = textwrap.dedent(f"""
        import os, signal, sys
        import dsv3.convert
        from dsv3.cli import main
        real, seen = dsv3.convert._convert, []
        def convert(*args):
            seen.append(1)
            if len(seen) == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args)
        dsv3.convert._convert = convert
        sys.exit(main(["convert", {str(source)!r}, {str(out)!r}, "--quiet", "--max-shard-size", "0.0001"]))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip() == "dsv3: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_sigterm_handler_is_restored_after_the_write(source, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    convert_checkpoint(source, tmp_path / "bf16", progress=False)
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(Terminated):
        with dsv3.checkpoint.write.atomic_directory(tmp_path / "again"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again.*"))


def test_a_killed_runs_partial_directory_is_removed(source, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    stale = tmp_path / f".bf16.partial-{finished.stdout.strip()}-abc123"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"half written")
    convert_checkpoint(source, tmp_path / "bf16", progress=False)
    assert not stale.exists() and (tmp_path / "bf16" / "config.json").is_file()


def test_a_live_writer_is_named_not_removed(source, tmp_path):
    live = tmp_path / f".bf16.partial-{os.getppid()}-abc123"  # pytest's parent: alive, and not this process
    live.mkdir()
    with pytest.raises(Dsv3Error, match=f"process {os.getppid()} is writing it"):
        convert_checkpoint(source, tmp_path / "bf16", progress=False)
    assert live.exists() and not (tmp_path / "bf16").exists()


def test_a_checkpoint_set_aside_by_a_killed_replace_is_named(source, tmp_path):
    aside = tmp_path / ".bf16.old-4242-xyz"
    aside.mkdir()
    with pytest.raises(Dsv3Error, match="set aside by a run killed while replacing it.*move it back"):
        convert_checkpoint(source, tmp_path / "bf16", progress=False)
    assert aside.exists()


def test_link_leaving_the_source_is_refused(source, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"key": "private"}')
    (source / "tokenizer_config.json").unlink()
    (source / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="outside the source checkpoint; refusing to follow it"):
        convert_checkpoint(source, tmp_path / "bf16", progress=False)
    assert not (tmp_path / "bf16").exists()


def test_only_needed_regular_files_are_copied_with_their_permissions(source, tmp_path):
    (source / "generation_config.json").chmod(0o600)
    (source / ".env").write_text("TOKEN=private")
    (source / "notes.txt").write_text("not part of a checkpoint")
    os.mkfifo(source / "modeling_deepseek.py")  # a FIFO is never opened
    (source / "configuration_deepseek.py").write_text("# model code")
    (source / "inside").mkdir()
    (source / "README.md").symlink_to(source / "inside" / "readme")  # a link inside the source is fine
    (source / "inside" / "readme").write_text("readme")
    out = convert_checkpoint(source, tmp_path / "bf16", progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "configuration_deepseek.py", "generation_config.json",
                     "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert (out / "generation_config.json").stat().st_mode & 0o777 == 0o600
    assert not (out / "README.md").is_symlink() and (out / "README.md").read_text() == "readme"


def test_hugging_face_cache_links_into_blobs_are_followed(tmp_path):
    repo = tmp_path / "hub" / "models--deepseek-ai--tiny"
    snapshot_dir, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot_dir.mkdir(parents=True)
    blobs.mkdir()
    for file in TINY_CHECKPOINT.iterdir():
        shutil.copy(file, blobs / f"blob-{file.name}")
        (snapshot_dir / file.name).symlink_to(Path("../../blobs") / f"blob-{file.name}")
    out = convert_checkpoint(snapshot_dir, tmp_path / "bf16", progress=False)
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").is_symlink()
