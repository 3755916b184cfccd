"""`one_thread`: torch on one intra-op thread within the block, the caller's thread count restored after it, also
when blocks overlap in several Python threads or the block raises."""

from __future__ import annotations

import pytest
import torch

from fastai_ls.calibration.threads import one_thread


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_bootstraps_overlapping_in_two_threads_restore_torchs_thread_setting(two_threads):
    # Reviewed: each bootstrap saved torch's (process-wide) thread count, set 1 and restored its saved value; when
    # two overlapped (thread A starts, B starts, A ends, B ends), B restored A's 1 and torch stayed on one thread.
    first, second = one_thread(), one_thread()
    first.__enter__()
    second.__enter__()
    assert torch.get_num_threads() == 1
    first.__exit__(None, None, None)
    assert torch.get_num_threads() == 1  # the second still runs
    second.__exit__(None, None, None)
    assert torch.get_num_threads() == 2


def test_a_block_that_raises_still_restores_the_thread_count(two_threads):
    with pytest.raises(ValueError, match="inside"), one_thread():
        assert torch.get_num_threads() == 1
        raise ValueError("inside")
    assert torch.get_num_threads() == 2
