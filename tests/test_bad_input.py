"""Bad input fed to the library and the scripts: each gives one line naming the
file, field or entry and what was expected (scripts: `error: ...`, exit 2),
never a bare codec/reshape/KeyError message."""

import json
import os
import struct
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest

from ftjax.errors import ConfigError, FtjaxError, ModelError
from ftjax.models import from_pretrained, safetensors_io
from ftjax.study.sweep import expand, set_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "experiments", "quick", "train.py")


def script(name, *args):
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_one_error_line(proc, *fragments):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for f in fragments:
        assert f in lines[-1], lines[-1]
    return lines[-1]


# ----------------------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def truncated_checkpoint(tmp_path_factory):
    from hf_fixtures import save_tiny

    path = save_tiny("llama2", str(tmp_path_factory.mktemp("ckpt")))
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    return path


def test_truncated_safetensors_names_file_and_tensor(truncated_checkpoint):
    with pytest.raises(ModelError) as e:
        from_pretrained(truncated_checkpoint)
    msg = str(e.value)
    weights = os.path.join(truncated_checkpoint, "model.safetensors")
    assert msg.startswith(f"{weights}: tensor '") and "truncated file?" in msg, msg
    assert "\n" not in msg


def test_truncated_safetensors_through_train_script(truncated_checkpoint, tmp_path):
    proc = script(
        "train.py",
        f"--config={QUICK}",
        f"--config.model.checkpoint={truncated_checkpoint}",
        f"--workdir={tmp_path / 'run'}",
    )
    weights = os.path.join(truncated_checkpoint, "model.safetensors")
    assert_one_error_line(proc, f"error: {weights}: tensor '", "truncated file?")


def _write_raw(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


@pytest.mark.parametrize(
    "header, data, expected",
    [
        (
            {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
            bytes(12),
            "tensor 'w': data_offsets [0, 12] span 12 bytes, but F32 shape [2, 2] needs 16",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "tensors 'a' and 'b' overlap",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            bytes(8),
            "tensor 'w': data_offsets [8, 0] span -8 bytes",
        ),
        (
            {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}},
            bytes(1),
            "tensor 'w' has unsupported dtype 'Q4'",
        ),
        (
            {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            bytes(4),
            "tensor 'w': bad shape [-1]",
        ),
        ({"w": [1, 2]}, b"", "tensor 'w': corrupt header entry [1, 2]"),
        ([1], b"", "corrupt safetensors header (a JSON list"),
    ],
)
def test_corrupt_safetensors_header(tmp_path, header, data, expected):
    path = _write_raw(tmp_path / "m.safetensors", header, data)
    with pytest.raises(safetensors_io.SafetensorsError) as e:
        safetensors_io.load(path)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value), str(e.value)


def test_bad_header_length_and_tiny_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(safetensors_io.SafetensorsError, match="header length 1099511627776"):
        safetensors_io.load(str(path))
    path.write_bytes(b"abc")
    with pytest.raises(safetensors_io.SafetensorsError, match="not a safetensors file"):
        safetensors_io.load(str(path))


def test_round_trip_keeps_bf16_fp8_and_empty_tensors(tmp_path):
    import ml_dtypes

    tensors = {
        "bf16": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
        "fp8": np.linspace(-2, 2, 8).astype(ml_dtypes.float8_e4m3fn),
        "empty": np.zeros((0, 4), np.float32),
        "i8": np.arange(5, dtype=np.int8),
    }
    path = str(tmp_path / "m.safetensors")
    safetensors_io.save(tensors, path, {"format": "pt"})
    back = safetensors_io.load(path)
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k].astype(np.float32), v.astype(np.float32))
    assert safetensors_io.metadata(path) == {"format": "pt"}


# ----------------------------------------------------------------------------- config flags


def test_config_section_typo_is_one_clean_line(tmp_path):
    proc = script(
        "train.py", f"--config={QUICK}", "--config.optimm.lr=1", f"--workdir={tmp_path / 'r'}"
    )
    line = assert_one_error_line(
        proc,
        "error: --config.optimm.lr: the config has no field 'optimm' (sections: data, ",
        "did you mean 'optim'?",
    )
    assert "\\" not in line


