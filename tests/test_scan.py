"""``comfy-parallel scan``: exact findings on a fixture tree of fake custom nodes, output, CLI and startup pass.

The expected findings come from ``# expect: RULE[, RULE]`` markers in the fixtures. Comments never reach the AST,
so the markers cannot create findings themselves, and comparing sets catches both misses and false positives.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from comfy_parallel.ops import scan
from comfy_parallel.ops.scan import RULES, Finding, format_findings, scan_source, scan_tree, startup_report

FIXTURES = Path(__file__).resolve().parent / "scan_fixtures"
MARKER = re.compile(r"#\s*expect:\s*([a-z0-9-]+(?:\s*,\s*[a-z0-9-]+)*)")


def expected_findings(root: Path) -> Counter[tuple[str, int, str]]:
    expected: Counter[tuple[str, int, str]] = Counter()
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        for lineno, text in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            match = MARKER.search(text)
            if match:
                for rule in match.group(1).split(","):
                    expected[(rel, lineno, rule.strip())] += 1
    return expected


def found_findings(findings: list[Finding], root: Path) -> Counter[tuple[str, int, str]]:
    return Counter((Path(f.path).relative_to(root).as_posix(), f.line, f.rule) for f in findings)


def rules_in(source: str) -> list[str]:
    return [f.rule for f in scan_source(source, "x.py")]


def scan_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="comfy-parallel")
    sub = parser.add_subparsers(dest="command", required=True)
    scan.add_parser(sub)
    return parser.parse_args(["scan", *argv])


# -- the fixture tree ----------------------------------------------------------------------------------------
def test_fixture_tree_exact_findings() -> None:
    expected = expected_findings(FIXTURES)
    found = found_findings(scan_tree(FIXTURES), FIXTURES)
    missed = expected - found
    extra = found - expected
    assert not missed and not extra, f"missed true positives: {sorted(missed)}\nfalse positives: {sorted(extra)}"


def test_fixtures_cover_every_rule_and_have_false_positives() -> None:
    expected = expected_findings(FIXTURES)
    assert {rule for _, _, rule in expected} == set(RULES)
    good = FIXTURES / "node_pack_good"
    assert scan_tree(good) == []
    # the good pack really does contain the tempting strings, in comments, docstrings and harmless code
    text = "\n".join(p.read_text() for p in good.rglob("*.py"))
    for bait in ("'cuda:0'", "torch.cuda.set_device(0)", "CUDA_VISIBLE_DEVICES", "torch.cuda.current_device()",
                 ".to(0)", ".cuda(0)", ".to(device)", ".to(torch.float16)", '"cuda"', '.to("cpu")'):
        assert bait in text, bait


def test_findings_sorted_and_well_formed() -> None:
    findings = scan_tree(FIXTURES)
    assert findings == sorted(findings, key=lambda f: (f.path, f.line, f.col, f.rule))
    for f in findings:
        assert f.rule in RULES and f.message and f.hint and f.col >= 1
        assert f.severity in ("warning", "info")


def test_unparsable_file_reported_not_raised() -> None:
    broken = FIXTURES / "node_pack_broken" / "broken_syntax.py"
    [finding] = scan_tree(broken)
    assert finding.rule == "unparsable" and finding.line == 4 and finding.severity == "info"
    assert "invalid syntax" in finding.message
    assert [f.rule for f in scan_source("x = 1\0\n", "nul.py")] == ["unparsable"]  # NUL byte: no crash


# -- individual decisions ------------------------------------------------------------------------------------
def test_one_finding_per_mistake() -> None:
    assert rules_in("import torch\ntorch.cuda.set_device('cuda:1')\n") == ["set-device"]
    assert rules_in("def f(x):\n    return x.to('cuda:1')\n") == ["cuda-index-literal"]
    assert rules_in("def f(x):\n    return x.cuda('cuda:1')\n") == ["cuda-index-literal"]
    assert rules_in("import torch\nd = torch.device('cuda:0')\n") == ["cuda-index-literal"]
    assert rules_in("import torch\ndef f(x):\n    return x.to(torch.device('cuda', 0))\n") == ["torch-device-index"]


def test_docstrings_comments_and_string_statements_are_ignored() -> None:
    source = ('"""cuda:0"""\n# "cuda:0" torch.cuda.set_device(0)\nclass A:\n    """cuda:1"""\n'
              '    def f(self):\n        """cuda:2"""\n        "cuda:3"\n        return 1\n'
              'async def g():\n    """cuda:4"""\n')
    assert rules_in(source) == []


def test_dot_cuda_severity_depends_on_import_time() -> None:
    inside = scan_source("def f(x):\n    return x.cuda()\n", "x.py")
    at_import = scan_source("import torch\nm = torch.zeros(1).cuda()\n", "x.py")
    assert [(f.rule, f.severity) for f in inside] == [("dot-cuda", "info")]
    assert [(f.rule, f.severity) for f in at_import] == [("dot-cuda", "warning")]
    assert "import" in at_import[0].message


def test_import_time_scopes() -> None:
    call = "torch.cuda.current_device()"
    assert rules_in(f"import torch\nD = {call}\n") == ["current-device-at-import"]
    assert rules_in(f"import torch\nclass A:\n    d = {call}\n") == ["current-device-at-import"]
    assert rules_in(f"import torch\ndef f(d={call}):\n    pass\n") == ["current-device-at-import"]
    assert rules_in(f"import torch\ndef f(*, d={call}):\n    pass\n") == ["current-device-at-import"]
    assert rules_in(f"import torch\ndef f():\n    return {call}\n") == []
    assert rules_in(f"import torch\ndef f():\n    def g(d={call}):\n        pass\n") == []
    assert rules_in(f"import torch\ndef f():\n    class A:\n        d = {call}\n") == []
    assert rules_in(f"import torch\nf = lambda: {call}\n") == []


def test_aliases_and_relative_imports() -> None:
    assert rules_in("from torch import cuda as c\nc.set_device(1)\n") == ["set-device"]
    assert rules_in("import torch.cuda\ntorch.cuda.set_device(1)\n") == ["set-device"]
    assert rules_in("from torch import device as dev\nd = dev('cuda', 1)\n") == ["torch-device-index"]
    assert rules_in("from comfy.model_management import get_torch_device as g\nD = g()\n") == \
        ["current-device-at-import"]
    # a relative module that happens to be called torch is not torch
    assert rules_in("from .torch import device\nd = device('cuda', 1)\n") == []
    assert rules_in("from . import model_management\nD = model_management.get_torch_device()\n") == []


def test_column_is_one_based_characters() -> None:
    [f] = scan_source('x = "ü"; y = "cuda:0"\n', "x.py")
    assert (f.line, f.col) == (1, 14)


def test_reads_of_cuda_visible_devices_are_fine() -> None:
    source = ("import os\na = os.environ.get('CUDA_VISIBLE_DEVICES')\nb = os.environ['CUDA_VISIBLE_DEVICES']\n"
              "c = os.getenv('CUDA_VISIBLE_DEVICES')\nos.environ['OTHER'] = '1'\nos.environ.update({'X': '1'})\n")
    assert rules_in(source) == []


# -- walking -------------------------------------------------------------------------------------------------
BAD = "import torch\ntorch.cuda.set_device(0)\n"


def test_walk_skips_caches_hidden_venvs_disabled_and_ourselves(tmp_path: Path) -> None:
    for rel in ("pack/__pycache__/m.py", "pack/.git/hooks/m.py", ".hidden/m.py", "pack/site-packages/m.py",
                "pack/node_modules/m.py", "old_pack.disabled/m.py", "pack/myenv/lib/m.py", "pack/m.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(BAD)
    (tmp_path / "pack/myenv/pyvenv.cfg").write_text("home = /usr\n")
    (tmp_path / "pack/m.pyc").write_text(BAD)
    own = Path(scan.__file__).resolve().parents[1]  # the comfy_parallel package (scan.py is in ops/)
    (tmp_path / "comfy_parallel").symlink_to(own, target_is_directory=True)
    shutil.copytree(own, tmp_path / "copy" / "comfy_parallel", ignore=shutil.ignore_patterns("__pycache__"))
    found = {Path(f.path).relative_to(tmp_path).as_posix() for f in scan_tree(tmp_path)}
    assert found == {"pack/m.py"}


def test_walk_follows_symlinked_packs_once(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere" / "pack"
    real.mkdir(parents=True)
    (real / "m.py").write_text(BAD)
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    (nodes / "pack").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(real, target_is_directory=True)  # a cycle must not hang the walk
    findings = scan_tree(nodes)
    assert [(Path(f.path).relative_to(nodes).as_posix(), f.rule) for f in findings] == [("pack/m.py", "set-device")]


def test_coding_cookie_and_bad_encoding(tmp_path: Path) -> None:
    (tmp_path / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\nd = 'cuda:0'\n")
    (tmp_path / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
    rules = {Path(f.path).name: (f.rule, f.line) for f in scan_tree(tmp_path)}
    assert rules == {"latin.py": ("cuda-index-literal", 3), "bad.py": ("unparsable", 1)}


# -- output --------------------------------------------------------------------------------------------------
def test_format_findings() -> None:
    a = Finding("n/a.py", 3, 7, "set-device", "breaks it", "fix it")
    b = Finding("n/b.py", 1, 1, "dot-cuda", "moves it", "move it", severity="info")
    text = format_findings([a, b])
    assert text.splitlines() == [
        "n/a.py:3:7: set-device: breaks it (hint: fix it)",
        "n/b.py:1:1: dot-cuda: moves it (hint: move it)",
        "2 finding(s) in 2 file(s) (dot-cuda: 1, set-device: 1)",
    ]
    assert format_findings([]) == "no device hard-coding found"


def test_format_findings_on_fixtures() -> None:
    findings = scan_tree(FIXTURES)
    lines = format_findings(findings).splitlines()
    assert len(lines) == len(findings) + 1
    assert re.fullmatch(r".+:\d+:\d+: [a-z-]+: .+ \(hint: .+\)", lines[0])
    assert lines[-1].startswith(f"{len(findings)} finding(s) in 4 file(s) (")


# -- CLI -----------------------------------------------------------------------------------------------------
def test_run_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    assert scan.run(scan_args([str(FIXTURES)])) == 1
    out = capsys.readouterr().out
    assert "node_pack_bad/__init__.py:17:" in out and "finding(s)" in out

    assert scan.run(scan_args([str(FIXTURES / "node_pack_good")])) == 0
    assert capsys.readouterr().out.strip() == "no device hard-coding found"

    assert scan.run(scan_args([str(tmp_path / "missing")])) == 2
    assert "does not exist" in capsys.readouterr().err
    assert scan.run(scan_args([])) == 2  # no folder, no --comfyui, no COMFYUI_DIR
    assert "COMFYUI_DIR" in capsys.readouterr().err


def test_run_uses_comfyui_custom_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(FIXTURES / "node_pack_bad", comfy / "custom_nodes" / "node_pack_bad")
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    assert scan.run(scan_args(["--comfyui", str(comfy)])) == 1
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    assert scan.run(scan_args([])) == 1
    assert str(comfy / "custom_nodes" / "node_pack_bad") in capsys.readouterr().out
    monkeypatch.setenv("COMFYUI_DIR", str(tmp_path / "nowhere"))
    assert scan.run(scan_args([])) == 2


def test_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert scan.run(scan_args(["--json", str(FIXTURES)])) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["count"] == len(data["findings"]) == len(scan_tree(FIXTURES))
    assert set(data["findings"][0]) == {"path", "line", "col", "rule", "message", "hint", "severity"}
    assert scan.run(scan_args(["--json", str(FIXTURES / "node_pack_good")])) == 0
    assert json.loads(capsys.readouterr().out) == {"root": str(FIXTURES / "node_pack_good"), "count": 0,
                                                   "findings": []}


# -- startup pass --------------------------------------------------------------------------------------------
def test_startup_report(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    log = logging.getLogger("comfy_parallel.test_scan")
    caplog.set_level(logging.INFO, logger=log.name)
    dirs = [FIXTURES, FIXTURES, tmp_path / "missing"]  # duplicates and missing folders are fine
    count = startup_report(dirs, log)
    assert count == len(scan_tree(FIXTURES))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == count
    assert all(r.getMessage().startswith("comfy-parallel scan: ") for r in caplog.records)
    assert len(infos) == 1 and f"{count} finding(s)" in infos[0].getMessage()


def test_startup_report_never_raises(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    log = logging.getLogger("comfy_parallel.test_scan")
    caplog.set_level(logging.INFO, logger=log.name)

    def boom(root: Path) -> list[Finding]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(scan, "scan_tree", boom)
    assert startup_report([tmp_path], log) == 0
    assert "disk on fire" in caplog.text
    assert startup_report(None, log) == 0  # type: ignore[arg-type] - even a wrong argument is only logged


def test_clean_tree_startup_summary(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    log = logging.getLogger("comfy_parallel.test_scan")
    caplog.set_level(logging.INFO, logger=log.name)
    (tmp_path / "ok.py").write_text("import torch\nd = torch.device('cuda')\n")
    assert startup_report([tmp_path], log) == 0
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert os.fspath(tmp_path) in caplog.text
