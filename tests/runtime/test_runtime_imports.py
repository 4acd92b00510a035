"""The runtime carries no compiler: importing it must not import graph, plugins or targets (DESIGN.md section 3)."""

import subprocess
import sys


def test_runtime_does_not_import_the_compiler():
    code = ("import sys, v4compile.runtime.engine, v4compile.runtime.manifest; "
            "print(sorted(m for m in sys.modules if m.startswith(('v4compile.graph', 'v4compile.plugins', "
            "'v4compile.targets', 'triton'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
