"""Issue "hardened", findings 2 and 9: outputs never replace inputs or foreign files; writes are atomic.

Every command checks its outputs before doing any work (memprof.files.check_output): an output that is one
of its inputs is refused even with --force, an existing file memprof did not write is refused without
--force. Writes keep the target's mode, follow symlinks and leave no temporary file behind.
"""

import errno
import os
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner

import memprof
from memprof import files, plots
from memprof.cli import main

SCRIPT = ("import torch\nm = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()) "
          "for _ in range(3)])\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
          "for _ in range(3):\n    m(torch.randn(8, 32)).sum().backward(); opt.step(); opt.zero_grad()\n"
          "print('done')\n")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(r, *texts):
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert r.stderr.count("\n") == 1, r.stderr
    for t in texts:
        assert t in r.stderr, r.stderr


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_run_out_naming_the_script_is_refused_and_the_script_kept(script):
    r = _cli("run", "--out", script, script)
    _refused(r, "is also this command's input")
    assert script.read_text() == SCRIPT and "done" not in r.stdout  # refused before the script ran


def test_run_out_naming_the_script_is_refused_even_with_force(script):
    _refused(_cli("run", "--force", "--out", script, script), "never writes over its inputs")
    assert script.read_text() == SCRIPT


def test_run_plan_out_naming_the_script_is_refused(script):
    _refused(_cli("run", "--budget", "1GiB", "--out", script.with_name("p.json"), "--plan-out", script, script),
             "--plan-out")
    assert script.read_text() == SCRIPT


def test_run_policy_p_out_p_keeps_the_plan(script, real_files, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(real_files["plan.toml"].read_text())
    before = plan.read_text()
    _refused(_cli("run", "--policy", plan, "--out", plan, script), "is also this command's input")
    assert plan.read_text() == before


def test_plan_out_naming_its_profile_is_refused(real_files, tmp_path):
    profile = tmp_path / "x.json"
    profile.write_text(real_files["tracked.json"].read_text())
    _refused(_cli("plan", profile, "--budget", "1GiB", "--out", profile), "is also this command's input")
    assert profile.read_text() == real_files["tracked.json"].read_text()


def test_estimate_out_over_a_script_is_refused_without_force(script):
    _refused(_cli("estimate", "--hf", "gpt2", "--out", script), "not a profile memprof wrote", "--force")
    assert script.read_text() == SCRIPT


def test_plan_out_over_a_foreign_file_needs_force_and_then_keeps_its_mode(real_files, tmp_path):
    target = tmp_path / "notes.toml"
    target.write_text("my notes\n")
    os.chmod(target, 0o600)
    _refused(_cli("plan", real_files["tracked.json"], "--budget", "1GiB", "--out", target), "--force")
    assert target.read_text() == "my notes\n"
    r = _cli("plan", real_files["tracked.json"], "--budget", "1GiB", "--out", target, "--force")
    assert r.exit_code == 0, r.output
    assert isinstance(memprof.load(target), memprof.Plan)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # was widened to 0644 by the rename


def test_rewriting_a_memprof_file_needs_no_force_and_follows_a_symlink(real_files, tmp_path):
    real = tmp_path / "kept" / "plan.toml"
    real.parent.mkdir()
    real.write_text(real_files["plan.toml"].read_text())
    link = tmp_path / "plan.toml"
    link.symlink_to(real)
    r = _cli("plan", real_files["tracked.json"], "--budget", "2GiB", "--out", link)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and os.readlink(link) == str(real)  # was replaced by a plain file
    assert memprof.load(real).budget_bytes == 2 * 1024**3
    assert _temps(real.parent) == [] and _temps(tmp_path) == []


def test_plot_over_foreign_pngs_needs_force(real_files, tmp_path):
    (tmp_path / "timeline.png").write_bytes(b"my own picture")
    _refused(_cli("plot", real_files["tracked.json"], "--out", tmp_path), "timeline.png", "--force")
    assert (tmp_path / "timeline.png").read_bytes() == b"my own picture"
    r = _cli("plot", real_files["tracked.json"], "--out", tmp_path, "--force")
    assert r.exit_code == 0 and files.made_by_memprof(tmp_path / "timeline.png", "png")
    r = _cli("plot", real_files["tracked.json"], "--out", tmp_path, "--html")  # its own files: no --force
    assert r.exit_code == 0, r.output


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """Writes to files under tmp_path fail with ENOSPC once 1,000 bytes are written (by open() or os.write)."""
    import builtins

    real_open, real_write = builtins.open, os.write

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            if self.n + len(data) > 1000:
                self.f.write(data[:max(0, 1000 - self.n)])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, os.PathLike)) and str(tmp_path) in os.path.abspath(file)
        return Full(f) if inside and ("w" in mode or "a" in mode) else f

    def fd_write(fd, data):
        if str(tmp_path) in os.readlink(f"/proc/self/fd/{fd}") and os.fstat(fd).st_size + len(data) > 1000:
            real_write(fd, bytes(data[:max(0, 1000 - os.fstat(fd).st_size)]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(os, "write", fd_write)


def test_a_full_disk_while_writing_a_png_keeps_the_good_one_and_no_temp_file(real_files, tmp_path, request):
    prof = memprof.load(real_files["tracked.json"])
    good = plots.timeline(prof, tmp_path / "timeline.png").read_bytes()
    request.getfixturevalue("full_disk")
    with pytest.raises(OSError, match="No space"):
        plots.timeline(prof, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes() == good  # truncated to 1,000 bytes before
    assert _temps(tmp_path) == []


KILLED_WRITE = """
import os, signal, sys
import memprof
prof = memprof.load(sys.argv[1])
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # kill -9 between writing and renaming
prof.save(sys.argv[2])
"""


def test_temp_files_of_a_killed_write_are_removed_by_the_next_write(real_files, tmp_path):
    out = tmp_path / "out" / "memprof.json"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(real_files["tracked.json"]), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert _temps(out.parent) != [] and not out.exists()  # the kill left its temporary file
    memprof.load(real_files["tracked.json"]).save(out)
    assert _temps(out.parent) == [] and isinstance(memprof.load(out), memprof.Profile)


def test_a_live_processs_temp_file_is_left_alone(real_files, tmp_path):
    mine = tmp_path / f".memprof-tmp-{os.getppid()}-other.json-00000000"  # pytest's parent: alive
    mine.write_text("{")
    memprof.load(real_files["tracked.json"]).save(tmp_path / "memprof.json")
    assert mine.exists()


def test_a_script_that_changes_folder_gets_its_profile_where_the_user_asked(tmp_path, monkeypatch):
    sub = tmp_path / "work"
    sub.mkdir()
    (sub / "memprof.json").write_text("the script's own file\n")
    script = tmp_path / "train.py"
    script.write_text(f"import os\nos.chdir({str(sub)!r})\n" + SCRIPT)
    monkeypatch.chdir(tmp_path)
    r = _cli("run", "train.py")
    assert r.exit_code == 0, r.output
    assert (sub / "memprof.json").read_text() == "the script's own file\n"
    assert isinstance(memprof.load(tmp_path / "memprof.json"), memprof.Profile)
    assert f"profile written to {tmp_path / 'memprof.json'}" in r.stderr


def test_a_script_that_makes_a_file_at_the_out_path_keeps_it(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text("import pathlib\npathlib.Path('memprof.json').write_text('mine')\n" + SCRIPT)
    monkeypatch.chdir(tmp_path)
    r = _cli("run", "train.py")
    assert (tmp_path / "memprof.json").read_text() == "mine"
    assert r.exit_code == 2 and "the profile was not written" in r.stderr and "--force" in r.stderr
