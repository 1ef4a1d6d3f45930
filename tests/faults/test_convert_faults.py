"""petbind-convert faults: a folder as input, and SIGINT/SIGTERM in the middle of a conversion.

An interrupted conversion must leave no hidden temporary file (``.NAME.XXXX.tmp.petsird``)
and no partial output behind.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from petbind.recon.geometry import Scanner
from petbind.recon.rawdata.convert import main
from petbind.recon.rawdata.hdf5 import ListmodeWriter


def test_folder_as_input_is_one_line(tmp_path, capsys):
    (tmp_path / "in.h5").mkdir()
    rc = main([str(tmp_path / "in.h5"), str(tmp_path / "out.petsird"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "in.h5" in err and "folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5"]


@pytest.fixture(scope="module")
def big_listmode(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "big.h5"
    scanner = Scanner.cylindrical(200.0, 96, 8, 5.0)
    rng = np.random.default_rng(0)
    n = 3_000_000
    with ListmodeWriter(path, scanner, chunk_events=500_000) as w:
        for k in range(0, n, 500_000):
            m = 500_000
            ids = rng.integers(0, scanner.num_detectors, (m, 2)).astype(np.int32)
            ids[:, 1] = (ids[:, 0] + 40) % scanner.num_detectors
            w.append(ids, None, np.sort(rng.uniform(k, k + m, m)) / 100.0, np.ones(m, bool))
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_conversion_leaves_nothing(big_listmode, tmp_path, sig):
    out = tmp_path / "out.petsird"
    proc = subprocess.Popen([sys.executable, "-m", "petbind.recon.rawdata.convert", str(big_listmode), str(out),
                             "--quiet", "--chunk-events", "100000"], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    # wait until the temporary output exists (the conversion is under way), then interrupt
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.petsird.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, "the conversion finished before it could be interrupted; make the input larger"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