def test_override_path_messages():
    from ftjax.cli import check_override_path, one_line

    cfg = ml_collections.ConfigDict({"optim": {"lr": 1.0, "b1": 0.9}, "model": {"dtype": "x"}})
    assert check_override_path(cfg, "optim.lr") is None
    assert check_override_path(cfg, "optim.lrr") == (
        "--config.optim.lrr: the config has no field 'lrr' (fields of optim: b1, lr); "
        "did you mean 'lr'?"
    )
    assert check_override_path(cfg, "optim.lr.x") == (
        "--config.optim.lr.x: optim.lr is a float, not a section; expected --config.optim.lr=<value>"
    )
    assert check_override_path(cfg, "zzz.a") == (
        "--config.zzz.a: the config has no field 'zzz' (sections: model, optim)"
    )
    assert one_line(KeyError("'x'\nDid you mean 'y'?")) == "Did you mean 'y'?"


# ----------------------------------------------------------------------------- count_params


def test_count_params_on_a_training_config(tmp_path):
    proc = script("count_params.py", f"--config={QUICK}:method=lora,rank=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lora (training config) | 4,096 |" in proc.stdout
    other = tmp_path / "other.py"
    other.write_text(
        "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'x': 1})\n"
    )
    proc = script("count_params.py", f"--config={other}")
    assert_one_error_line(
        proc,
        "error: --config: has fields x; expected a counting config (settings + rows",
        "or a training config (model + method)",
    )


# ----------------------------------------------------------------------------- sweep names


def _study(sweep, prerequisites=()):
    def get_config(arg=None):
        return ml_collections.ConfigDict({"arg": arg or "", "train": {"seed": 0}})

    return types.SimpleNamespace(
        get_config=get_config,
        get_sweep=lambda: sweep,
        get_prerequisites=lambda: list(prerequisites),
    )


@pytest.mark.parametrize(
    "entry, origin",
    [
        ({"name": "../../x"}, "sweep entry 0 (its 'name')"),
        ({"name": "a/b"}, "sweep entry 0 (its 'name')"),
        ({"name": "a\\b"}, "sweep entry 0 (its 'name')"),
        ({"name": ".hidden"}, "sweep entry 0 (its 'name')"),
        ({"name": ""}, "sweep entry 0 (its 'name')"),
        ({"name": 3}, "sweep entry 0 (its 'name')"),
        ({"arg": ".."}, "sweep entry 0"),
    ],
)
def test_unsafe_run_names_are_refused(tmp_path, entry, origin):
    with pytest.raises(ConfigError) as e:
        expand(_study([entry]), str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"{origin}: run name {entry.get('name', '..')!r} is not a safe"), msg
    assert not os.path.exists(tmp_path.parent.parent / "x")


def test_unsafe_prerequisite_name_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"prerequisite '\.\./base': run name '\.\./base'"):
        expand(_study([{}], [("../base", "")]), str(tmp_path))


def test_safe_names_and_args_with_separators(tmp_path):
    _, runs = expand(_study([{"arg": "path=a/b"}, {"name": "x..y"}]), str(tmp_path))
    assert [r.name for r in runs] == ["path=a_b", "x..y"]


def test_set_path_errors_are_config_errors():
    cfg = ml_collections.ConfigDict({"optim": {"lr": 1.0}})
    for dotted, expected in [
        ("optimm.lr", "entry: unknown config key 'optimm.lr' (no 'optimm')"),
        (
            "optim.lr.x",
            "entry: unknown config key 'optim.lr.x' (optim.lr is a float, not a section)",
        ),
        ("optim.lrr", "entry: unknown config key 'optim.lrr'"),
    ]:
        with pytest.raises(ConfigError) as e:
            set_path(cfg, dotted, 1, "entry")
        assert str(e.value) == expected
    with pytest.raises(ConfigError, match=r"entry: optim.lr='fast': Could not override"):
        set_path(cfg, "optim.lr", "fast", "entry")
    assert issubclass(ConfigError, FtjaxError)
