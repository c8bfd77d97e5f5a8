"""Files kvformer writes atomically (conversations, token files, saved models) get the
permissions a plain open() or mkdir() gives under the umask, not tempfile's private 0600 and
0700: a shared models directory or a server run as another user can read them."""

import os
import stat
import sys

import pytest
import torch

from kvformer import ModelConfig
from kvformer.fileio import umask, write_atomic
from kvformer.formats.native import save_native

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")


@pytest.fixture(params=[0o022, 0o027, 0o077])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_saved_models_follow_the_umask(mask, tmp_path):
    assert umask() == mask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # the reference: what open() gives
    atomic = write_atomic(tmp_path / "talk.json", lambda fh: fh.write(b"{}"))
    assert mode(atomic) == mode(plain) == 0o666 & ~mask
    (tmp_path / "plain_dir").mkdir()
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layer=1, n_head=2, n_kv_head=1,
                      max_seq_len=8)
    saved = save_native(tmp_path / "model", cfg, {"w": torch.zeros(2)})
    assert mode(saved) == mode(tmp_path / "plain_dir") == 0o777 & ~mask
    assert mode(saved / "config.json") == 0o666 & ~mask


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "private.json"
    path.write_text("old")
    path.chmod(0o600)
    write_atomic(path, lambda fh: fh.write(b"new"))
    assert path.read_text() == "new" and mode(path) == 0o600
