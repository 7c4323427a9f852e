"""Bad input fed to the library and the scripts: each gives one line naming the
file, field or entry and what was expected (scripts: `error: ...`, exit 2),
never a bare codec/reshape/KeyError message."""

import json
import os
import struct
import types

import ml_collections
import numpy as np
import pytest
from hf_fixtures import assert_one_error_line, run_script, save_tiny

from ftjax.errors import ConfigError, FtjaxError, ModelError
from ftjax.models import from_pretrained, safetensors_io
from ftjax.study.sweep import expand, set_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "experiments", "quick", "train.py")


# ----------------------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def truncated_checkpoint(tmp_path_factory):
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


@pytest.mark.slow
def test_truncated_safetensors_through_train_script(truncated_checkpoint, tmp_path):
    proc = run_script(
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


@pytest.mark.slow
def test_config_section_typo_is_one_clean_line(tmp_path):
    proc = run_script(
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


@pytest.mark.slow
def test_count_params_on_a_training_config(tmp_path):
    proc = run_script("count_params.py", f"--config={QUICK}:method=lora,rank=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lora (training config) | 4,096 |" in proc.stdout
    other = tmp_path / "other.py"
    other.write_text(
        "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'x': 1})\n"
    )
    proc = run_script("count_params.py", f"--config={other}")
    assert_one_error_line(
        proc,
        "error: --config: has fields x; expected a counting config (settings + rows",
        "or a training config (model + method)",
    )


# ----------------------------------------------------------------------------- sweep names


def _run_config():
    """A valid run config; nothing it names has to exist (validation reads no file)."""
    from ftjax.data import source_config
    from ftjax.train import default_config

    cfg = default_config()
    cfg.data.tokenizer = "tok"
    cfg.data.sources.target = source_config("train.jsonl")
    return cfg


def _study(sweep, prerequisites=()):
    def get_config(arg=None):
        return _run_config()

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


# ----------------------------------------------------------------------------- user errors vs bugs


@pytest.fixture
def run_main(monkeypatch):
    from ftjax import cli

    monkeypatch.setattr(cli, "enable_compilation_cache", lambda: None)
    return cli.run_main


def test_run_main_refuses_bad_input_in_one_line(run_main, capsys):
    def main(argv):
        raise ConfigError("optim.name='adam'; expected one of adamw, adafactor, lion, sgd")

    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: optim.name='adam'; expected one of adamw, adafactor, lion, sgd\n"


@pytest.mark.parametrize("bug", [TypeError, KeyError, AttributeError, ValueError, OSError])
def test_run_main_keeps_the_traceback_of_a_bug(run_main, capsys, bug):
    def main(argv):
        raise bug("a bug in a new method")

    with pytest.raises(bug, match="a bug in a new method"):  # propagates: a traceback
        run_main(main, [])
    assert "error:" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- early validation


def _refused(cfg, error=ConfigError):
    from ftjax.train import validate_run_config

    with pytest.raises(error) as e:
        validate_run_config(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("optim.name", "adam", "optim.name='adam'; expected one of adamw, adafactor, lion, sgd"),
        ("optim.schedule", "step", "optim.schedule='step'; expected one of cosine"),
        ("optim.lr", 0.0, "optim.lr=0.0; expected a positive learning rate"),
        ("optim.warmup_steps", 500, "optim.warmup_steps=500 is larger than train.steps=100"),
        ("optim.accum_steps", 0, "optim.accum_steps=0; expected an integer >= 1"),
        ("optim.b2", 1.5, "optim.b2=1.5; expected a number in [0, 1]"),
        ("train.steps", 0, "train.steps=0; expected a positive integer"),
        ("train.log_every", 0, "train.log_every=0; expected a positive integer"),
        ("train.keep", 0, "train.keep=0; expected an integer >= 1"),
        ("train.best_mode", "low", "train.best_mode='low'; expected 'min' or 'max'"),
        ("train.label_smoothing", 1.0, "train.label_smoothing=1.0; expected a number in [0, 1)"),
        ("parallel.mode", "ddp", "parallel.mode='ddp'; expected one of single, data, fsdp"),
        ("parallel.model_parallel", -1, "parallel.model_parallel=-1; expected an integer >= 1"),
        ("parallel.model_parallel", 2, "parallel.model_parallel=2 applies to parallel.mode="),
        ("model.dtype", "fp8", "model.dtype='fp8'; expected one of float32, bfloat16, float16"),
        ("model.attention", "flash", "model.attention='flash'; expected one of auto, block, xla"),
        ("model.init.num_kv_heads", 3, "model.init: num_heads=4 must be a multiple of num_kv"),
        ("model.init.hidden_act", "tanh", "model.init: hidden_act='tanh'; expected one of silu"),
        ("model.init.model_type", "bert9", "model.init: "),
        ("data.seq_len", 4096, "data.seq_len=4096 is longer than the model's model.init.max_posi"),
        ("data.batch_size", 0, "data.batch_size: expected an int > 0, got 0"),
    ],
)
def test_bad_field_is_named(path, value, expected):
    cfg = _run_config()
    set_path(cfg, path, value)
    assert _refused(cfg, FtjaxError).startswith(expected)


def test_offloaded_optimizer_under_pmap_is_refused():
    cfg = _run_config()
    cfg.parallel.mode, cfg.parallel.offload_optimizer = "pmap", True
    assert _refused(cfg, FtjaxError).startswith("parallel.offload_optimizer=True needs a sharded")


def test_unknown_fields_and_sections_are_refused():
    from ftjax.peft.base import PeftError

    cfg = _run_config()
    cfg.train.stpes = 10  # a typo in an experiment file: ConfigDict takes new keys in Python
    assert _refused(cfg).startswith("train.stpes: no such field; fields of train: ")
    cfg = _run_config()
    cfg.optimizer = {"lr": 1.0}
    assert _refused(cfg).startswith("optimizer: no such config section; sections: model, ")
    cfg = _run_config()
    cfg.method = ml_collections.ConfigDict({"name": "lora", "rnak": 4})
    assert _refused(cfg, PeftError).startswith("method.rnak: not an option of method 'lora'")
    cfg.method = ml_collections.ConfigDict({"name": "lora", "dropout": 1.5})
    assert _refused(cfg, PeftError) == "method.dropout: must be in [0, 1), got 1.5"
    cfg.method = ml_collections.ConfigDict({"name": "lorra"})
    assert _refused(cfg, PeftError).startswith("method.name: unknown method 'lorra'; known: ")


def test_model_init_holds_the_architecture_only():
    """An execution option set in model.init used to be overwritten by the
    model section's without a word; now a conflicting one is refused."""
    from ftjax.models import ModelConfig
    from ftjax.train.config import execution_options, ignored_init_fields, init_fields

    cfg = _run_config()
    assert "dtype" not in cfg.model.init and "attention" in cfg.model
    cfg.model.init.remat = True
    assert _refused(cfg) == (
        "model.init.remat='full' conflicts with model.remat='none'; set model.remat "
        "(model.init holds the architecture only)"
    )
    del cfg.model.init["remat"]
    cfg.model.init.sizes = 3
    assert _refused(cfg).startswith("model.init.sizes: not a model field; fields: model_type, ")
    # The config.json of older runs held default execution options in init: read as before.
    old = _run_config()
    old.model.init.update(dtype="float32", scan_layers=False, attention="xla")
    del old.model["attention"]
    assert execution_options(old.model)["attention"] == "xla"
    assert "dtype" not in init_fields(old.model)
    # A checkpoint decides the architecture: init fields it overrides are named.
    cfg = _run_config()
    cfg.model.checkpoint = "/ckpt"
    cfg.model.init.num_layers = 4
    assert ignored_init_fields(cfg.model, ModelConfig(num_layers=4)) is None
    assert ignored_init_fields(cfg.model, ModelConfig(num_layers=2)) == (
        "model.init is not used with model.checkpoint='/ckpt', whose config decides the "
        "architecture: ignored model.init.num_layers=4 (checkpoint: 2)"
    )


def test_device_dependent_checks():
    from ftjax.train.config import check_devices

    cfg = _run_config()
    cfg.data.batch_size = 12
    check_devices(cfg, 8)  # single: one device
    cfg.parallel.mode = "data"
    with pytest.raises(ConfigError, match=r"data.batch_size=12 \(micro-batch 12\) is not divis"):
        check_devices(cfg, 8)
    cfg.parallel.update(mode="tensor", model_parallel=3)
    with pytest.raises(ConfigError, match=r"model_parallel=3 does not divide the 8 devices"):
        check_devices(cfg, 8)
    cfg.parallel.model_parallel = 2
    check_devices(cfg, 8)  # 4-way data parallel: 12 rows split
    cfg.optim.accum_steps = 5
    assert _refused(cfg).startswith("data.batch_size=12 is not divisible by optim.accum_steps=5")


def test_sweep_validates_every_run_before_the_first(tmp_path):
    with pytest.raises(ConfigError) as e:
        expand(_study([{}, {"optim.name": "adam"}]), str(tmp_path))
    assert str(e.value).startswith("sweep entry 1: optim.name='adam'; expected one of adamw")
    study = _study([{}])
    cfg = _run_config()
    cfg.eval = {"max_new_tokens": 0}
    study.get_config = lambda arg=None: cfg
    with pytest.raises(ConfigError, match=r"sweep entry 0: eval.max_new_tokens=0; expected an int"):
        expand(study, str(tmp_path))
    cfg.eval = {"max_new_token": 8}
    with pytest.raises(ConfigError, match=r"sweep entry 0: eval.max_new_token: no such field"):
        expand(study, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.optim.name=adam", "error: optim.name='adam'; expected one of adamw, "),
        ("--config.method.rank=0", "error: method.rank: must be a positive integer, got 0"),
        ("--config.parallel.mode=ddp", "error: parallel.mode='ddp'; expected one of single, "),
    ],
)
def test_bad_field_through_train_script_before_anything_loads(tmp_path, override, expected):
    """The checkpoint and the data file do not exist: the error is about the
    field, so nothing was loaded (or even looked for) before validation."""
    workdir = tmp_path / "run"
    proc = run_script(
        "train.py",
        f"--config={QUICK}:method=lora",
        "--config.model.checkpoint=/nonexistent/checkpoint",
        "--config.data.sources.target.path=/nonexistent/target.jsonl",
        override,
        f"--workdir={workdir}",
    )
    assert_one_error_line(proc, expected)
    assert not workdir.exists()


# ----------------------------------------------------------------------------- bad paths


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as far as reading its config goes (no checkpoint)."""
    from ftjax.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.write_config(_run_config())
    return run.path


@pytest.mark.slow
def test_sweep_bad_paths(tmp_path, a_file):
    proc = run_script("sweep.py", f"--config={a_file}", f"--workdir={tmp_path / 's'}")
    assert_one_error_line(proc, f"error: --config: {a_file} is not a Python file")
    study = tmp_path / "study.py"
    study.write_text(
        "from ftjax.data import source_config\n"
        "from ftjax.train import default_config\n\n\n"
        "def get_config(arg=None):\n"
        "    cfg = default_config()\n"
        "    cfg.data.tokenizer = 'tok'\n"
        "    cfg.data.sources.target = source_config('train.jsonl')\n"
        "    return cfg\n"
    )
    proc = run_script("sweep.py", f"--config={study}", f"--workdir={a_file}/sweep")
    assert_one_error_line(proc, f"error: --workdir={a_file}/sweep: cannot create it (Not a dir")


@pytest.mark.slow
def test_export_evaluate_count_params_bad_paths(tmp_path, a_file, run_dir):
    proc = run_script("export.py", f"--workdir={run_dir}", f"--out={a_file}/export")
    assert_one_error_line(proc, f"error: --out={a_file}/export: cannot create it (Not a directory)")
    proc = run_script("export.py", f"--workdir={run_dir}", f"--out={tmp_path}/e", "--dtype=fp7")
    assert_one_error_line(proc, "error: --dtype='fp7'; expected one of float32, bfloat16, float16")
    proc = run_script("evaluate.py", f"--workdir={run_dir}", f"--out={a_file}/x/eval.json")
    assert_one_error_line(proc, f"error: --out={a_file}/x: cannot create it (Not a directory)")
    proc = run_script("evaluate.py", f"--workdir={tmp_path / 'nothing'}")
    assert_one_error_line(proc, "error: --workdir=", "not a directory; expected a run directory")
    proc = run_script("count_params.py", f"--config={QUICK}", f"--workdir={a_file}")
    assert_one_error_line(proc, f"error: --workdir={a_file}: is a file; expected a directory")
    proc = run_script("train.py", f"--config={tmp_path / 'missing.py'}", f"--workdir={tmp_path}")
    assert_one_error_line(proc, "missing.py")
