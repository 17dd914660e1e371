"""Hostile input through the real CLI and real git (issue 14, items 4, 7, 8, 12 and 15).

4  user- or repository-given strings (URLs, remote names, revisions, paths) never reach git
   as options;
7  names are escaped in every human-readable output (``ls``, ``diff``, ``git log -p``, errors),
   while ``--json`` stays exact;
8  passwords and tokens in URLs are redacted wherever a URL is printed;
12 a path holding a newline is added, committed and checked out like any other;
15 a ``.potluck.json`` with a wrong type or value is refused, naming the file, key and value.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import BIN, run_in
from potluck.cli.render import emit_json, redact, safe_field, safe_text, tensor_lines
from potluck.config import ConfigError, RepoConfig
from potluck.errors import GitError, UserError
from potluck.git import setup
from potluck.git.plumbing import Git
from potluck.objects.manifest import Manifest, TensorEntry
from testsupport.servers import LfsServer, lfs, lfs_server  # noqa: F401

ESC_TITLE = "\x1b]0;pwned-title\x07"
NAMES = {
    ESC_TITLE: "\\x1b]0;pwned-title\\x07",
    "[bold red]x[/]": "[bold red]x[/]",  # not markup
    "two\nlines": "two\\nlines",
    "\x9b31m": "\\x9b31m",  # C1 CSI
    "\u202eevil": "\\u202eevil",  # bidi override
}
PWN = "touch PWNED; git-upload-pack"
CHUNK = "chunk_bytes must be a multiple of 64 and at least 4096, at most 268435456, not "
DEPTH = "max_delta_depth must be an integer from 0 to 64, not "


def _env(home: Path) -> dict[str, str]:
    """The environment conftest's autouse fixture gives each test (module fixtures need it
    explicitly)."""
    return {
        **os.environ, "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
    }  # fmt: skip


def _run(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)


def _tensors(scale: float) -> dict[str, np.ndarray]:
    return {name: np.full(2, scale * (i + 1), np.float32) for i, name in enumerate(NAMES)}


NEWLINE = "bad\nname.safetensors"
DASH = "-h.safetensors"
ATTRS = "*.safetensors filter=potluck diff=potluck merge=potluck -text\n"


@dataclass
class Hostile:
    """A repository with two commits of three hostile files: ``m.safetensors`` (tensors named
    with terminal escapes, markup, a newline, a C1 code and a bidi override), a path with a
    newline and a path that looks like an option."""

    root: Path
    env: dict[str, str]
    newline_bytes: bytes  # the last committed version of NEWLINE

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(self.root, *args, env=self.env)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    base = tmp_path_factory.mktemp("hostile")
    h = Hostile(base / "repo", _env(base), b"")
    h.root.mkdir()
    assert h.run("git", "init", "-q", "-b", "main").returncode == 0
    assert h.run("potluck", "init").returncode == 0
    (h.root / ".gitattributes").write_text(ATTRS)
    for i, scale in enumerate((1.0, 2.0)):
        save_file(_tensors(scale), str(h.root / "m.safetensors"))
        save_file({"w": np.full(4, scale, np.float32)}, str(h.root / NEWLINE))
        save_file({"a": np.full(2, scale, np.float32)}, str(h.root / DASH))
        add = h.run("git", "add", "-A")  # item 12: a ValueError aborted the whole add
        assert (add.returncode, add.stderr) == (0, "")
        assert h.run("git", "commit", "-q", "-m", f"v{i}").returncode == 0
    h.newline_bytes = (h.root / NEWLINE).read_bytes()
    return h


# -- 7: terminal escapes ----------------------------------------------------------------------


def test_ls_escapes_names_and_json_keeps_them_exact(hostile: Hostile) -> None:
    js = hostile.run("potluck", "ls", "m.safetensors@HEAD", "--json")
    names = [r["name"] for r in json.loads(js.stdout)]
    assert sorted(names) == sorted(NAMES)
    shown = [NAMES[n] for n in names]
    width = max(len(s) for s in shown)
    out = hostile.run("potluck", "ls", "m.safetensors")
    assert out.stdout.splitlines() == [
        f"{'name':<{width}}  dtype  shape  bytes",
        f"{'-' * width}  -----  -----  -----",
        *(f"{s:<{width}}  F32    2      8 B" for s in shown),
        "5 tensors, 40 B",
    ]


def test_diff_and_git_log_p_escape_names_and_paths(hostile: Hostile) -> None:
    out = hostile.run("potluck", "diff", "--no-stats", "HEAD~1", "HEAD")
    m_lines = sorted(f"  changed  {s}  F32[2]" for s in NAMES.values())
    files = out.stdout.split("potluck diff ")
    assert files[0] == ""
    by_path = {f.split(" ", 1)[0]: f.splitlines()[1:] for f in files[1:]}
    assert sorted(by_path) == ["a/-h.safetensors", "a/bad\\nname.safetensors", "a/m.safetensors"]
    assert sorted(by_path["a/m.safetensors"][:-1]) == m_lines
    assert by_path["a/bad\\nname.safetensors"] == [
        "  changed  w  F32[4]", "  (1 tensors differ, 0 unchanged)",
    ]  # fmt: skip
    log = hostile.run("git", "log", "-p", "-1", "--", "m.safetensors").stdout  # textconv
    for raw, shown in NAMES.items():
        if raw != "[bold red]x[/]":
            assert raw not in log
        assert f"\n-{shown}  F32[2]  " in log and f"\n+{shown}  F32[2]  " in log
    assert "\x1b" not in out.stdout + log and "\x9b" not in out.stdout + log


def test_error_messages_escape_what_the_user_gave(hostile: Hostile) -> None:
    out = hostile.run("potluck", "ls", f"m{ESC_TITLE}.safetensors")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "potluck: error: m\\x1b]0;pwned-title\\x07.safetensors does not exist\n"


def test_safe_text_and_safe_field() -> None:
    raw = "a\nb\tc\rd\x1b[31m\x9b\x7f\x00\u202e\u2066\u2028\udcff é ✓"
    assert safe_text(raw) == "a\nb\tc\\rd\\x1b[31m\\x9b\\x7f\\x00\\u202e\\u2066\\u2028\\xff é ✓"
    assert safe_field("a\nb\tc") == "a\\nb\\tc"
    assert safe_field("plain name.weight") == "plain name.weight"


@pytest.mark.parametrize("odd", [None, *NAMES, "a://b", "k=v"])
def test_tensor_lines_make_every_field_safe_whether_or_not_all_are_plain(odd: str | None) -> None:
    """``tensor_lines`` checks the fields of all tensors at once and makes each safe only when
    one needs it: the text is ``safe_field`` of each field either way."""
    names = ["b.weight", "a.bias", "c"] + ([] if odd is None else [odd])
    entries = tuple(
        TensorEntry(name, "F32", (i, 2) if i else (), f"{i:02x}" * 32, 8 * i)
        for i, name in enumerate(names)
    )
    m = Manifest("safetensors", 100, entries)
    rows = [
        f"{safe_field(e.name)}  {safe_field(e.dtype)}[{','.join(map(str, e.shape))}]  "
        f"{safe_field(e.oid[:16])}"
        for e in sorted(entries, key=lambda e: e.name)
    ]
    assert tensor_lines(m) == "\n".join(["# safetensors, 100 bytes", *rows])
    if odd is not None and odd in NAMES:
        assert NAMES[odd] in tensor_lines(m)


# -- 12: a newline in a path (the add is in the fixture) --------------------------------------


def test_path_with_a_newline_is_committed_and_checked_out(hostile: Hostile) -> None:
    listed = hostile.run("git", "ls-files", "-z").stdout.split("\0")
    assert listed == [DASH, ".gitattributes", NEWLINE, "m.safetensors", ""]
    blob = hostile.run("git", "cat-file", "blob", f"HEAD:{NEWLINE}").stdout
    assert blob.startswith("potluck manifest v1\n")
    (hostile.root / NEWLINE).unlink()
    assert hostile.run("git", "checkout", "--", NEWLINE).returncode == 0
    assert (hostile.root / NEWLINE).read_bytes() == hostile.newline_bytes


# -- 4: option injection ----------------------------------------------------------------------


def test_clone_of_a_url_that_looks_like_an_option_runs_nothing(tmp_path: Path) -> None:
    run_in(tmp_path)("git", "init", "-q", "--bare", "-b", "main", "src.git")
    out = _run(tmp_path, "potluck", "clone", "--", f"--upload-pack={PWN}", "src")
    assert out.returncode == 1
    assert f"fatal: repository '--upload-pack={PWN}' does not exist" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_home", "src.git"]


def test_push_and_fetch_refuse_a_remote_that_looks_like_an_option(hostile: Hostile) -> None:
    remote = f"--upload-pack={PWN} /x"
    for cmd in ("push", "fetch"):
        out = hostile.run("potluck", cmd, "--", remote)
        assert (out.returncode, out.stdout) == (2, "")
        assert out.stderr == (
            f"potluck: error: remote name or URL '{remote}' starts with '-'\n"
            "hint: a remote name or URL cannot start with '-' (it would be read as an option)\n"
        )
    assert not (hostile.root / "PWNED").exists()
    assert hostile.run("git", "status", "--porcelain").stdout == ""


def test_git_diff_of_a_file_named_like_an_option(hostile: Hostile) -> None:
    out = hostile.run("git", "diff", "HEAD~1", "HEAD", "--", DASH)  # the external diff driver
    assert out.stdout.splitlines()[:3] == [
        f"potluck diff a/{DASH} b/{DASH}",
        "  changed  a  F32[2]  ‖Δ‖₂=1.414 ‖Δ‖/‖W‖=1 changed=100.00% max|Δ|=1",
        "  (1 tensors differ, 0 unchanged)",
    ]


def test_plumbing_reads_revisions_that_look_like_options_as_revisions(tmp_path: Path) -> None:
    run_in(tmp_path)("git", "init", "-q", "-b", "main")
    run_in(tmp_path)("git", "commit", "-q", "--allow-empty", "-m", "x")
    git = Git(tmp_path)
    assert git.show_blob("--output=x:y") is None
    with pytest.raises(GitError, match="fatal: Not a valid object name --output=x"):
        git.merge_base("--output=x", "HEAD")
    with pytest.raises(GitError, match="fatal: Not a valid object name --output=x"):
        git.list_blobs("--output=x")
    with pytest.raises(UserError, match="revision '--output=x' starts with '-'"):
        git.log_path("a", revs=("--output=x",))
    assert not (tmp_path / "x").exists()


def test_every_driver_puts_a_double_dash_before_the_paths_git_gives() -> None:
    config = setup.driver_config("pl")
    assert config["filter.potluck.clean"] == "pl clean -- %f"
    assert config["filter.potluck.smudge"] == "pl smudge -- %f"
    assert config["diff.potluck.command"] == "pl diff-driver --"
    assert config["diff.potluck.textconv"] == "pl textconv --"
    assert config["merge.potluck.driver"] == "pl merge-driver -- %O %A %B %P"


# -- 8: credentials in URLs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secret@h:8/r.git", "http://user:***@h:8/r.git"),
        ("https://a:p@ss@h/x", "https://a:***@h/x"),
        ("https://ghp_TOKEN@github.com/o/r", "https://***@github.com/o/r"),
        ("ssh://git@host/o/r", "ssh://git@host/o/r"),
        ("s3://key:secret@bucket/p", "s3://key:***@bucket/p"),
        ("https://h/x?token=abc&n=1&X-Amz-Signature=zz", "https://h/x?token=***&n=1&X-Amz-Signature=***"),
        ("failed: http://u:pw@h/a and http://v:pw2@h/b", "failed: http://u:***@h/a and http://v:***@h/b"),
    ],
)  # fmt: skip
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_push_output_and_errors_hide_url_credentials(
    hostile: Hostile,
    lfs: LfsServer,  # noqa: F811
) -> None:
    lfs.requires_auth("user", "s3cret")
    url = lfs.url.replace("http://", "http://user:s3cret@")
    shown = lfs.url.replace("http://", "http://user:***@")
    hostile.run("git", "config", "remote.origin.potluckurl", url)
    out = hostile.run("potluck", "push", "origin")
    assert out.stdout == (
        f"potluck: {shown}: uploaded 13 objects (568 B; 0 as deltas or compressed), "
        "0 already there\n"
    )
    hostile.run("git", "config", "remote.origin.potluckurl", url.replace("s3cret", "wrong"))
    bad = hostile.run("potluck", "push", "origin", "--all")
    assert bad.returncode == 2 and "wrong" not in bad.stdout + bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("potluck: error:")]
    assert errors == [
        f"potluck: error: {lfs.url} requires authentication (HTTP 401); no credentials found"
    ]
    hostile.run("git", "config", "remote.origin.potluckurl", url + "?token=abc")
    show = hostile.run("potluck", "remote", "show", "origin")
    assert show.stdout == f"origin: {shown}?token=*** (from remote.origin.potluckurl)\n"


def test_json_output_redacts_urls_and_stays_exact(capsys: pytest.CaptureFixture[str]) -> None:
    emit_json({"remote": "https://u:pw@h/x?token=t", "name": ESC_TITLE, "n": [1, "s3://k:s@b"]})
    out = capsys.readouterr().out
    assert json.loads(out) == {
        "remote": "https://u:***@h/x?token=***", "name": ESC_TITLE, "n": [1, "s3://k:***@b"],
    }  # fmt: skip
    assert "\x1b" not in out and "\\u001b]0;pwned-title\\u0007" in out


# -- 15: .potluck.json with wrong types -------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ('{"chunk_bytes": "4096"}', CHUNK + 'the string "4096"'),
        ('{"chunk_bytes": 4097}', CHUNK + "the integer 4097"),
        ('{"chunk_bytes": true}', CHUNK + "the boolean true"),
        ('{"chunk_bytes": 1099511627776}', CHUNK + "the integer 1099511627776"),
        ('{"zstd_level": "x"}', 'zstd_level must be an integer from 1 to 22, not the string "x"'),
        ('{"zstd_level": 1.5}', "zstd_level must be an integer from 1 to 22, not the number 1.5"),
        ('{"zstd_level": 99}', "zstd_level must be an integer from 1 to 22, not the integer 99"),
        ('{"max_delta_depth": null}', DEPTH + "null"),
        ('{"max_delta_depth": -1}', DEPTH + "the integer -1"),
        ('{"format_version": 2}',
         "format_version must be an integer from 1 to 1, not the integer 2"),
        ('{"hash": 256}', "hash must be a string, not the integer 256"),
        ('{"hash": "md5"}', "unsupported hash 'md5'"),
        ('{"merge": 5}', "merge must be an array of merge rules, not the integer 5"),
        ('{"merge": [5]}', "merge[0] must be an object, not the integer 5"),
        ('{"merge": [{}, {"path": 1}]}', "merge[1].path must be a string, not the integer 1"),
        ('{"merge": [{"tensors": ["a"]}]}', "merge[0].tensors must be a string, not an array"),
        ('{"merge": [{"method": null}]}', "merge[0].method must be a string, not null"),
        ('{"merge": [{"params": []}]}', "merge[0].params must be an object, not an array"),
        ('{"merge": [{"seed": "1"}]}',
         f"merge[0].seed must be an integer from 0 to {2**63 - 1}, not the string \"1\""),
        ('{"merge": [{"colour": 1}]}', "merge[0] has unknown keys ['colour']"),
        ('{"colour": 1}', "the top level has unknown keys ['colour']"),
        ("[1]", "the top level must be an object, not an array"),
        ("{", "is not valid JSON: Expecting property name enclosed in double quotes: "
              "line 1 column 2 (char 1)"),
    ],
)  # fmt: skip
def test_repo_config_names_the_file_key_and_value(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RepoConfig.from_json(doc, "cfg/.potluck.json")
    assert info.value.message in (f"cfg/.potluck.json: {message}", f"cfg/.potluck.json {message}")


def test_repo_config_that_cannot_be_read(tmp_path: Path) -> None:
    (tmp_path / ".potluck.json").mkdir()
    with pytest.raises(ConfigError, match=r"cannot read .*\.potluck\.json: \[Errno 21\]"):
        RepoConfig.load(tmp_path)
    (tmp_path / ".potluck.json").rmdir()
    (tmp_path / ".potluck.json").write_bytes(b'{"hash": "\xff"}')
    with pytest.raises(ConfigError, match=r"cannot read .*: 'utf-8' codec can't decode byte 0xff"):
        RepoConfig.load(tmp_path)


def test_repo_config_accepts_every_key_at_its_bounds() -> None:
    doc = {
        "format_version": 1, "hash": "sha256", "max_delta_depth": 64, "chunk_bytes": 256 << 20,
        "zstd_level": 22,
        "merge": [{"path": "*.st", "tensors": "l.*", "method": "ties", "params": {"k": 0.2},
                   "seed": 7}],
    }  # fmt: skip
    cfg = RepoConfig.from_json(json.dumps(doc))
    assert cfg.chunk_bytes == 256 << 20 and cfg.merge[0].params == {"k": 0.2}
    assert RepoConfig.from_json(cfg.to_json()) == cfg


def test_git_add_with_a_bad_config_names_the_key(hostile: Hostile) -> None:
    cfg = hostile.root / ".potluck.json"
    cfg.write_text('{"chunk_bytes": "4096"}')
    try:
        (hostile.root / "m.safetensors").touch()  # stat changed: git cleans it again
        out = hostile.run("git", "add", "m.safetensors")
    finally:
        cfg.unlink()
    assert out.returncode == 128
    assert out.stderr.splitlines()[:2] == [
        f"potluck: error: {cfg}: chunk_bytes must be a multiple of 64 and at least 4096, "
        'at most 268435456, not the string "4096"',
        f"hint: fix chunk_bytes in {cfg} (or delete the key to use the default)",
    ]
    assert "Traceback" not in out.stderr


def test_cli_modules_print_only_through_render() -> None:
    """Every human-readable line leaves through ``render.echo``/``err`` (escaped, redacted)."""
    cli_dir = Path(__file__).parent.parent / "src" / "potluck" / "cli"
    offenders = [
        f"{path.name}: {line.strip()}"
        for path in sorted(cli_dir.glob("*.py"))
        if path.name != "render.py"
        for line in path.read_text().splitlines()
        if any(call in line for call in ("click.echo(", "click.secho(", "print(", ".write("))
    ]
    assert offenders == []
