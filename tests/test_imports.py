"""Every module of the package imports on its own, so an import cycle fails here, not in a user's
first `import`. The third-party packages are imported once; each qwen35 module is then imported
in a forked child that has no qwen35 module loaded yet."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

CHECK = r"""
import ast, importlib, os, pkgutil, sys, traceback

import qwen35
modules = sorted(m.name for m in pkgutil.walk_packages(qwen35.__path__, "qwen35.") if m.name != "qwen35.__main__")
third_party = set()
for name in modules:
    path = importlib.util.find_spec(name).origin
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            third_party.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            third_party.add(node.module)
for name in sorted(n for n in third_party if not n.startswith("qwen35")):
    try:
        importlib.import_module(name)
    except Exception:
        pass  # optional (fla, bitsandbytes): the module that needs it imports it when used
for name in [m for m in sys.modules if m == "qwen35" or m.startswith("qwen35.")]:
    del sys.modules[name]

failed, imported = [], 0
for name in modules:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name.split(".")[0] == "qwen35":
                traceback.print_exc()
                os._exit(1)
            os._exit(2)  # an optional GPU package (fla, bitsandbytes) this machine lacks
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 1:
        failed.append(name)
    imported += code == 0
print("modules", len(modules))
print("imported", imported)
print("failed", failed)
"""


def test_every_module_imports_on_its_own():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    modules, imported = int(lines["modules"]), int(lines["imported"])
    # at most the GPU-only modules skipped: ops.fast (fla), ops.fast_qla (flash_qla), ops.fast_conv (triton)
    assert modules > 35 and imported >= modules - 3
    assert lines["failed"] == "[]", proc.stderr[-3000:]


def test_the_moe_block_imports_before_the_model():
    proc = subprocess.run([sys.executable, "-c", "import qwen35.model.moe; import qwen35.model.model"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
