"""The small helpers the Sparse-distill recipes call: config path/ValueError checks naming the key, the first-row data
check, VAE latent statistics read from config.json (== the loaded VAE's), the log-step reduction over ranks (== the
mean of what each rank holds) and the time/throughput/memory scalars."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.config import ConfigError, as_config_error, require_paths
from components.metrics import reduce_for_log, step_scalars
from data.encode import latent_stats, latent_stats_from_config, load_vae
from data.dataset import LatentDataset, check_first_row
from data.parquet import DataError
from data.writer import LatentParquetWriter
from tests.multiproc import run_multiproc


def test_require_paths_names_every_missing_key(tmp_path):
    require_paths({"model.base": tmp_path})  # exists: no error
    with pytest.raises(ConfigError) as err:
        require_paths({"model.base": tmp_path, "data.a": tmp_path / "x", "data.b": tmp_path / "y"})
    assert str(err.value).splitlines() == [f"data.a: {tmp_path / 'x'} does not exist",
                                           f"data.b: {tmp_path / 'y'} does not exist"]


def test_as_config_error_prefixes_value_errors_only():
    with pytest.raises(ConfigError, match=r"^data\.path: bad row$"):
        with as_config_error("data.path"):
            raise ValueError("bad row")
    with pytest.raises(ConfigError, match=r"^parallel\.sp=3 is wrong$"):
        with as_config_error():
            raise ValueError("parallel.sp=3 is wrong")
    with pytest.raises(ConfigError, match=r"^unchanged$"):  # already a ConfigError: not prefixed twice
        with as_config_error("k"):
            raise ConfigError("unchanged")
    with pytest.raises(FileNotFoundError):  # other errors pass through
        with as_config_error("k"):
            raise FileNotFoundError("nope")


def write_rows(out: Path, latent_shape: tuple[int, ...], text_dim: int) -> Path:
    writer = LatentParquetWriter(out, rows_per_file=2)
    for i in range(2):
        writer.write(f"r{i}", "a cat", torch.randn(7, text_dim), torch.randn(latent_shape))
    writer.close()
    return out


def test_check_first_row(tmp_path):
    data = str(write_rows(tmp_path / "d", (4, 3, 2, 2), text_dim=16))
    check_first_row(LatentDataset(data, expect_latent_shape=(4, 3, 2, 2)), text_dim=16)
    with pytest.raises(DataError, match="width 16, the model expects 32"):
        check_first_row(LatentDataset(data), text_dim=32)
    with pytest.raises(DataError, match="latent shape"):
        check_first_row(LatentDataset(data, expect_latent_shape=(4, 3, 4, 4)), text_dim=16)


def test_latent_stats_from_config_equals_the_loaded_vae(tmp_path):
    from tests.tiny_pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    mean, std = latent_stats_from_config(pipe)
    ref_mean, ref_std = latent_stats(load_vae(pipe))
    assert mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=0)
    torch.testing.assert_close(std, ref_std, rtol=0, atol=0)
    assert not torch.equal(mean, std)  # the two statistics are not swapped


def _reduce_rank(rank: int, world: int) -> dict:
    logs = {"lr/student": 0.1, "loss/dmd": torch.tensor(float(rank + 1)), "dmd/denom": torch.tensor(10.0 * rank),
            "grad_norm/student": torch.tensor(float(rank))}
    return {k: float(v) for k, v in reduce_for_log(logs, ("loss/", "dmd/")).items()}


@pytest.mark.multiproc
def test_reduce_for_log_averages_over_ranks():
    ranks = run_multiproc(_reduce_rank, 2)
    for rank, out in enumerate(ranks):
        assert list(out) == ["lr/student", "loss/dmd", "dmd/denom", "grad_norm/student"]  # order kept for stdout
        assert out["loss/dmd"] == (1 + 2) / 2 and out["dmd/denom"] == (0 + 10) / 2
        assert out["lr/student"] == 0.1 and out["grad_norm/student"] == rank  # not reduced


def test_reduce_for_log_without_process_group_is_identity():
    logs = {"loss/dmd": torch.tensor(2.0), "lr/student": 0.5}
    assert reduce_for_log(logs, ("loss/",)) == logs


def test_step_scalars():
    out = step_scalars(2.0, 0.5, 1000, torch.device("cpu"))
    assert out == {"time/step_s": 2.0, "time/data_s": 0.5, "perf/tokens_per_s": 500.0, "mem/max_reserved_gib": 0.0}


def test_compute_latent_shape():
    from data.encode import compute_latent_shape

    assert compute_latent_shape(16, 81, 480, 832, [4, 8, 8]) == (16, 21, 60, 104)  # Wan2.1: 81 frames -> 21
    assert compute_latent_shape(48, 121, 704, 1280, (4, 16, 16)) == (48, 31, 44, 80)  # Wan2.2 TI2V-5B
    for bad in ((80, 480, 832), (81, 484, 832), (81, 480, 830)):
        with pytest.raises(ValueError, match="does not fit the VAE stride"):
            compute_latent_shape(16, *bad, [4, 8, 8])


def test_load_contexts(tmp_path):
    from data.dataset import load_contexts

    data = write_rows(tmp_path / "d", (4, 3, 2, 2), text_dim=16)
    rows = LatentDataset(str(data))
    two = load_contexts(data, 5)  # only 2 rows
    assert two.shape == (2, 512, 16)
    torch.testing.assert_close(two, torch.stack([rows[0]["context"], rows[1]["context"]]), rtol=0, atol=0)
    assert torch.equal(load_contexts(data, 1), two[:1])
