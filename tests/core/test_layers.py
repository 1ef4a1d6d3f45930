"""The layers of docs/architecture.md: importing any stage never imports a
later one, and recon and quant never import each other.

Each module is imported in a fresh interpreter and the set of ``petbind``
modules it pulled in is compared with what its layer may use.  This checks
real imports (including lazy ones at module level), not text.
"""

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import petbind

#: What each layer may import (besides itself).
ALLOWED = {
    "core": set(),
    "recon": {"core"},
    "quant": {"core"},
    "sim": {"core", "recon"},
    "pipeline": {"core", "recon", "quant", "sim"},
}

MODULES = sorted(m.name for m in pkgutil.walk_packages(petbind.__path__, "petbind."))


def _layer(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_belongs_to_a_layer():
    assert {_layer(m) for m in MODULES} <= set(ALLOWED)


_PROBE = (
    "import importlib, json, sys\n"
    "sys.modules['cupy'] = None\n"
    "before = set(sys.modules)\n"
    "importlib.import_module(sys.argv[1])\n"
    "print(json.dumps(sorted(m for m in set(sys.modules) - before if m.startswith('petbind.'))))\n"
)


@pytest.fixture(scope="module")
def imported():
    """Map module -> petbind modules it imports (one interpreter per module)."""
    env = dict(os.environ, PETBIND_DEVICE="cpu")
    out = {}
    for name in MODULES:
        r = subprocess.run([sys.executable, "-c", _PROBE, name], capture_output=True, text=True, env=env, check=True)
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_no_stage_imports_a_later_one(imported):
    bad = []
    for name, mods in imported.items():
        layer = _layer(name)
        for m in mods:
            other = _layer(m)
            if other and other != layer and other not in ALLOWED[layer]:
                bad.append(f"{name} imports {m}")
    assert not bad, "\n".join(bad)
