"""Distributed checkpoints written lazily in row chunks and read back one key at a time, without loading pickles."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.errors import GrowfxError
from rewrite.io.dcp_files import DistributedCheckpoint, Entry, read_metadata, row_chunks, write_checkpoint

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3), min_size=1, max_size=4),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
       chunk=st.integers(1, 200))
def test_written_tensors_and_values_read_back_equal(tmp_path_factory, shapes, dtypes, chunk):
    folder = tmp_path_factory.mktemp("dcp") / "checkpoint"
    generator = torch.Generator().manual_seed(0)
    values = {f"model.t{i}": (torch.randn(shape, generator=generator) * 100).to(dtype)
              for i, (shape, dtype) in enumerate(zip(shapes, dtypes))}
    values["optim.param_groups.0.betas"] = (0.9, 0.95)
    values["optim.param_groups.0.params"] = ["a.weight", "b.bias"]
    entries = [Entry(key, tuple(key.split(".", 1)), tuple(v.shape), v.dtype) if torch.is_tensor(v) else
               Entry(key, ("optim", "param_groups", 0, key.rsplit(".", 1)[1])) for key, v in values.items()]
    made = []

    def make(key):
        made.append(key)
        return values[key]

    write_checkpoint(folder, entries, make, max_chunk_bytes=chunk)
    assert sorted(made) == sorted(values)  # each value made once, however many chunks it is stored in
    checkpoint = DistributedCheckpoint(folder)
    for key, value in values.items():
        if torch.is_tensor(value):
            assert checkpoint.dtype(key) == value.dtype and checkpoint.shape(key) == tuple(value.shape)
            assert torch.equal(checkpoint.tensor(key), value)
            stored = checkpoint.entries[key].chunks
            assert [tuple(c.sizes) for c in stored] == [sizes for _, sizes in row_chunks(tuple(value.shape),
                                                                                         value.dtype, chunk)]
        else:
            assert checkpoint.value(key) == value
    assert checkpoint.path("optim.param_groups.0.betas") == ("optim", "param_groups", 0, "betas")


@given(rows=st.integers(0, 50), cols=st.integers(1, 5), limit=st.integers(1, 400))
def test_row_chunks_cover_the_rows_once_within_the_limit(rows, cols, limit):
    chunks = row_chunks((rows, cols), torch.float32, limit)
    covered = [r for (start, _), (size, _) in chunks for r in range(start, start + size)]
    assert covered == list(range(rows))
    assert all(size * cols * 4 <= max(limit, cols * 4) for _, (size, _) in chunks)


def test_a_value_made_with_another_shape_than_declared_is_refused(tmp_path):
    with pytest.raises(GrowfxError, match=r"model.w was declared \(2, 3\) torch.float32 but made as \(\(3, 2\)"):
        write_checkpoint(tmp_path / "c", [Entry("model.w", ("model", "w"), (2, 3), torch.float32)],
                         lambda key: torch.zeros(3, 2))


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_metadata_naming_anything_but_dcp_classes_is_not_unpickled(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(GrowfxError, match="refers to builtins.print, which is not part of DCP's metadata"):
        read_metadata(tmp_path)
    with pytest.raises(GrowfxError, match="is not a distributed checkpoint"):
        read_metadata(tmp_path / "missing")


def test_values_are_loaded_without_running_pickled_code(tmp_path):
    write_checkpoint(tmp_path / "c", [Entry("extra.hook", ("extra", "hook"))], lambda key: Payload())
    with pytest.raises(Exception, match="Weights only load failed"):
        DistributedCheckpoint(tmp_path / "c").value("extra.hook")
